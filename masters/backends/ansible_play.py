"""A plan becomes one playbook: one play over the job's hosts whose tasks carry out the steps.

Request values are data, never templates: every value from a plan (argv items, file contents,
paths, modes, names) is written with YAML's `!unsafe` tag, which Ansible never templates. The only
templated strings are fixed ones written here (the host's temporary directory, the interpreter).

Task names are `ombot:STEP:ROLE`, which is how runner events map back to plan steps: role `run`
is a step's own work (its output is the host's output), `probe` a check whose output is not shown
(FirstAvailable's choice), `put` PutFile's writer (put_file.py: its JSON answer says whether it
changed anything, and the diff), `tmp` the temporary directory, `end` the marker that a host is done,
`reach` the ping that a plan of only Emit steps still sends, so an unreachable host is reported so.

In a check run (`--check --diff`) the tasks that only read (ping, probes, tails) and the backend's own
temporary directory run for real (`check_mode: false`): they change nothing, and the steps after them
need their answers. So does PutFile's writer, told it is a check run: it writes nothing and diffs.
A playbook (RunPlaybook) is imported whole with its vars, then one marker play says which hosts got
through it; its own tasks keep their names (role `play` in the events).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ombot.masters.backends import ansible_snippets as snippets
from ombot.masters.backends import agent_setup, put_file
from ombot.masters.backends.playbooks import ResolvedPlaybook
from ombot.modules import (
    AgentSetup, Arg, Command, Emit, FirstAvailable, Ping, Plan, PutFile, RequireWithin, RunPlaybook, Shell, Step, TailFile,
    TempPath, within,
)

PYTHON = "{{ ansible_python_interpreter | default(ombot_python) }}"
TMP_VAR = "ombot_tmp"
# argv items reach the program as they are: the command module would otherwise expand $VARS and ~
# in them, and strip the output's trailing newlines.
_LITERAL_ARGV = {"expand_argument_vars": False, "strip_empty_ends": False}
_TEMP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class PlanError(Exception):
    """A plan the Ansible backend cannot express (every host fails with this message)."""


class Unsafe(str):
    """A string Ansible must never template: dumped as `!unsafe`."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Unsafe, lambda dumper, value: dumper.represent_scalar("!unsafe", str(value), style='"'))


@dataclass
class Playbook:
    """The generated playbook text and what its tasks mean."""

    text: str
    task_steps: dict[str, tuple[int, str]] = field(default_factory=dict)  # task name -> (step index, role)
    has_tasks: bool = False
    playbook: bool = False  # the plan runs a site playbook: tasks with other names are that playbook's
    # Without an `always` part (nothing to clean up) a host is done after this task, or at its first
    # failure (the block stops there): no end-marker task per host, one task fewer on every job.
    done_after: str | None = None


def _strategy(tasks: list[dict[str, Any]], always: list[dict[str, Any]]) -> str:
    """`free` lets each host go through its tasks at its own pace. With one task per host there is no
    pace to keep, and `linear` does the same work for less: `free`'s main loop peeks at every host's
    next task each millisecond while it waits (~40 % more controller CPU on 10 hosts here)."""
    return "linear" if len(tasks) == 1 and not always else "free"


def tmp_prefix(ident: str) -> str:
    """The name prefix of a job's temporary directory on each host (`ident`: the job id, made safe)."""
    return f"ombot-{ident}-"


