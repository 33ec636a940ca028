"""The module SDK's parameter types and the loader that refuses bad module files."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from ombot.modules import Emit, ModuleLoadError, ParamError, Plan, load_modules, params as p
from ombot.modules.params import Param
from tests.support import Cluster


def refused(param: Param, raw: Any) -> str:
    """The error message for a value the parameter must refuse; it always names the parameter."""
    with pytest.raises(ParamError) as caught:
        param.convert(raw)
    assert caught.value.param == param.name
    assert str(caught.value).startswith(f"{param.name}: expected ")
    # Both sides validate from the catalog's schema: the rebuilt parameter refuses the same way.
    with pytest.raises(ParamError) as again:
        Param.from_schema(param.schema()).convert(raw)
    assert str(again.value) == str(caught.value)
    return str(caught.value)


def accepted(param: Param, raw: Any) -> Any:
    value = param.convert(raw)
    rebuilt = Param.from_schema(param.schema())
    assert rebuilt == param
    assert rebuilt.convert(raw) == value
    assert param.convert(value) == value  # converting twice changes nothing: the bot sends converted values
    return value


# -- each type -------------------------------------------------------------------------------------


def test_string() -> None:
    name = p.String("name", pattern=r"[a-z]+", min_len=2, max_len=5)
    assert accepted(name, "abc") == "abc"
    assert "2-5 characters" in refused(name, "a")
    assert "2-5 characters" in refused(name, "abcdef")
    assert "text matching [a-z]+" in refused(name, "ab1")
    assert "without control characters" in refused(name, "ab\ncd")
    assert "text" in refused(name, 12)
    assert "does not start with '-'" in refused(p.String("flag"), "--help")
    assert accepted(p.String("flag", allow_dash=True), "--help") == "--help"
    assert accepted(p.String("msg"), "a; b && c | d $(e) `f` 'g' \"h\"") == "a; b && c | d $(e) `f` 'g' \"h\""


def test_int() -> None:
    lines = p.Int("lines", min=1, max=10)
    assert accepted(lines, 3) == 3
    assert accepted(lines, " 7 ") == 7
    for bad in (0, 11, "11", "x", "1.5", 1.5, True, None, [1]):
        assert "an integer from 1 to 10" in refused(lines, bad)
    assert "at least 0" in refused(p.Int("n", min=0), -1)
    assert "at most 5" in refused(p.Int("n", max=5), 6)
    assert accepted(p.Int("n"), "-4") == -4


def test_bool() -> None:
    flag = p.Bool("force")
    for raw, value in ((True, True), ("yes", True), ("ON", True), ("0", False), (False, False), ("off", False)):
        assert accepted(flag, raw) is value
    for bad in ("maybe", 1, None):
        assert "true or false" in refused(flag, bad)


def test_choice_and_radio() -> None:
    for kind in (p.Choice, p.Radio):
        action = kind("action", choices=("start", "stop"))
        assert accepted(action, "stop") == "stop"
        assert "one of start, stop" in refused(action, "reboot")
        assert "one of start, stop" in refused(action, "start; reboot")
        assert "text" in refused(action, ["start"])
    assert Param.from_schema(p.Radio("r", choices=("a", "b")).schema()).kind == "radio"


def test_multi_choice() -> None:
    checks = p.MultiChoice("checks", choices=("cpu", "disk", "mem"))
    assert accepted(checks, "cpu, disk,cpu") == ["cpu", "disk"]
    assert accepted(checks, ["mem"]) == ["mem"]
    assert accepted(checks, ("mem",)) == ["mem"]
    assert "items from cpu, disk, mem" in refused(checks, "cpu,net")
    assert "a list of" in refused(checks, [1])
    assert "a list of" in refused(checks, 3)


def test_host_pattern() -> None:
    hosts = p.HostPattern("targets")
    assert accepted(hosts, "web[01-03],db01,!web02") == "web[01-03],db01,!web02"
    for bad in ("web01; reboot", "-x", "a b", "$(x)", ""):
        assert "host names, groups or ranges" in refused(hosts, bad)


def test_path() -> None:
    path = p.Path("path", roots=("/var/log", "/srv"))
    assert accepted(path, "/var/log/syslog") == "/var/log/syslog"
    assert accepted(path, "/srv//app/./x.log") == "/srv/app/x.log"
    assert accepted(path, "/var/log/a;b $(c)") == "/var/log/a;b $(c)"  # literal characters, never a shell
    for bad in ("/etc/passwd", "/var/log/../../etc/passwd", "/var/log/..", "var/log/x", "/var/logs/x",
                "--help", "/var/log/a\nb", "~/x"):
        assert "an absolute path under /var/log, /srv" in refused(path, bad)
    assert "text" in refused(path, 1)


def test_script() -> None:
    script = p.Script("script", max_len=20)
    assert accepted(script, "#!/bin/sh\necho $1\n") == "#!/bin/sh\necho $1\n"
    assert "script text of 1-20 characters" in refused(script, "")
    assert "script text of 1-20 characters" in refused(script, "x" * 21)
    assert "without NUL bytes" in refused(script, "a\x00b")


def test_args() -> None:
    args = p.Args("args", max_items=3)
    assert accepted(args, "a 'b c' --flag") == ["a", "b c", "--flag"]
    assert accepted(args, "x;y $(z) `w`") == ["x;y", "$(z)", "`w`"]
    assert accepted(args, ["one arg", "-n"]) == ["one arg", "-n"]
    assert accepted(args, "") == []
    assert "no closing quotation" in refused(args, "a 'b")
    assert "control characters" in refused(args, "a\nb")
    assert "control characters" in refused(args, ["a\tb"])
    assert "at most 3 items and 4096 characters" in refused(args, "a b c d")
    assert "at most 3 items and 4096 characters" in refused(args, ["x" * 4097])
    assert "shell-style quoting" in refused(args, 5)


def test_shell_command() -> None:
    cmd = p.ShellCommand("cmd", max_len=50)
    assert accepted(cmd, "echo a | tr a b") == "echo a | tr a b"
    assert "a command of 1-50 characters" in refused(cmd, "   ")
    assert cmd.schema()["shell"] is True
    assert Param.from_schema(cmd.schema()) == cmd


def test_refusals_say_exactly_what_was_expected_and_what_came() -> None:
    """Whole messages, not fragments: the user reads them, and what came is part of the answer."""
    name, lines = p.String("name", pattern=r"[a-z]+", min_len=2, max_len=5), p.Int("n", min=1, max=10)
    args, choices, log = p.Args("args", max_items=3), ("cpu", "disk"), p.Path("path", roots=("/var/log",))
    quoting = "args: expected arguments with shell-style quoting"
    cases: list[tuple[Param, Any, str]] = [
        (name, "a", "name: expected 2-5 characters, got 'a'"),
        (name, "ab1", "name: expected text matching [a-z]+, got 'ab1'"),
        (name, "ab\ncd", "name: expected one line of text without control characters, got 'ab\\ncd'"),
        (name, "-x", "name: expected a value that does not start with '-', got '-x'"),
        (name, 12, "name: expected text, got 12"),
        (lines, True, "n: expected an integer from 1 to 10, got True"),
        (lines, 11, "n: expected an integer from 1 to 10, got 11"),
        (p.Int("n"), "x", "n: expected an integer, got 'x'"),
        (p.Bool("f"), "maybe", "f: expected true or false, got 'maybe'"),
        (p.Choice("a", choices=("start", "stop")), "reboot", "a: expected one of start, stop, got 'reboot'"),
        (p.MultiChoice("c", choices=choices), [1], "c: expected a list of cpu, disk, got [1]"),
        (p.MultiChoice("c", choices=choices), "cpu,net", "c: expected items from cpu, disk, got 'net'"),
        (p.HostPattern("t"), "a b", "t: expected host names, groups or ranges such as web[01-03], got 'a b'"),
        (log, "/etc/passwd", "path: expected an absolute path under /var/log, got '/etc/passwd'"),
        (log, "var/log/x", "path: expected an absolute path under /var/log, got 'var/log/x'"),
        (p.Script("s", max_len=20), "", "s: expected script text of 1-20 characters without NUL bytes"),
        (args, "a\nb", f"{quoting}, without control characters, got 'a\\nb'"),
        (args, "a 'b", f"{quoting} (no closing quotation), got \"a 'b\""),
        (args, 5, f"{quoting} as text, or a list of strings, got 5"),
        (args, "a b c d", f"{quoting}, at most 3 items and 4096 characters, got 'a b c d'"),
        (args, ["x", "a\tb"], f"{quoting}, without control characters, got 'a\\tb'"),
        (p.ShellCommand("cmd", max_len=50), "a\x00b", "cmd: expected a command of 1-50 characters"),
    ]
    for param, raw, message in cases:
        assert refused(param, raw) == message
    # What came is shown up to 60 characters, then cut to 57 and an ellipsis.
    short = p.String("s", max_len=5)
    assert refused(short, "x" * 60) == f"s: expected 0-5 characters, got '{'x' * 60}'"
    assert refused(short, "x" * 61) == f"s: expected 0-5 characters, got '{'x' * 57}...'"


def test_bounds_are_inclusive() -> None:
    name = p.String("name", min_len=2, max_len=5)
    assert accepted(name, "ab") == "ab" and accepted(name, "abcde") == "abcde"
    lines = p.Int("n", min=1, max=10)
    assert accepted(lines, 1) == 1 and accepted(lines, 10) == 10
    script = p.Script("s", max_len=3)
    assert accepted(script, "x") == "x" and accepted(script, "xyz") == "xyz"
    cmd = p.ShellCommand("cmd", max_len=3)
    assert accepted(cmd, "w") == "w" and accepted(cmd, "a b") == "a b"
    assert accepted(p.Args("args", max_items=2, max_len=4), "ab cd") == ["ab", "cd"]
    assert "at most 2 items and 4 characters" in refused(p.Args("args", max_items=2, max_len=4), "ab cde")
    # Declarations at their limits are usable.
    for param in (p.String("x", min_len=3, max_len=3), p.Int("x", min=2, max=2), p.Script("x", max_len=1),
                  p.Args("x", max_items=1, max_len=1), p.ShellCommand("x", max_len=1)):
        assert Param.from_schema(param.schema()) == param


def test_paths_refuse_dot_dot_even_when_it_stays_inside_a_root() -> None:
    path = p.Path("path", roots=("/var/log",))
    assert refused(path, "/var/log/app/../syslog") == ("path: expected an absolute path under /var/log, "
                                                       "got '/var/log/app/../syslog'")
    assert accepted(p.Path("path", roots=("/",)), "/etc/hosts") == "/etc/hosts"  # the root of all roots
    assert "under /srv/X" in refused(p.Path("path", roots=("/srv/X",)), "/srv/other")  # whole names only


def test_schemas_hold_lists_and_bad_declarations_are_named() -> None:
    assert p.Choice("x", choices=("a", "b")).schema() == {"kind": "choice", "name": "x", "help": "",
                                                          "required": True, "choices": ["a", "b"]}
    bad = {
        "choices must be a non-empty list of non-empty strings": {"kind": "choice", "name": "x", "choices": ["a", ""]},
        "choices lists a value twice": {"kind": "multi", "name": "x", "choices": ["a", "a"]},
        "root 'var/log' must be a normalized absolute path such as /var/log": {"kind": "path", "name": "x",
                                                                              "roots": ["var/log"]},
        "needs 0 <= min_len <= max_len, got 4 and 3": {"kind": "string", "name": "x", "min_len": 4, "max_len": 3},
        "max_len must be a positive integer, got 0": {"kind": "script", "name": "x", "max_len": 0},
        "max_items must be a positive integer, got 0": {"kind": "args", "name": "x", "max_items": 0},
        "max_len must be a positive integer, got '5'": {"kind": "args", "name": "x", "max_len": "5"},
        "max_len must be a positive integer, got -1": {"kind": "shell", "name": "x", "max_len": -1},
        "unknown schema keys for int: maxx, minn": {"kind": "int", "name": "x", "maxx": 3, "minn": 1},
    }
    for message, schema in bad.items():
        with pytest.raises(ValueError) as caught:
            Param.from_schema(schema)
        assert str(caught.value) == message


def test_schema_refuses_unknown_kinds_keys_and_bad_declarations() -> None:
    with pytest.raises(ValueError, match="unknown parameter kind"):
        Param.from_schema({"kind": "blob", "name": "x"})
    with pytest.raises(ValueError, match="unknown schema keys for int: maxx"):
        Param.from_schema({"kind": "int", "name": "x", "maxx": 3})
    with pytest.raises(ValueError, match="min 5 is above max 1"):
        Param.from_schema({"kind": "int", "name": "x", "min": 5, "max": 1})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        p.String("x", pattern="[").check()
    with pytest.raises(ValueError, match="at least one allow-listed root"):
        p.Path("x").check()
    with pytest.raises(ValueError, match="normalized absolute path"):
        p.Path("x", roots=("/var/log/",)).check()
    with pytest.raises(ValueError, match="non-empty list"):
        p.Choice("x").check()


# -- the loader ----------------------------------------------------------------------------------

GOOD = '''
from ombot.modules import Emit, Plan, module, params as p


@module("site.hello", category="demo", params=[p.String("who", help="whom to greet")])
def run(who: str) -> Plan:
    """Greet someone from a site module."""
    return Plan(Emit(f"hello {who}"))
'''

BAD_FILES = {
    "duplicate name": ('''
        from ombot.modules import Emit, Plan, module

        @module("echo", category="demo")
        def run() -> Plan:
            """Shadow the built-in echo."""
            return Plan(Emit("x"))
        ''', "module name 'echo' is already defined in"),
    "reserved command word": ('''
        from ombot.modules import Emit, Plan, module

        @module("status", category="demo")
        def run() -> Plan:
            """Collide with a chat command."""
            return Plan(Emit("x"))
        ''', "'status' collides with the reserved command word"),
    "reserved parameter": ('''
        from ombot.modules import Emit, Plan, module, params as p

        @module("site.where", category="demo", params=[p.String("idc")])
        def run(idc: str) -> Plan:
            """Take a parameter the router owns."""
            return Plan(Emit(idc))
        ''', "parameter name 'idc' is reserved"),
    "two modules in one file": ('''
        from ombot.modules import Emit, Plan, module

        @module("site.one", category="demo")
        def run() -> Plan:
            """First."""
            return Plan(Emit("1"))

        @module("site.two", category="demo")
        def run() -> Plan:
            """Second, hiding the first under the same name."""
            return Plan(Emit("2"))
        ''', "declares exactly one @module, found 2 (site.one, site.two)"),
    "no module": ('''
        X = 1
        ''', "declares exactly one @module, found 0"),
    "shell parameter with low risk": ('''
        from ombot.modules import Plan, Shell, module, params as p

        @module("site.sh", category="demo", risk="low", params=[p.ShellCommand("cmd")])
        def run(cmd: str) -> Plan:
            """A shell that claims to be harmless."""
            return Plan(Shell(cmd))
        ''', "a ShellCommand parameter requires risk='high'"),
    "run() signature mismatch": ('''
        from ombot.modules import Emit, Plan, module, params as p

        @module("site.sig", category="demo", params=[p.String("who")])
        def run(whom: str) -> Plan:
            """Takes the wrong name."""
            return Plan(Emit(whom))
        ''', "run() must take exactly its declared parameters (who), got run(whom)"),
    "syntax error": ('''
        from ombot.modules import Plan, module
        def run(:
        ''', "failed to import: SyntaxError"),
    "bad parameter schema": ('''
        from ombot.modules import Emit, Plan, module, params as p

        @module("site.roots", category="demo", params=[p.Path("where")])
        def run(where: str) -> Plan:
            """A path with no allowed roots."""
            return Plan(Emit(where))
        ''', "parameter 'where': a Path needs at least one allow-listed root"),
    "default that does not convert": ('''
        from ombot.modules import Emit, Plan, module, params as p

        @module("site.dflt", category="demo", params=[p.Int("n", min=1, max=5, required=False, default=9)])
        def run(n: int) -> Plan:
            """Bad default."""
            return Plan(Emit(str(n)))
        ''', "default of n: expected an integer from 1 to 5"),
    "missing docstring": ('''
        from ombot.modules import Emit, Plan, module

        @module("site.nodoc", category="demo")
        def run() -> Plan:
            return Plan(Emit("x"))
        ''', "run() needs a docstring"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_loader_refuses_bad_module_files(tmp_path: Path, case: str) -> None:
    source, reason = BAD_FILES[case]
    bad = tmp_path / "bad_module.py"
    bad.write_text(textwrap.dedent(source))
    (tmp_path / "good.py").write_text(GOOD)
    with pytest.raises(ModuleLoadError) as caught:
        load_modules([tmp_path])
    assert str(bad) in str(caught.value)
    assert reason in str(caught.value)


def test_loader_refuses_duplicates_across_site_dirs_and_missing_dirs(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "hello.py").write_text(GOOD)
    with pytest.raises(ModuleLoadError, match=r"b/hello\.py: module name 'site.hello' is already defined in .*a/hello\.py"):
        load_modules([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ModuleLoadError, match="module directory does not exist"):
        load_modules([tmp_path / "nowhere"])


def test_loader_loads_builtins_and_site_modules(tmp_path: Path) -> None:
    (tmp_path / "hello.py").write_text(GOOD)
    (tmp_path / "_helpers.py").write_text("raise RuntimeError('files starting with _ are not modules')")
    loaded = load_modules([tmp_path])
    assert {"echo", "shell.exec", "script.run", "service", "log.tail", "file.push", "site.hello"} <= set(loaded)
    hello = loaded["site.hello"]
    assert hello.plan(hello.validate({"who": "ops"})) == Plan(Emit("hello ops"))
    assert hello.source == str(tmp_path / "hello.py")


# -- a module's validation names every problem at once -------------------------------------------


def test_validation_names_every_problem_not_only_the_first() -> None:
    service = load_modules([])["service"]
    with pytest.raises(ParamError) as caught:
        service.validate({"action": "explode", "name": "-x", "extra": "1"})
    assert str(caught.value) == ("extra: expected a parameter of service (one of action, name)\n"
                                 "action: expected one of start, stop, restart, reload, status, got 'explode'\n"
                                 "name: expected a value that does not start with '-', got '-x'")
    assert [e.param for e in caught.value.problems] == ["extra", "action", "name"]
    assert caught.value.param == "extra"
    # Callers add the usage line as ParamError(param, expected + note): every problem stays in it.
    noted = ParamError(caught.value.param, caught.value.expected + "\nusage: service TARGETS")
    assert str(noted) == str(caught.value) + "\nusage: service TARGETS"


def test_every_missing_parameter_is_named() -> None:
    with pytest.raises(ParamError) as caught:
        load_modules([])["service"].validate({})
    assert str(caught.value) == ("action: expected a value (what to do with the service)\n"
                                 "name: expected a value (service name, e.g. nginx or getty@tty1)")


def test_one_problem_is_reported_alone() -> None:
    with pytest.raises(ParamError) as caught:
        load_modules([])["echo"].validate({"message": "-x"})
    assert str(caught.value) == "message: expected a value that does not start with '-', got '-x'"
    assert caught.value.problems == (caught.value,) and caught.value.expected == "a value that does not start with '-'"
    assert ParamError.combine([caught.value]) is caught.value


def test_combining_keeps_each_problem_once_in_order() -> None:
    a, b, c = ParamError("a", "x"), ParamError("b", "y", got=1), ParamError("c", "z")
    combined = ParamError.combine([ParamError.combine([a, b]), c])
    assert combined.problems == (a, b, c)
    assert str(combined) == "a: expected x\nb: expected y, got 1\nc: expected z"
    assert (combined.param, combined.expected) == ("a", "x\nb: expected y, got 1\nc: expected z")


# -- through a real master -------------------------------------------------------------------------


def test_master_with_a_bad_site_module_refuses_to_start(make_cluster, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "status.py").write_text(textwrap.dedent(BAD_FILES["reserved command word"][0]))
    cluster: Cluster = make_cluster(module_dirs=[site])  # [modules] dirs = [...] in its ombot.toml
    with pytest.raises(RuntimeError, match="exited"):
        cluster.start("m1")
    proc = cluster.processes["m1"]
    assert proc.proc is not None and proc.proc.returncode not in (0, None)
    assert f"{site / 'status.py'}: module name 'status' collides with the reserved command word" in proc.log()


def test_site_module_appears_after_restart(make_cluster, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    cluster: Cluster = make_cluster(module_dirs=[site])
    master = cluster.start("m1")
    router = cluster.router()
    try:
        assert "site.hello" not in router.catalog("local").modules
        (site / "hello.py").write_text(GOOD)
        assert "site.hello" not in router.catalog("local").modules  # loaded at start only
        master.stop()
        cluster.start("m1")
        catalog = router.catalog("local")
        assert catalog.modules["site.hello"].description == "Greet someone from a site module."
        ref, _ = router.submit("local", "site.hello", {"who": "ops"}, ["localhost"])
        events: list[dict] = []
        assert router.follow(ref, events.append) == "ok"
        assert [e["data"]["stdout"] for e in events if e["kind"] == "host"] == ["hello ops\n"]
    finally:
        router.close()
