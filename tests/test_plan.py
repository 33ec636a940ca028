"""Plans alone (modules/plan.py): what the step constructors accept and what dry runs print.

Plans carried out on hosts are in tests/test_modules.py (a real master); these are the fast unit tests
the mutation run (scripts/mutate.py) uses.
"""

from __future__ import annotations

import pytest

from ombot.modules.plan import (
    Command, Emit, FirstAvailable, Ping, Plan, PutFile, RequireWithin, RunPlaybook, SaltState, Shell, TailFile,
    TempPath,
)


def test_commands_are_non_empty_lists_of_strings_or_temp_paths() -> None:
    command = Command(["cat", TempPath("script")], stdin="input")
    assert command.argv == ("cat", TempPath("script")) and command.stdin == "input"
    assert Command(("true",)).stdin is None
    for argv in ([], (), ["ls", 3], [None], [b"ls"]):
        with pytest.raises(TypeError, match="^argv must be a non-empty list of strings$"):
            Command(argv)  # type: ignore[arg-type]
    assert str(TempPath("s.sh")) == "$TMP/s.sh"


def test_first_available_takes_commands_whose_program_is_a_string() -> None:
    systemctl, service = Command(["systemctl", "restart", "x"]), Command(["service", "x", "restart"])
    assert FirstAvailable(systemctl, service).commands == (systemctl, service)
    message = "^FirstAvailable takes one or more Commands whose program is a plain string$"
    for bad in ((), (systemctl, "service x"), (Command([TempPath("prog")]),)):
        with pytest.raises(TypeError, match=message):
            FirstAvailable(*bad)


def test_plans_keep_their_steps_and_parser() -> None:
    def parse(text: str) -> dict[str, str]:
        return {"text": text}

    plan = Plan(Ping(), Emit("hi"), parse=parse)
    assert plan.steps == (Ping(), Emit("hi")) and plan.parse is parse
    assert Plan().steps == () and Plan().parse is None
    assert plan == Plan(Ping(), Emit("hi"))  # the parser is not part of a plan's identity


def test_describe_gives_one_line_per_step() -> None:
    plan = Plan(
        Emit("it's done"),
        Ping(),
        Command(["echo", "a b", TempPath("f")]),
        Command(["cat"], stdin="data"),
        Command(["cat"], stdin=""),
        FirstAvailable(Command(["systemctl", "status", "x"]), Command(["service", "x", "status"], stdin="y")),
        Shell("ls | wc -l"),
        PutFile(TempPath("run.sh"), content="echo hi\n", mode=0o700),
        PutFile("/etc/x.conf", source="conf/x.conf", owner="root", group="wheel"),
        PutFile("/tmp/empty"),
        PutFile("/srv/a.conf", source="a.conf", roots=("/opt", "/srv"), param="dest"),
        RequireWithin("/var/log/app", ("/var/log", "/srv"), param="path"),
        TailFile("/var/log/syslog", 20, ("/var/log", "/srv"), param="path"),
    )
    assert plan.describe() == [
        'emit "it\'s done"',
        "ping",
        "run 'echo' 'a b' '$TMP/f'",
        "run 'cat' (with stdin)",
        "run 'cat'",
        "first installed of: run 'systemctl' 'status' 'x'; run 'service' 'x' 'status' (with stdin)",
        "sh -c 'ls | wc -l'",
        "put 8 chars -> $TMP/run.sh mode 0700",
        "put store:conf/x.conf -> /etc/x.conf mode 0644 owner root group wheel",
        "put 0 chars -> /tmp/empty mode 0644",
        "put store:a.conf -> /srv/a.conf mode 0644 within /opt, /srv",
        "require /var/log/app within /var/log, /srv",
        "show the last 20 lines of /var/log/syslog (a single-link regular file within /var/log, /srv)",
    ]


def test_describe_names_the_engine_steps_and_their_words() -> None:
    """ansible.playbook and salt.state plan one engine step each: the dry run names the playbook
    and its vars as requested, or the state."""
    plan = Plan(RunPlaybook("site.yml", ("tier=web", "count=3")), RunPlaybook("ping.yml"),
                SaltState("nginx.config"))
    assert plan.describe() == [
        "run playbook 'site.yml' with tier=web count=3",
        "run playbook 'ping.yml'",
        "apply salt state 'nginx.config'",
    ]
    assert RunPlaybook("p.yml").vars == ()
    assert not plan.uses_temp_path()


def test_describe_refuses_what_is_not_a_step() -> None:
    with pytest.raises(TypeError, match=r"^not a plan step: 'rm -rf /'$"):
        Plan("rm -rf /").describe()  # type: ignore[arg-type]


def test_put_file_defaults() -> None:
    put = PutFile("/x")
    assert (put.content, put.source, put.mode, put.owner, put.group) == (None, None, 0o644, None, None)
    assert (put.roots, put.param) == ((), None)  # no roots: the host may put it anywhere
    assert RequireWithin("/a", ("/",)).param is None and TailFile("/a", 1, ("/",)).param is None


def test_a_plan_uses_a_temp_path_only_where_a_step_names_one() -> None:
    assert not Plan(Emit("x"), Command(["ls"]), FirstAvailable(Command(["a"]), Command(["b"]))).uses_temp_path()
    assert Plan(Command(["sh", TempPath("s")])).uses_temp_path()
    assert Plan(FirstAvailable(Command(["a"]), Command(["b", TempPath("s")]))).uses_temp_path()
    assert Plan(PutFile(TempPath("f"), content="x")).uses_temp_path()
    assert not Plan(PutFile("/etc/x", content="x")).uses_temp_path()
