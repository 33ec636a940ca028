"""Shell injection, through a real master, into every string parameter of every built-in module.

shell.exec's `cmd` is the one parameter meant for a shell and is left out. Every other value is
either refused at submit (`invalid_params`, naming the parameter) or reaches the host literally,
as one argv item or as file content; a canary file proves that nothing extra ever ran.
"""

from __future__ import annotations

import shlex
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ombot.envelope import Refused
from ombot.modules import load_modules
from ombot.modules.params import Args, Path as PathParam, Script, ShellCommand, String
from tests.support import Cluster

CANARY = Path(f"/tmp/ombot-canary-{uuid.uuid4().hex}")
PAYLOADS = [
    f"; touch {CANARY}",
    f" && touch {CANARY}",
    f" | touch {CANARY}",
    f" || touch {CANARY}",
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"\ntouch {CANARY}",
    f"\rtouch {CANARY}",
    f"' ; touch {CANARY} ; '",
    f'" ; touch {CANARY} ; "',
    f"' $(touch {CANARY}) \"",
    f" > {CANARY}",
    f" & touch {CANARY} &",
    f"${{IFS}}touch${{IFS}}{CANARY}",
    f"--output={CANARY}",
    "--help",
    f"-n 1 {CANARY}",
]
ARGS_PRINTER = '#!/bin/sh\nprintf "<%s>\\n" "$@"\n'
SCRIPT_PREFIX = '#!/bin/sh\ncat -- "$0"\nexit 0\n'  # prints itself: the pushed file must equal the text sent
STORE_CONTENT = "pushed from the store\n"


@dataclass
class World:
    """A master plus the directories the injected values point into."""

    router: Any
    log_dir: Path  # under /var/log, log.tail's root
    push_dir: Path  # under /tmp, one of file.push's roots
    outside: Path  # under neither


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    cluster = Cluster(tmp_path_factory.mktemp("injection"), {"local": ["m1"]})
    files = cluster.root / "state-m1" / "files"
    files.mkdir(parents=True)
    (files / "app.conf").write_text(STORE_CONTENT)
    log_dir = Path("/var/log") / f"ombot-injection-{uuid.uuid4().hex[:8]}"
    log_dir.mkdir()
    (log_dir / "app.log").write_text("one\ntwo\n")
    outside = log_dir / "not-a-push-root"  # /var/log is not a file.push root
    outside.mkdir()
    cluster.start("m1")
    router = cluster.router()
    try:
        yield World(router, log_dir, tmp_path_factory.mktemp("push"), outside)
    finally:
        router.close()
        cluster.stop_all()
        shutil.rmtree(log_dir, ignore_errors=True)
        CANARY.unlink(missing_ok=True)


