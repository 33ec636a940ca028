"""The console's terminal side, when it runs in one: line editing and history (prompt_toolkit), Ctrl-C
that clears the line instead of quitting, and whatever prints meanwhile (cards, results from other
threads, log lines) drawn above the prompt rather than over it.

Ctrl-D on an empty line quits. Ctrl-C while a command is still working gives the prompt back; the
command goes on and its answer prints above the prompt when it comes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory
from prompt_toolkit.patch_stdout import patch_stdout

HISTORY_FILE = "console_history"


class LineCleared(Exception):
    """Ctrl-C at the prompt: the line typed so far is dropped, and a fresh prompt follows."""


class _LetGo(Exception):
    """Ctrl-C while a command works: stop waiting for it (it goes on)."""


def is_terminal(stdin: TextIO, out: TextIO) -> bool:
    """Both ends are a terminal: a person types here (pipes and files get the plain line reader)."""
    try:
        return stdin.isatty() and out.isatty()
    except ValueError:  # a closed stream
        return False


class Terminal:
    """A prompt with editing and history kept in `history` (0600), and a screen to print on above it."""

    def __init__(self, prompt: str, history: Path) -> None:
        self.prompt = prompt
        self.session: PromptSession[str] = PromptSession(history=FileHistory(str(_private_file(history))),
                                                         interrupt_exception=LineCleared)
        self.waiting = False  # a command runs and this thread waits for it: Ctrl-C (SIGINT) lets go

    def interrupt(self, signum: int, frame: object) -> None:
        """SIGINT, for the whole session: the terminal sends it while cooked, between prompts. It lets go
        of a command being waited for; at any other moment (the line just entered, its command not yet
        started) it does nothing: Ctrl-C never ends the console."""
        if self.waiting:
            raise _LetGo

    def read(self) -> str | None:
        """The next line typed; "" after Ctrl-C (the line is dropped); None at Ctrl-D (leave)."""
        try:
            return self.session.prompt(self.prompt)
        except LineCleared:
            return ""
        except EOFError:
            return None

    def run(self, work: Callable[[], None]) -> None:
        """Run one command on a thread and wait for it; Ctrl-C stops the waiting, not the command
        (whose answer then prints above the next prompt), so it never ends the console."""
        done = threading.Event()

        def command() -> None:
            try:
                work()
            finally:
                done.set()

        threading.Thread(target=command, name="om-console-command", daemon=True).start()
        try:
            self.waiting = True
            done.wait()  # a lock wait, which a signal interrupts (POSIX): the handler runs at once
        except _LetGo:
            print("(still working on it: its answer will show here)")
        finally:
            self.waiting = False


@contextlib.contextmanager
def terminal(prompt: str, history: Path) -> Iterator[tuple[Terminal, TextIO]]:
    """The prompt and the screen (a stdout that prints above the prompt) while the console runs; log
    lines go to that screen too, and back where they went afterwards."""
    term = Terminal(prompt, history)
    with _sigint_to(term.interrupt), patch_stdout():
        screen = sys.stdout
        moved = _log_handlers_to(screen)
        try:
            yield term, screen
        finally:
            for handler, stream in moved:
                handler.setStream(stream)


@contextlib.contextmanager
def _sigint_to(handler: Callable[[int, object], None]) -> Iterator[None]:
    """SIGINT goes to `handler` while the block runs (only the main thread can catch signals; elsewhere
    nothing changes and a command is simply waited for)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _log_handlers_to(screen: TextIO) -> list[tuple[logging.StreamHandler[TextIO], TextIO]]:
    """Point the root logger's terminal handlers at `screen`; returns each moved one with its old stream."""
    terminals = {id(stream) for stream in (sys.__stdout__, sys.__stderr__) if stream is not None}
    moved: list[tuple[logging.StreamHandler[TextIO], TextIO]] = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and id(handler.stream) in terminals:
            moved.append((handler, handler.stream))
            handler.setStream(screen)
    return moved


def _private_file(path: Path) -> Path:
    """`path`, created 0600 in a 0700 directory if missing: typed commands are this user's alone."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
    return path