def build(plan: Plan, job_id: str, ident: str, python: str, file_store: Path | None, output_cap: int,
          check: bool = False) -> Playbook:
    books = [step for step in plan.steps if isinstance(step, RunPlaybook)]
    if books:
        return _imported(plan, books, job_id, python)
    tasks: list[dict[str, Any]] = []
    uses_tmp = plan.uses_temp_path()
    if uses_tmp:
        tasks.append({"name": "ombot:-1:tmp", "ansible.builtin.tempfile": {
            "state": "directory", "prefix": Unsafe(tmp_prefix(ident))}, "register": TMP_VAR})
    for index, step in enumerate(plan.steps):
        for role, task in _tasks(step, index, file_store, output_cap, check):
            tasks.append({"name": f"ombot:{index}:{role}", **task})
    if not tasks:  # only Emit steps: still ask each host to answer, or an unreachable host would say ok
        tasks.append({"name": "ombot:-1:reach", "ansible.builtin.ping": {}})
    always: list[dict[str, Any]] = []
    if uses_tmp:
        always.append({"name": "ombot:-1:cleanup", "ansible.builtin.file": {
            "path": "{{ %s.path }}" % TMP_VAR, "state": "absent"}, "when": f"{TMP_VAR}.path is defined"})
        always.append({"name": "ombot:-1:end", "ansible.builtin.debug": {"msg": "done"}})
    if check:
        for task in tasks + always:
            if _meaning(task["name"])[1] in _READ_ONLY_ROLES + _CHECKS_ITSELF or "ansible.builtin.ping" in task:
                task["check_mode"] = False
    play = {
        "name": "ombot", "hosts": "all", "gather_facts": False, "strategy": _strategy(tasks, always),
        "vars": {"ombot_python": Unsafe(python)},
        "environment": {"PATH": Unsafe(snippets.CHILD_PATH), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                        "OMBOT_JOB_ID": Unsafe(job_id), "OMBOT_HOST": "{{ inventory_hostname }}"},
        "tasks": [{"block": tasks, "always": always}] if always else tasks,
    }
    text = yaml.dump([play], Dumper=_Dumper, sort_keys=False, allow_unicode=False, width=1 << 30)
    meaning = {t["name"]: _meaning(t["name"]) for t in tasks + always}
    return Playbook(text, meaning, has_tasks=bool(tasks), done_after=None if always else tasks[-1]["name"])


_READ_ONLY_ROLES = ("probe", "tail", "tmp", "cleanup", "end", "reach")
_CHECKS_ITSELF = ("put",)  # told it is a check run, it writes nothing and says what it would change


def _imported(plan: Plan, books: list[RunPlaybook], job_id: str, python: str) -> Playbook:
    """A site playbook, imported with its typed vars (strings `!unsafe`), then the marker play."""
    if len(books) != 1 or any(not isinstance(step, (RunPlaybook, Emit)) for step in plan.steps):
        raise PlanError("a playbook runs alone: one RunPlaybook step (and Emit text) per plan")
    book = books[0]
    if not isinstance(book, ResolvedPlaybook) or not book.path:
        raise PlanError(f"playbook {book.playbook!r} was not checked by the master")
    index = plan.steps.index(book)
    plays: list[dict[str, Any]] = [
        {"import_playbook": book.path, "vars": {name: _data(value) for name, value in book.values}},
        {"name": "ombot-end", "hosts": "all", "gather_facts": False, "vars": {"ombot_python": Unsafe(python)},
         "tasks": [{"name": "ombot:-1:end", "ansible.builtin.debug": {"msg": "done"}, "check_mode": False}]},
    ]
    text = yaml.dump(plays, Dumper=_Dumper, sort_keys=False, allow_unicode=False, width=1 << 30)
    return Playbook(text, {"ombot:-1:end": (-1, "end"), "": (index, "play")}, has_tasks=True, playbook=True)


def _data(value: Any) -> Any:
    """A typed var as Ansible gets it: numbers and booleans as they are, every string `!unsafe`."""
    if isinstance(value, str):
        return Unsafe(value)
    if isinstance(value, (list, tuple)):
        return [_data(v) for v in value]
    return value


def stop_playbook(job_id: str, ident: str, python: str) -> str:
    """Ends what a stopped job left running on its hosts (see ansible_snippets.STOP_JOB)."""
    play = {"name": "ombot-stop", "hosts": "all", "gather_facts": False, "vars": {"ombot_python": Unsafe(python)},
            "tasks": [{"name": "ombot:-1:stop", **_snippet(snippets.STOP_JOB, [job_id, tmp_prefix(ident)])}]}
    return yaml.dump([play], Dumper=_Dumper, sort_keys=False, width=1 << 30)


def _meaning(name: str) -> tuple[int, str]:
    _, index, role = name.split(":")
    return int(index), role


