"""What a module's `run` returns: a declarative plan that a backend carries out on each host.

Plans never hold shell strings built from parameters: commands are argv lists. The one
exception, `Shell`, is allowed only for modules that declare a `ShellCommand` parameter.
Dry runs and tests inspect a plan without executing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TempPath:
    """A file in a private temporary directory the backend makes on each host and removes after."""

    name: str

    def __str__(self) -> str:
        return f"$TMP/{self.name}"


Arg = str | TempPath


@dataclass(frozen=True)
class Emit:
    """Report text without running anything on the host."""

    text: str


@dataclass(frozen=True)
class Ping:
    """Check the host answers, the backend's native way."""


@dataclass(frozen=True)
class Command:
    """One argv run on the host without a shell, with optional stdin."""

    argv: tuple[Arg, ...]
    stdin: str | None = None

    def __init__(self, argv: list[Arg] | tuple[Arg, ...], stdin: str | None = None) -> None:
        if not argv or not all(isinstance(a, (str, TempPath)) for a in argv):
            raise TypeError("argv must be a non-empty list of strings")
        object.__setattr__(self, "argv", tuple(argv))
        object.__setattr__(self, "stdin", stdin)


@dataclass(frozen=True)
class FirstAvailable:
    """Run the first command whose program is installed on the host (`systemctl`, else `service`).

    Only whether the program exists decides. A chosen command that runs and fails is that host's
    failure, never a reason to try the next one, so an action cannot run twice. If none is installed
    the host fails with rc 127.
    """

    commands: tuple[Command, ...]

    def __init__(self, *commands: Command) -> None:
        if not commands or not all(isinstance(c, Command) and isinstance(c.argv[0], str) for c in commands):
            raise TypeError("FirstAvailable takes one or more Commands whose program is a plain string")
        object.__setattr__(self, "commands", commands)


@dataclass(frozen=True)
class Shell:
    """`sh -c cmd`, for modules that declare a ShellCommand parameter (shell.exec) and nothing else."""

    cmd: str


@dataclass(frozen=True)
class PutFile:
    """Write a file on the host: inline `content`, or `source`, a file in the master's file store.

    The backend checks and writes in one step on the host, by descriptors (masters/backends/put_file.py):
    it walks to `dest`'s directory from `/` without following any symlink blindly, refuses the host if
    that directory's real path (the file's, for a symlink at `dest`) is outside every one of `roots`
    (none given: anywhere), and renames a fresh file into that very directory. A symlink swapped in
    meanwhile cannot redirect the write. `param` names the parameter `dest` came from, for the error."""

    dest: Arg
    content: str | None = None
    source: str | None = None
    mode: int = 0o644
    owner: str | None = None
    group: str | None = None
    roots: tuple[str, ...] = ()
    param: str | None = None


AGENT_ACTIONS = ("install", "remove")


@dataclass(frozen=True)
class AgentSetup:
    """Install or remove OMBot's own audit agent on the host: the one step that writes outside any
    module's roots, so it is a step of its own that only the built-in `audit.rollout` and `audit.remove`
    use, and it touches only the agent's paths (docs/audit.md, "Rolling the agent out").

    The module says what is wanted; the master fills in `payload` when the job runs (the agent's wheels
    from its wheelhouse, the IDC's agent.toml: modules never see the master's files), and each backend
    runs masters/backends/agent_setup.py on the host with it. `python` is the host's interpreter that
    makes the agent's venv (3.9 or later)."""

    action: str
    auditd: bool = False
    python: str = "/usr/bin/python3"
    payload: str | None = field(default=None, repr=False)
    wheelhouse: str | None = None  # filled in by the master: its directory of wheels, which the backend copies over

    def __post_init__(self) -> None:
        if self.action not in AGENT_ACTIONS:
            raise ValueError(f"AgentSetup action must be one of {', '.join(AGENT_ACTIONS)}")


@dataclass(frozen=True)
class RequireWithin:
    """Refuse the host unless `path`, symlinks resolved on that host, lies under one of `roots`.
    `param` names the parameter the path came from, so the host's error names it too."""

    path: str
    roots: tuple[str, ...]
    param: str | None = None


