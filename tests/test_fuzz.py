"""Fuzzing the /om grammar and the dispatcher behind it.

The dispatcher runs in-process (as the console runs it) against a REAL master whose inventory holds
only remote hosts: the local backend refuses those, so no fuzzed command can execute anything here.
The property: every input gets an answer, never an exception and never a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from ombot.bot import grammar
from ombot.bot.jobs import JobFilter
from ombot.bot.transport import ChatRequest
from ombot.message import Message
from tests.support import Cluster, bot_table

REMOTE_ONLY = "[remote]\nfar01 ansible_host=192.0.2.10\nfar02 ansible_host=192.0.2.11\n"
USER = "U0ALICE"
REPLY_WAIT = 10.0  # generous: a wait that polls, not a timed assertion

# Ansible makes up an implicit `localhost` (ansible_connection=local) for these names even when the
# inventory does not list them; the fuzzer must never aim at them (see test_implicit_localhost_...).
_LOCAL_NAMES = re.compile(r"localhost|127\.0\.0\.1|::1", re.IGNORECASE)


# -- a transport that records everything ------------------------------------------------------------


@dataclass
class Sent:
    kind: str  # respond | post | update | open_form
    channel: str
    text: str
    thread_ts: str | None = None


class RecordingTransport:
    """bot.transport.Transport that keeps every call; posts get increasing fake ts values."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self._changed = threading.Condition()
        self._ts = 0

    def _record(self, sent: Sent) -> None:
        with self._changed:
            self.sent.append(sent)
            self._changed.notify_all()

    def respond(self, req: ChatRequest, message: Message) -> None:
        self._record(Sent("respond", req.channel, message.text))

    def post(self, channel: str, message: Message, thread_ts: str | None = None,
             req: ChatRequest | None = None) -> str | None:
        with self._changed:
            self._ts += 1
            ts = f"{self._ts}.000000"
        self._record(Sent("post", channel, message.text, thread_ts))
        return ts

    def update(self, channel: str, ts: str, message: Message) -> None:
        self._record(Sent("update", channel, message.text, ts))

    def open_form(self, req: ChatRequest, view: dict[str, Any]) -> bool:
        self._record(Sent("open_form", req.channel, str(view.get("title"))))
        return False

    def replies(self) -> list[Sent]:
        with self._changed:
            return [s for s in self.sent if s.kind in ("respond", "post")]

    def wait(self, condition: Callable[[list[Sent]], bool], timeout: float = REPLY_WAIT) -> list[Sent]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition(list(self.sent)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return list(self.sent)


class ErrorLog(logging.Handler):
    """Collects ERROR records (the dispatcher logs unexpected exceptions with their traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        return [self.format(r) for r in taken]


# -- the bot under fuzz ------------------------------------------------------------------------------


@dataclass
class FuzzBot:
    service: Any
    errors: ErrorLog

    def ask(self, text: str) -> list[Sent]:
        """Dispatch one command; return what was sent once at least one reply arrived."""
        transport = RecordingTransport()
        self.service.dispatcher.command(ChatRequest(USER, "console", text, origin="console"), transport)
        return transport.wait(lambda sent: any(s.kind in ("respond", "post") for s in sent))


@pytest.fixture(scope="module")
def fuzz_bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzBot]:
    """One master and one in-process bot for the whole file (a master takes a second or two to start)."""
    from ombot.bot.service import BotService

    cluster = Cluster(tmp_path_factory.mktemp("fuzz"), {"local": ["m1"]}, inventory=REMOTE_ONLY,
                      extra_toml=bot_table())
    service = None
    errors = ErrorLog()
    try:
        cluster.start("m1")
        service = BotService(cluster.config(), origin="console")
        service.start(RecordingTransport())
        logging.getLogger("ombot").addHandler(errors)
        yield FuzzBot(service, errors)
    finally:
        logging.getLogger("ombot").removeHandler(errors)
        if service is not None:
            service.close()
        cluster.stop_all()


# -- strategies --------------------------------------------------------------------------------------

COMMANDS = ["help", "modules", "run", "form", "jobs", "status", "cancel", "masters", "approvals", "approve",
            "deny", "audit", "schedule", "HELP", "Run", "mine"]
MODULES = ["echo", "ping", "facts", "shell.exec", "script.run", "file.push", "log.tail", "service", "ech",
           "no.such", "Echo"]
TARGETS = ["far01", "far02", "far[01-02]", "far[02-01]", "far[0:2]", "remote", "all", "*", "far01,far02",
           "!far01", "&remote", "~f.*", "nohost", "far[0-99999]", "far[01-02],remote", "<http://far01|far01>"]
KEYS = ["message", "cmd", "seconds", "idc", "dry_run", "timeout", "path", "unit", "action", "lines", "script",
        "content", "mode", "colour", ""]
VALUES = ["hi", "", "yes", "no", "maybe", "0", "1", "30", "86401", "-5", "\u00b2", "\u0661\u0662", "9" * 25,
          "9" * 5000, "df -h /", "$(id)", "`id`", "a;b", "a|b", "../../etc/passwd", "local", "nowhere"]
ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&amp;amp;", "&", "&lt;@U0BOB&gt;", "&#0;", "&#x110000;"]
SMART = ["\u201c", "\u201d", "\u2018", "\u2019", "\u2013", "\u2014", "\u201e", "\u00ab", "\u00bb", "\u00a0",
         "\u2212", "\u202f"]
SLACK_MARKUP = ["<@U0BOB>", "<!channel>", "<#C0OPS|ops>", "<http://far01|far01>", "<mailto:a@b.c|a@b.c>",
                "<http://x>", "<", ">", "|", "<|>"]
CONTROL = [chr(c) for c in (*range(0, 32), 127)] + ["\u2028", "\u200b", "\ufeff"]
QUOTES = ['"', "'", "\u201c", "\u2018", '\\', '"\'']
# Job and request references: str.isdigit() is true for more than int() or SQLite take.
NUMBERS = ["1", "#1", "0", "-1", "\u00b2", "\u0661", "\uff11", "9" * 19, "9" * 25, "9" * 5000, "1.5", "1e3"]

long_words = st.integers(300, 6000).flatmap(
    lambda n: st.sampled_from(["a", "9", "\u00e9", "\U0001f600", "&amp;", "x="]).map(lambda c: c * n))
key_value = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS) | st.text(max_size=8),
                      st.sampled_from(VALUES) | st.text(max_size=12))
quoted_value = st.builds(lambda k, q1, v, q2: f"{k}={q1}{v}{q2}", st.sampled_from(KEYS),
                         st.sampled_from(QUOTES), st.sampled_from(VALUES) | st.text(max_size=10),
                         st.sampled_from(QUOTES + [""]))
token = st.one_of(
    st.sampled_from(COMMANDS), st.sampled_from(MODULES), st.sampled_from(TARGETS), key_value, quoted_value,
    st.sampled_from(ENTITIES), st.sampled_from(SMART), st.sampled_from(SLACK_MARKUP), st.sampled_from(CONTROL),
    st.sampled_from(QUOTES), st.sampled_from(NUMBERS), st.text(max_size=10), long_words,
)
reference = st.builds(lambda head, ref, rest: " ".join([head, ref, *rest]),
                      st.sampled_from(["status", "cancel", "approve", "deny"]), st.sampled_from(NUMBERS),
                      st.lists(token, max_size=2))
# A command-shaped start (a command or module, maybe targets) followed by soup, or plain random text.
command_text = st.one_of(
    st.builds(lambda head, rest: " ".join([head, *rest]),
              st.sampled_from(COMMANDS + MODULES), st.lists(token, max_size=7)),
    st.builds(lambda head, target, rest: " ".join([head, target, *rest]),
              st.sampled_from(MODULES), st.sampled_from(TARGETS), st.lists(key_value | quoted_value, max_size=5)),
    reference,
    st.lists(token, max_size=8).map(" ".join),
    st.text(max_size=200),
)

NASTY = [
    "", " ", "\x00", "echo far01 message=\u201cunclosed", "echo far01 message='unclosed", 'echo far01 message="a',
    "echo far01 message=\u201chello\u201d", "run", "run echo", "status \u00b2", "cancel \u00b2",
    "status " + "9" * 25, "status " + "9" * 5000, "echo far01 message=x timeout=\u00b2",
    "echo far01 message=x timeout=" + "9" * 5000, "echo far[0-" + "9" * 5000 + "] message=x",
    "approve \u00b2", "deny \u00b2 because", "approve " + "9" * 25, "approve " + "9" * 5000,
    "deny " + "9" * 5000 + " because", "echo far01 message=x message=y",
    "echo far01 far02 message=x", "echo far01 =x", "shell.exec far01 cmd=\u201cdf \u2013h /\u201d",
    "&lt;@U0BOB&gt; &amp;&amp; echo", "help " + "x" * 6000, "echo " + "far01," * 3000 + " message=x",
]


def _check_replies(bot: FuzzBot, text: str, sent: list[Sent]) -> None:
    errors = bot.errors.take()
    assert not errors, f"{text!r} logged an error:\n" + "\n".join(errors)
    replies = [s for s in sent if s.kind in ("respond", "post")]
    assert replies, f"no reply to {text!r} within {REPLY_WAIT:g}s (sent: {sent})"
    for s in sent:
        assert "Traceback" not in s.text, (text, s.text)
        assert "Internal error" not in s.text, f"{text!r} hit an unexpected exception: {s.text}"


# -- the property --------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=command_text)
@example(text="echo far01 message=hi")  # a job that starts, fails on the remote host, and is reported
def test_every_command_gets_an_answer_and_never_a_traceback(fuzz_bot: FuzzBot, text: str) -> None:
    assume(not _LOCAL_NAMES.search(grammar.normalise(text)))
    sent = fuzz_bot.ask(text)
    _check_replies(fuzz_bot, text, sent)


@pytest.mark.parametrize("text", NASTY, ids=lambda text: ascii(text)[:40])
def test_known_nasty_inputs_get_an_answer(fuzz_bot: FuzzBot, text: str) -> None:
    sent = fuzz_bot.ask(text)
    _check_replies(fuzz_bot, text, sent)


def test_a_job_on_a_remote_only_inventory_ends_failed_and_reports(fuzz_bot: FuzzBot) -> None:
    transport = RecordingTransport()
    fuzz_bot.service.dispatcher.command(ChatRequest(USER, "console", "echo far[01-02] message=hi",
                                                    origin="console"), transport)
    sent = transport.wait(lambda s: any("Results of #" in x.text for x in s))
    assert any(s.kind == "respond" and "Starting job" in s.text for s in sent), sent
    results = next(s for s in sent if "Results of #" in s.text)
    assert "far01" in results.text and "far02" in results.text and "unreachable" in results.text
    assert any("failed]" in s.text for s in sent if s.kind in ("post", "update")), sent


def test_implicit_localhost_is_not_a_target(fuzz_bot: FuzzBot) -> None:
    sent = fuzz_bot.ask("echo 127.0.0.1 dry_run=yes message=x")
    assert any("no host or group matches" in s.text for s in sent), sent


# -- the grammar alone -------------------------------------------------------------------------------


def invoked(text: str) -> tuple[str, dict[str, Any]]:
    """(command word, handler arguments) that /om `text` invokes."""
    invocation = grammar.parse(text)
    return invocation.word, invocation.arguments


def run_of(text: str) -> grammar.Run:
    word, arguments = invoked(text)
    assert word == "run"
    return arguments["run"]


@settings(max_examples=600, deadline=None)
@given(text=command_text)
def test_parse_returns_a_command_or_a_command_error(text: str) -> None:
    try:
        command = grammar.parse(text)
    except grammar.CommandError as exc:
        assert str(exc)
        return
    assert isinstance(command, grammar.Invocation) and command.command.handler is not None


@given(text=st.text(max_size=300))
def test_normalise_is_idempotent_on_plain_text(text: str) -> None:
    once = grammar.normalise(text)
    assert "\u201c" not in once and "\u2014" not in once and "\u00a0" not in once
    if "&" not in once and "<" not in once:
        assert grammar.normalise(once) == once


def test_normalise_undoes_slack_entities_links_and_smart_punctuation() -> None:
    assert grammar.normalise("a &amp;&amp; b &lt;x&gt;") == "a && b <x>"
    assert grammar.normalise("<http://web01|web01> <mailto:a@b.c|a@b.c> <http://x.y>") == "web01 a@b.c http://x.y"
    assert grammar.normalise("\u201chi\u201d \u2018yo\u2019 a\u2013b c\u2014d") == "\"hi\" 'yo' a-b c--d"
    assert grammar.normalise("  x\u00a0y  ") == "x y"


def test_smart_quotes_group_words_like_plain_ones() -> None:
    plain = run_of('echo web01 message="hello there"')
    smart = run_of("echo web01 message=\u201chello there\u201d")
    assert smart == plain == grammar.Run("echo", "web01", {"message": "hello there"})


def test_entities_reach_parameters_as_plain_characters() -> None:
    run = run_of("shell.exec web01 cmd=\u201cgrep a &amp;&amp; echo &lt;ok&gt;\u201d")
    assert run == grammar.Run("shell.exec", "web01", {"cmd": "grep a && echo <ok>"})


def test_quoted_command_keeps_its_spaces_and_dashes() -> None:
    assert run_of('shell.exec web01 cmd="df -h /"').params == {"cmd": "df -h /"}
    assert run_of("shell.exec web01 cmd=\u201cdf \u2013h /\u201d").params == {"cmd": "df -h /"}


def test_reserved_keys_leave_the_module_params() -> None:
    run = run_of("run echo web01 message=x idc=bj dry_run=yes timeout=30")
    assert run == grammar.Run("echo", "web01", {"message": "x"}, idc="bj", dry_run=True, timeout=30)
    assert run_of("echo web01 dry_run=no").dry_run is False
    assert run_of("echo web01 dry_run=off").dry_run is False and run_of("echo web01 dry_run=ON").dry_run is True
    assert run_of("echo web01 idc=").idc is None


def test_short_form_is_run() -> None:
    assert grammar.parse("echo web[01-03] message=x") == grammar.parse("run echo web[01-03] message=x")
    assert run_of("echo") == grammar.Run("echo", None)


def test_commands_parse() -> None:
    assert invoked("") == ("help", {"module": None})
    assert invoked("HELP echo") == ("help", {"module": "echo"})
    assert invoked("modules diagnostics") == ("modules", {"category": "diagnostics"})
    assert invoked("jobs") == ("jobs", {"filters": JobFilter()})
    assert invoked("jobs mine") == ("jobs", {"filters": JobFilter(mine=True)})
    assert invoked("jobs module=echo host=web01") == ("jobs", {"filters": JobFilter(module="echo", host="web01")})
    assert invoked("status #12") == ("status", {"job": "#12"})
    assert invoked("cancel 3") == ("cancel", {"job": "3"})
    assert invoked("form echo") == ("form", {"module": "echo"})
    assert invoked("masters") == ("masters", {})
    assert invoked("approvals") == ("approvals", {})
    assert invoked("approve 7") == ("approve", {"request": "7"})
    assert invoked('"jobs" mine') == ("jobs", {"filters": JobFilter(mine=True)})  # the word as the shell reads it
    assert invoked("deny 4 not during the freeze") == ("deny", {"request": "4", "reason": "not during the freeze"})


@pytest.mark.parametrize("text, expected", [
    ('echo web01 message="unclosed', "close every quote"),
    ("echo web01 message=\u201cunclosed", "close every quote"),
    ("run", "run needs a module name"),
    ("echo web01 web02", "parameters are key=value"),
    ("echo web01 =x", "no parameter name"),
    ("echo web01 message=a message=b", "given twice"),
    ("echo web01 timeout=0", "timeout is a number of seconds"),
    ("echo web01 timeout=86401", "timeout is a number of seconds"),
    ("echo web01 timeout=soon", "timeout is a number of seconds"),
    ("echo web01 timeout=\u00b2", "timeout is a number of seconds"),
    ("echo web01 timeout=" + "9" * 5000, "timeout is a number of seconds"),
    ("echo web01 dry_run=maybe", "dry_run is yes or no"),
    ("echo web01 dry_run=", "dry_run is yes or no"),  # the one reading of yes/no words: empty is neither
    ("jobs yours", "usage: /om jobs"),
    ("status", "usage: /om status"),
    ("status 1 2", "usage: /om status"),
    ("masters now", "too many words"),
    ("deny 4", "deny needs a reason"),
    ("audit colour=red", "filters are host=, user=, grep=, since=, idc="),
], ids=lambda v: ascii(v)[:40])
def test_errors_say_what_is_wrong(text: str, expected: str) -> None:
    with pytest.raises(grammar.CommandError, match=re.escape(expected)):
        grammar.parse(text)


def test_a_deny_reason_is_prose_and_never_pings() -> None:
    from ombot.bot.messages import RequestView, approval_card
    from tests.fakeslack import message_problems

    assert invoked("deny 3 don't run this on friday") == ("deny", {"request": "3", "reason": "don't run this on friday"})
    denied = SimpleNamespace(**invoked("deny 3 &lt;!channel&gt; nope")[1])
    view = RequestView(3, "r", "U0A", "echo", "message=x", "local", ["web01"], 1, ["leads"], [], "denied",
                       0, decided_by="U0B", reason=denied.reason)
    card = approval_card(view)
    assert "<!channel>" not in json.dumps(card.blocks) and "&lt;!channel&gt;" in json.dumps(card.blocks)
    assert not message_problems(card.text, card.blocks)


def test_each_chat_command_is_declared_once_and_reserved_at_the_master() -> None:
    """The master refuses site modules named like a chat command, without importing the bot: its
    list of reserved words must be exactly the declared command words."""
    from ombot.bot.commands import declared
    from ombot.modules import RESERVED_COMMANDS

    assert set(declared()) == RESERVED_COMMANDS
    assert {"audit", "schedule", "schedules"} <= set(declared())  # declared now, handled by the issues to come


def test_help_lists_the_usage_of_every_available_command() -> None:
    from ombot.bot.commands import available

    usages = [c.usage for c in available()]
    assert "/om deny REQUEST REASON" in usages and "/om help [module]" in usages
    assert "/om jobs [mine] [module=NAME] [host=HOST] [since=2h|3d|2026-11-20]" in usages
    assert "/om run MODULE TARGETS [key=value ...] [idc=X|X,Y|*] [dry_run=yes] [timeout=SECONDS] [check=yes]" in usages
    assert "/om audit [host=GLOB] [user=GLOB] [grep=TEXT] [since=2h|3d|2026-11-20] [idc=IDC]" in usages