def _tasks(step: Step, index: int, file_store: Path | None, cap: int,
           check: bool = False) -> list[tuple[str, dict[str, Any]]]:
    match step:
        case Emit():
            return []  # the master adds the text itself; nothing runs
        case Ping():
            return [("run", {"ansible.builtin.ping": {}})]
        case Command():
            return [("run", _command(step))]
        case Shell(cmd):
            return [("run", {"ansible.builtin.shell": {"cmd": Unsafe(cmd), "executable": "/bin/sh",
                                                       "strip_empty_ends": False}})]
        case FirstAvailable(commands):
            probe = _snippet(snippets.FIRST_INSTALLED, [str(c.argv[0]) for c in commands])
            choices = [(f"run{k}", {**_command(c), "when": f"ombot_pick_{index}.stdout | trim == '{k}'"})
                       for k, c in enumerate(commands)]
            return [("probe", {**probe, "register": f"ombot_pick_{index}"}), *choices]
        case PutFile():
            return [("put", _put(step, file_store, check))]
        case RequireWithin(path, roots, param):
            return [("probe", _snippet(snippets.REQUIRE_WITHIN, [_label(param), path, *roots]))]
        case TailFile(path, lines, roots, param):
            return [("tail", _snippet(snippets.TAIL, [_label(param), path, str(lines), str(cap), *roots]))]
        case AgentSetup(wheelhouse=str(house)):  # the wheels by Ansible's own copy, then the setup
            copy = {"ansible.builtin.copy": {"src": Unsafe(house.rstrip("/") + "/"), "dest": "/opt/ombot-agent/wheels/",
                                             "mode": "0644", "directory_mode": "0755"}}
            return [("agentcopy", {**copy, "register": f"ombot_copy_{index}"}), ("agent", _agent_setup(step))]
        case AgentSetup():
            return [("agent", _agent_setup(step))]
    raise PlanError(f"the ansible backend cannot run {type(step).__name__}")


def _label(param: str | None) -> str:
    return f"{param}: " if param else ""


def _snippet(code: str, args: list[str]) -> dict[str, Any]:
    return {"ansible.builtin.command": {"argv": [PYTHON, Unsafe("-c"), Unsafe(code), *map(Unsafe, args)],
                                        **_LITERAL_ARGV}, "changed_when": False}  # they only read


def _arg(arg: Arg) -> str:
    if isinstance(arg, TempPath):
        if not _TEMP_NAME.fullmatch(arg.name):  # it is joined into a template: fixed characters only
            raise PlanError(f"temporary file name {arg.name!r} must be letters, digits, '_', '.', '-'")
        return "{{ %s.path }}/%s" % (TMP_VAR, arg.name)
    return Unsafe(arg)


def _command(step: Command) -> dict[str, Any]:
    args: dict[str, Any] = {"argv": [_arg(a) for a in step.argv], **_LITERAL_ARGV}
    if step.stdin is not None:
        args |= {"stdin": Unsafe(step.stdin), "stdin_add_newline": False}
    return {"ansible.builtin.command": args}


def _put(step: PutFile, file_store: Path | None, check: bool) -> dict[str, Any]:
    """put_file.py run on the host: the path check and the write in one step, by descriptors. The
    content goes base64 on stdin; the host's answer is one line of JSON (changed, diff)."""
    args = put_file.arguments(step.mode, step.owner, step.group, step.roots, _label(step.param), check,
                              put_label(step))
    argv = [PYTHON, Unsafe("-c"), Unsafe(put_file.source()), _arg(step.dest), *map(Unsafe, args)]
    return {"ansible.builtin.command": {"argv": argv, "stdin": Unsafe(put_file.stdin(put_data(step, file_store))),
                                        "stdin_add_newline": False, **_LITERAL_ARGV}}


def _agent_setup(step: AgentSetup) -> dict[str, Any]:
    """agent_setup.py run on the host by its own interpreter, the request (the wheels, the agent.toml,
    whether this is a check run: it then changes nothing itself) on stdin; the one templated value is
    the host's inventory name, which the master's inventory gave."""
    if step.payload is None:
        raise PlanError("the master filled in no agent payload (AgentSetup is the built-in audit modules' own)")
    argv = [Unsafe(step.python), Unsafe("-c"), Unsafe(agent_setup.source()), "{{ inventory_hostname }}"]
    return {"ansible.builtin.command": {"argv": argv, "stdin": Unsafe(step.payload), "stdin_add_newline": False,
                                        **_LITERAL_ARGV}, "check_mode": False}


def put_label(step: PutFile) -> str:
    """How a check run's diff names the new content: the module's own name for it, not a master path."""
    return f"store:{step.source}" if step.source is not None else "the pushed content"


def put_data(step: PutFile, file_store: Path | None) -> bytes:
    """The bytes a PutFile writes: its inline content, or its store file read on the master."""
    if step.source is None:
        return (step.content or "").encode()
    return store_file(step.source, file_store).read_bytes()


def store_file(source: str, file_store: Path | None) -> Path:
    """The store file a PutFile names, resolved on the master: it may not lead out of the store."""
    if file_store is None:
        raise PlanError("this master has no file store configured")
    path = (file_store / source).resolve()
    if not within(str(path), str(file_store.resolve())) or not path.is_file():
        raise PlanError(f"{source} is not a file in the master's store")
    return path