@dataclass(frozen=True)
class TailFile:
    """Show the last `lines` lines of the regular file at `path`, which must lie under one of `roots`.

    The backend checks what it opened, not the name: the open descriptor must be a regular file with
    one link (no hardlink to a file elsewhere), whose real path is under a root. A symlink swapped in
    between a check and the read therefore cannot lead out. `param` names the path's parameter."""

    path: str
    lines: int
    roots: tuple[str, ...]
    param: str | None = None


@dataclass(frozen=True)
class RunPlaybook:
    """Run the playbook `playbook` from the master's allow-listed directory (ansible.playbook).

    `vars` are `NAME=VALUE` words as requested; the backend checks them against the schema declared
    beside the playbook before the job is accepted, and passes the typed values as data. Only the
    Ansible backend runs playbooks; the others refuse the job at submit."""

    playbook: str
    vars: tuple[str, ...] = ()


@dataclass(frozen=True)
class SaltState:
    """Apply the named Salt state (`state.apply`, salt.state) from the master's allow-list; a check run
    passes `test=True`. Only the Salt backend applies states; the others refuse the job at submit."""

    name: str


Step = (Emit | Ping | Command | FirstAvailable | Shell | PutFile | RequireWithin | TailFile | RunPlaybook | SaltState
        | AgentSetup)


@dataclass(frozen=True)
class Plan:
    """What a module asks the backend to do on each host: its steps, in order, and an optional output parser."""

    steps: tuple[Step, ...]
    # Turns one host's collected stdout into structured data shown beside the text.
    parse: Callable[[str], dict[str, Any]] | None = field(default=None, compare=False)

    def __init__(self, *steps: Step, parse: Callable[[str], dict[str, Any]] | None = None) -> None:
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "parse", parse)

    def describe(self) -> list[str]:
        """One human line per step, for dry runs."""
        return [_describe(step) for step in self.steps]

    def uses_temp_path(self) -> bool:
        """Whether any step names a TempPath: remote backends then make (and remove) a per-job directory."""
        return any(_uses_temp_path(step) for step in self.steps)


def _uses_temp_path(step: Step) -> bool:
    match step:
        case Command(argv):
            return any(isinstance(a, TempPath) for a in argv)
        case FirstAvailable(commands):
            return any(_uses_temp_path(c) for c in commands)
        case PutFile(dest):
            return isinstance(dest, TempPath)
    return False


def _describe(step: Step) -> str:
    match step:
        case Emit(text):
            return f"emit {text!r}"
        case Ping():
            return "ping"
        case Command(argv, stdin):
            return "run " + " ".join(repr(str(a)) for a in argv) + (" (with stdin)" if stdin else "")
        case FirstAvailable(commands):
            return "first installed of: " + "; ".join(_describe(c) for c in commands)
        case Shell(cmd):
            return f"sh -c {cmd!r}"
        case PutFile(dest, content, source, mode, owner, group, roots):
            what = f"store:{source}" if source else f"{len(content or '')} chars"
            return (f"put {what} -> {dest} mode {mode:04o}" + (f" owner {owner}" if owner else "")
                    + (f" group {group}" if group else "") + (f" within {', '.join(roots)}" if roots else ""))
        case RequireWithin(path, roots, _):
            return f"require {path} within {', '.join(roots)}"
        case TailFile(path, lines, roots, _):
            return f"show the last {lines} lines of {path} (a single-link regular file within {', '.join(roots)})"
        case RunPlaybook(playbook, variables):
            return f"run playbook {playbook!r}" + (f" with {' '.join(variables)}" if variables else "")
        case SaltState(name):
            return f"apply salt state {name!r}"
        case AgentSetup(action, auditd, python):
            return (f"{action} the OMBot audit agent (venv by {python}" + (", with the auditd layer" if auditd else "")
                    + "; docs/audit.md: Rolling the agent out)")
    raise TypeError(f"not a plan step: {step!r}")