def submit(world: World, module: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run a job on localhost and return its one host result (Refused propagates)."""
    ref, _ = world.router.submit("local", module, params, ["localhost"])
    events: list[dict[str, Any]] = []
    world.router.follow(ref, events.append)
    [host] = [e["data"] for e in events if e["kind"] == "host"]
    return host


def assert_refused_naming(exc: Refused, param: str) -> None:
    assert exc.code == "invalid_params", exc.as_dict()
    assert exc.details.get("param") == param, exc.as_dict()
    assert exc.message.startswith(f"{param}: expected "), exc.message


# -- every string parameter of every built-in --------------------------------------------------------


@dataclass
class Target:
    """How to inject into one parameter and how to tell that a value arrived literally."""

    base: Callable[[World], dict[str, Any]]  # valid values for the module's other parameters
    value: Callable[[World, str], str]  # the injected value for a payload
    verify: Callable[[World, str, dict[str, Any]], None] | None = None  # None: every payload must be refused
    prepare: Callable[[World, str], None] | None = None


def suffix(prefix: Callable[[World], str]) -> Callable[[World, str], str]:
    """Payloads follow a plausible value; option lookalikes stand alone, where an option would go."""
    return lambda w, payload: payload if payload.startswith("-") else prefix(w) + payload


def create_file_at(world: World, value: str) -> None:
    """log.tail must show exactly the file named by the value, so make that file."""
    if value.startswith(str(world.log_dir) + "/"):
        Path(value).parent.mkdir(parents=True, exist_ok=True)
        Path(value).write_text(f"content of {value!r}\n")


def create_parent_of(world: World, value: str) -> None:
    if value.startswith(str(world.push_dir) + "/"):
        Path(value).parent.mkdir(parents=True, exist_ok=True)


def expect(actual: str, wanted: str) -> None:
    assert actual == wanted, f"{actual!r} != {wanted!r}"


TARGETS: dict[tuple[str, str], Target] = {
    ("echo", "message"): Target(
        base=lambda w: {}, value=suffix(lambda w: "hello"),
        verify=lambda w, v, host: expect(host["stdout"], v + "\n")),
    ("script.run", "args"): Target(
        base=lambda w: {"script": ARGS_PRINTER}, value=suffix(lambda w: "a"),
        verify=lambda w, v, host: expect(host["stdout"], "".join(f"<{a}>\n" for a in shlex.split(v)))),
    ("script.run", "script"): Target(  # code by design, but pushed byte for byte, never through a shell
        base=lambda w: {}, value=lambda w, payload: SCRIPT_PREFIX + payload,
        verify=lambda w, v, host: expect(host["stdout"], v)),
    ("service", "action"): Target(base=lambda w: {"name": "nginx"}, value=suffix(lambda w: "status")),
    ("service", "name"): Target(base=lambda w: {"action": "status"}, value=suffix(lambda w: "nginx")),
    ("log.tail", "path"): Target(
        base=lambda w: {"lines": 5}, value=suffix(lambda w: f"{w.log_dir}/f"), prepare=create_file_at,
        verify=lambda w, v, host: expect(host["stdout"], f"content of {v!r}\n")),
    ("log.tail", "lines"): Target(base=lambda w: {"path": f"{w.log_dir}/app.log"}, value=suffix(lambda w: "5")),
    ("file.push", "source"): Target(base=lambda w: {"dest": f"{w.push_dir}/x"}, value=suffix(lambda w: "app.conf")),
    ("file.push", "dest"): Target(
        base=lambda w: {"source": "app.conf"}, value=suffix(lambda w: f"{w.push_dir}/f"), prepare=create_parent_of,
        verify=lambda w, v, host: expect(Path(v).read_text(), STORE_CONTENT)),
    ("file.push", "mode"): Target(base=lambda w: {"source": "app.conf", "dest": f"{w.push_dir}/x"},
                                  value=suffix(lambda w: "0644")),
    ("file.push", "owner"): Target(base=lambda w: {"source": "app.conf", "dest": f"{w.push_dir}/x"},
                                   value=suffix(lambda w: "root")),
    ("file.push", "group"): Target(base=lambda w: {"source": "app.conf", "dest": f"{w.push_dir}/x"},
                                   value=suffix(lambda w: "root")),
    ("ansible.playbook", "playbook"): Target(base=lambda w: {}, value=suffix(lambda w: "motd")),
    ("salt.state", "state"): Target(base=lambda w: {}, value=suffix(lambda w: "nginx")),  # tests/test_salt.py too
    # The interpreter the rollout runs on the host: only a fixed path shape passes (tests/test_rollout.py runs it).
    ("audit.rollout", "python"): Target(base=lambda w: {}, value=suffix(lambda w: "/usr/bin/python3")),
    ("audit.remove", "python"): Target(base=lambda w: {}, value=suffix(lambda w: "/usr/bin/python3")),
}


def test_every_text_parameter_of_every_builtin_is_covered() -> None:
    text_kinds = (String, PathParam, Args, Script, ShellCommand)
    declared = {(m.name, p.name) for m in load_modules().values() for p in m.params if isinstance(p, text_kinds)}
    # ansible.playbook's vars run only on an Ansible master: tests/test_playbook.py sends them there.
    assert declared - set(TARGETS) == {("shell.exec", "cmd"), ("ansible.playbook", "vars")}


@pytest.mark.parametrize("module,param", sorted(TARGETS), ids=[f"{m}.{p}" for m, p in sorted(TARGETS)])
def test_injection_is_refused_or_literal(world: World, module: str, param: str) -> None:
    target = TARGETS[(module, param)]
    literal = 0
    for payload in PAYLOADS:
        value = target.value(world, payload)
        if target.prepare:
            target.prepare(world, value)
        try:
            host = submit(world, module, {**target.base(world), param: value})
        except Refused as exc:
            assert_refused_naming(exc, param)
        else:
            assert target.verify is not None, f"{module} accepted {param}={value!r}; it should be refused"
            assert host["status"] == "ok", (value, host)
            target.verify(world, value, host)
            literal += 1
        assert not CANARY.exists(), f"{module} {param}={value!r} ran the payload"
    assert target.verify is None or literal > 0, f"no payload reached the host through {module}.{param}"


# -- wrong types, ranges, paths and names ------------------------------------------------------------

LOG = "/var/log/ombot-no-such.log"
BAD_VALUES = [
    ("log.tail", {"path": LOG, "lines": "ten"}, "lines", "an integer from 1 to 10000"),
    ("log.tail", {"path": LOG, "lines": 0}, "lines", "an integer from 1 to 10000"),
    ("log.tail", {"path": LOG, "lines": 10001}, "lines", "an integer from 1 to 10000"),
    ("log.tail", {"path": LOG, "lines": -3}, "lines", "an integer from 1 to 10000"),
    ("log.tail", {"path": LOG, "lines": 2.5}, "lines", "an integer from 1 to 10000"),
    ("log.tail", {"path": LOG, "lines": True}, "lines", "an integer from 1 to 10000"),
    ("log.tail", {"path": LOG, "lines": [5]}, "lines", "an integer from 1 to 10000"),
    ("log.tail", {"path": "/etc/shadow"}, "path", "an absolute path under /var/log"),
    ("log.tail", {"path": "/var/log/../../etc/shadow"}, "path", "an absolute path under /var/log"),
    ("log.tail", {"path": "/var/log/apt/../../../etc/shadow"}, "path", "an absolute path under /var/log"),
    ("log.tail", {"path": "/var/log/.."}, "path", "an absolute path under /var/log"),
    ("log.tail", {"path": "var/log/syslog"}, "path", "an absolute path under /var/log"),
    ("log.tail", {"path": "/var/logs/syslog"}, "path", "an absolute path under /var/log"),
    ("log.tail", {"path": "/var/log/a\x00b"}, "path", "an absolute path under /var/log"),
    ("log.tail", {"path": ["/var/log/syslog"]}, "path", "text"),
    ("file.push", {"source": "app.conf", "dest": "/etc/cron.d/evil"}, "dest", "an absolute path under /opt"),
    ("file.push", {"source": "app.conf", "dest": "/tmp/../etc/passwd"}, "dest", "an absolute path under /opt"),
    ("file.push", {"source": "app.conf", "dest": "/optimal/x"}, "dest", "an absolute path under /opt"),
    ("file.push", {"source": "../../../etc/shadow", "dest": "/tmp/x"}, "source", "text matching"),
    ("file.push", {"source": "/etc/shadow", "dest": "/tmp/x"}, "source", "text matching"),
    ("file.push", {"source": "app.conf", "dest": "/tmp/x", "mode": "4755"}, "mode", "text matching"),
    ("file.push", {"source": "app.conf", "dest": "/tmp/x", "mode": "0o644"}, "mode", "text matching"),
    ("file.push", {"source": "app.conf", "dest": "/tmp/x", "mode": "rwxr-xr-x"}, "mode", "text matching"),
    ("file.push", {"source": "app.conf", "dest": "/tmp/x", "mode": 644}, "mode", "text"),
    ("file.push", {"source": "app.conf", "dest": "/tmp/x", "owner": "Root Admin"}, "owner", "text matching"),
    ("file.push", {"source": "app.conf", "dest": "/tmp/x", "group": "-g0"}, "group", "does not start with '-'"),
    ("service", {"action": "reboot", "name": "nginx"}, "action", "one of start, stop, restart, reload, status"),
    ("service", {"action": ["start"], "name": "nginx"}, "action", "text"),
    ("service", {"action": "start", "name": "../nginx"}, "name", "text matching"),
    ("service", {"action": "start", "name": "n" * 129}, "name", "0-128 characters"),
    ("echo", {"message": 123}, "message", "text"),
    ("script.run", {"script": "#!/bin/sh\n", "args": "it's"}, "args", "no closing quotation"),
    ("script.run", {"script": "#!/bin/sh\n", "args": {"a": 1}}, "args", "shell-style quoting"),
    ("script.run", {"script": "#!/bin/sh\n\x00"}, "script", "without NUL bytes"),
    ("shell.exec", {"cmd": 5}, "cmd", "text"),
    # missing and unknown parameters, including the reserved keys, which are not module parameters
    ("service", {"action": "status"}, "name", "a value"),
    ("echo", {"message": "x", "extra": "y"}, "extra", "a parameter of echo (one of message)"),
    ("log.tail", {"path": LOG, "idc": "local"}, "idc", "a parameter of log.tail (one of lines, path)"),
    ("shell.exec", {"cmd": "true", "dry_run": True}, "dry_run", "a parameter of shell.exec (one of cmd)"),
    ("ping", {"timeout": 5}, "timeout", "a parameter of ping (no parameters)"),
]


@pytest.mark.parametrize("module,params,param,expected", BAD_VALUES, ids=[f"{b[0]}.{b[2]}-{i}" for i, b in enumerate(BAD_VALUES)])
def test_bad_values_are_refused_naming_the_parameter(world: World, module: str, params: dict[str, Any],
                                                     param: str, expected: str) -> None:
    with pytest.raises(Refused) as caught:
        world.router.submit("local", module, params, ["localhost"])
    assert_refused_naming(caught.value, param)
    assert expected in caught.value.message


# -- symlinks are resolved on the host ---------------------------------------------------------------


def test_log_tail_refuses_symlinks_leading_out_of_var_log(world: World, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    (world.log_dir / "link.log").symlink_to(secret)
    (world.log_dir / "linkdir").symlink_to(tmp_path)
    for path in (world.log_dir / "link.log", world.log_dir / "linkdir" / "secret.txt"):
        host = submit(world, "log.tail", {"path": str(path)})
        assert host["status"] == "failed"
        assert host["error"] == f"path: {path} resolves to {secret}, outside /var/log"
        assert "secret" not in host["stdout"]


def test_log_tail_follows_symlinks_that_stay_inside(world: World) -> None:
    (world.log_dir / "current.log").symlink_to(world.log_dir / "app.log")
    host = submit(world, "log.tail", {"path": str(world.log_dir / "current.log"), "lines": 1})
    assert (host["status"], host["stdout"]) == ("ok", "two\n")


def test_file_push_refuses_symlinks_leading_out_of_its_roots(world: World) -> None:
    victim = world.outside / "victim.conf"
    victim.write_text("original\n")
    link_dir = world.push_dir / "linked-dir"
    link_dir.symlink_to(world.outside)
    link_file = world.push_dir / "linked.conf"
    link_file.symlink_to(victim)
    for dest, real in ((link_dir / "victim.conf", victim), (link_dir / "new.conf", world.outside / "new.conf"),
                       (link_file, victim)):
        host = submit(world, "file.push", {"source": "app.conf", "dest": str(dest)})
        assert host["status"] == "failed"
        assert host["error"] == f"dest: {dest} resolves to {real}, outside /opt, /srv, /tmp, /var/tmp"
    assert victim.read_text() == "original\n"
    assert sorted(p.name for p in world.outside.iterdir()) == ["victim.conf"]
