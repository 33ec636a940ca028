"""Test shells read only what the test gives them (tests/shells.py, issue 17).

The proof that can fail: a machine whose global rc files are hooked, simulated without touching the
real /etc. An outer private mount namespace puts marker files over /etc/bash.bashrc and
/etc/zsh/{zshenv,zshrc} (the rc files also source a second, "machine" install of OMBot's hook, as
on a server where the hook is installed), and this file's `test_inside_*` checks run in a pytest
started inside it: a plain `bash -i` / `zsh -i` there sees the markers and carries both hooks (the
old way: what failed the zsh suite), while `Shell` and `Zsh` see none of it and record through the
test root's hook only. Those checks exist only in that inner run (OMBOT_TEST_HOOKED_MACHINE set)."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from ombot.audit_agent import hook, spool
from tests import shells
from tests.shells import PROMPT, ZPROMPT, ZSH, Shell, Unavailable, Zsh, isolated_argv
from tests.support import REPO, child_env

HOOKED_MACHINE = "OMBOT_TEST_HOOKED_MACHINE"  # set (to a JSON description) only inside the outer namespace
INSIDE: dict[str, Any] | None = json.loads(os.environ[HOOKED_MACHINE]) if os.environ.get(HOOKED_MACHINE) else None
MARK = "machine-rc-read"


def needs_namespace() -> None:
    try:
        shells.namespace_mode()
    except Unavailable as exc:
        pytest.skip(str(exc))


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)


def commands(spool_dir: Path) -> list[tuple[int, str]]:
    """(uid, command) of every record in the spool, as the agent reads them."""
    events = [e for chunk in spool.scan(spool_dir, {}, set()) for e in chunk.events]
    return [(data["uid"], data["command"].strip()) for kind, _, data in events if kind == "command"]


def spool_of(root: Path) -> Path:
    return root / hook.DEFAULT_SPOOL_DIR.lstrip("/")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A world-traversable directory (0755), for shells that run as another user."""
    base = Path(tempfile.mkdtemp(prefix="ombot-test-shells-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


# -- the helper itself -------------------------------------------------------------------------------------


def test_files_are_placed_and_hidden_and_the_machine_etc_is_untouched(tmp_path: Path) -> None:
    needs_namespace()
    targets = [p for p in ("/etc/bash.bashrc", "/etc/inputrc", "/etc/profile") if os.path.isfile(p)]
    if len(targets) < 2 or not os.path.isdir("/etc/profile.d"):
        pytest.skip("this machine lacks the /etc files the test covers")
    placed, hidden = targets[0], targets[1]
    before = {p: Path(p).read_bytes() for p in targets}
    tricky = tmp_path / "a b'$(touch pwned)\"`touch pwned2`;.rc"  # a path never pasted into shell text
    tricky.write_text("mine\n")
    script = ('cat "$1"; echo "|"; cat "$2"; echo "|"; ls -A /etc/profile.d; echo "|"; '
              '{ echo x >> "$2"; } 2>/dev/null || echo read-only; ls /etc/ombot-no-such-file 2>/dev/null || echo absent')
    argv = isolated_argv(["sh", "-c", script, "sh", placed, hidden],
                         {placed: tricky, hidden: None, "/etc/profile.d": None, "/etc/ombot-no-such-file": None})
    out = run(argv, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "mine\n|\n|\n|\nread-only\nabsent\n"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    assert {p: Path(p).read_bytes() for p in targets} == before  # the machine's files, as they were
    assert Path(placed) not in [Path(m.split()[4]) for m in Path("/proc/self/mountinfo").read_text().splitlines()]
    with pytest.raises(ValueError, match="absolute"):
        isolated_argv(["true"], {"etc/bash.bashrc": None})
    with pytest.raises(ValueError, match="does not exist on this machine"):
        isolated_argv(["true"], {"/etc/ombot-no-such-file": tricky})
    with pytest.raises(ValueError, match="same kind"):
        isolated_argv(["true"], {"/etc/profile.d": tricky})


def test_another_user_gets_the_covers_and_cannot_lift_them(tmp_path: Path, open_dir: Path) -> None:
    needs_namespace()
    if not shells.real_root():
        pytest.skip("running a shell as another user needs root")
    if not os.path.isfile("/etc/bash.bashrc"):
        pytest.skip("this machine has no /etc/bash.bashrc to cover")
    mine = tmp_path / "bashrc"  # under a 0700 directory: read through /etc, its own mode is what counts
    mine.write_text("mine\n")
    script = "id -u; id -g; cat /etc/bash.bashrc; umount /etc/bash.bashrc 2>/dev/null && echo lifted; cat /etc/bash.bashrc"
    out = run(isolated_argv(["sh", "-c", script], {"/etc/bash.bashrc": mine}, user="nobody"))
    nobody = pwd.getpwnam("nobody")
    assert out.stdout.split() == [str(nobody.pw_uid), str(nobody.pw_gid), "mine", "mine"], out.stderr
    # a home the user cannot reach is refused up front, saying what to do
    root = tmp_path / "root"
    hook.install(root)
    with pytest.raises(ValueError, match="mkdtemp"):
        Shell(root, tmp_path / "home", user="nobody")
    with pytest.raises(ValueError, match="no such user"):
        isolated_argv(["true"], {}, user="ombot-no-such-user")


# -- the proof: a hooked machine, simulated in an outer namespace ------------------------------------------


def _first_read(candidates: tuple[str, ...], binary: str | None) -> str | None:
    """The first of these global files that exists here and that the shell's binary names."""
    return next((p for p in candidates if os.path.isfile(p) and shells._binary_mentions(binary, p)), None)


@pytest.mark.slow
def test_shells_ignore_a_hooked_machine(tmp_path: Path) -> None:
    if INSIDE is not None:
        pytest.skip("this is the outer test")
    needs_namespace()
    bashrc = _first_read(("/etc/bash.bashrc",), shells.BASH)
    if bashrc is None:
        pytest.skip("this bash reads no /etc/bash.bashrc: no machine file to simulate")
    machine = tmp_path / "machine"  # OMBot's hook as a real install on this machine would have it
    hook.install(machine)
    fake = tmp_path / "fake-etc"
    fake.mkdir()
    marker = f'export OMBOT_MACHINE_RC={{}}; echo "{MARK}: {{}}"\n'
    (fake / "bash.bashrc").write_text(marker.format("bash.bashrc", bashrc) + (machine / hook.BASHRC).read_text())
    outer: dict[str, str | os.PathLike[str] | None] = {bashrc: fake / "bash.bashrc"}
    zshenv = _first_read(("/etc/zsh/zshenv", "/etc/zshenv"), ZSH)
    zshrc = _first_read(("/etc/zsh/zshrc", "/etc/zshrc"), ZSH)
    with_zsh = zshenv is not None and zshrc is not None and (machine / hook.ZSHRC).exists()
    if with_zsh:
        assert zshenv is not None and zshrc is not None
        (fake / "zshenv").write_text(f'export OMBOT_MACHINE_ZSHENV=read; echo "{MARK}: {zshenv}"\n')
        (fake / "zshrc").write_text(marker.format("zshrc", zshrc) + (machine / hook.ZSHRC).read_text())
        outer |= {zshenv: fake / "zshenv", zshrc: fake / "zshrc"}
    nobody = shells.real_root()
    inside = {"machine_spool": str(spool_of(machine)), "zsh": with_zsh, "nobody": nobody}
    argv = isolated_argv([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                          "-k", "inside", f"--basetemp={tmp_path / 'inner'}"], outer)
    proc = run(argv, env=child_env({HOOKED_MACHINE: json.dumps(inside)}), cwd=REPO)
    expected = 2 + 2 * with_zsh + nobody
    assert proc.returncode == 0 and re.search(rf"\b{expected} passed\b", proc.stdout), proc.stdout + proc.stderr
    assert "skipped" not in proc.stdout, proc.stdout
    assert Path(bashrc).read_text() != (fake / "bash.bashrc").read_text()  # out here: the machine's own


def _plain(argv: list[str], home: Path, env: dict[str, str], prompt: str) -> tuple[pexpect.spawn, str]:
    """A shell spawned the old way: straight from pexpect, reading whatever the machine has."""
    child = pexpect.spawn(argv[0], argv[1:], env={"PATH": os.environ["PATH"], "TERM": "dumb", **env},
                          encoding="utf-8", timeout=20, cwd=str(home))
    child.expect_exact(prompt)
    return child, str(child.before)


def _say(child: pexpect.spawn, line: str, prompt: str) -> str:
    child.sendline(line)
    child.expect_exact(prompt)
    return str(child.before)


if INSIDE is not None:
    MACHINE_SPOOL = Path(INSIDE["machine_spool"])

    def test_inside_a_plain_bash_reads_the_machine_rc(tmp_path: Path) -> None:
        """The old way, in the simulated machine: the marker shows, and both hooks record."""
        root = tmp_path / "root"
        hook.install(root)
        home = tmp_path / "home"
        home.mkdir()
        (home / ".bashrc").write_text(f". {root / hook.BASHRC}\nPS1='{PROMPT}'\n")
        before = commands(MACHINE_SPOOL)
        child, startup = _plain(["bash", "-i"], home, {"HOME": str(home), "HISTFILE": str(home / ".hist")}, PROMPT)
        seen = _say(child, "echo rc=${OMBOT_MACHINE_RC-none} plain-bash", PROMPT)
        child.sendline("exit")
        child.expect(pexpect.EOF)
        assert MARK in startup and "rc=bash.bashrc plain-bash" in seen
        line = "echo rc=${OMBOT_MACHINE_RC-none} plain-bash"
        # the machine's hook took the shell (the test's own, sourced later, records nothing then)
        assert (os.getuid(), line) in commands(MACHINE_SPOOL)[len(before):]

    def test_inside_the_helpers_bash_reads_only_the_test_root(tmp_path: Path) -> None:
        root = tmp_path / "root"
        hook.install(root)
        before = commands(MACHINE_SPOOL)
        shell = Shell(root, tmp_path / "home")
        assert shell.armed  # by ROOT/etc/bash.bashrc, seen as /etc/bash.bashrc
        seen = shell.run("echo rc=${OMBOT_MACHINE_RC-none} helper-bash")
        shell.close()
        bare = Shell(None, tmp_path / "bare")  # no hook at all: nothing records
        bare.run("echo bare-bash")
        bare.close()
        assert MARK not in shell.startup and "rc=none helper-bash" in seen
        assert commands(spool_of(root)) == [(os.getuid(), "echo rc=${OMBOT_MACHINE_RC-none} helper-bash")]
        assert commands(MACHINE_SPOOL) == before

    if INSIDE["zsh"]:

        def test_inside_a_plain_zsh_reads_the_machine_rc(tmp_path: Path) -> None:
            root = tmp_path / "root"
            hook.install(root)
            home = tmp_path / "home"
            home.mkdir()
            (home / ".zshrc").write_text(f". {root / hook.ZSHRC}\nPROMPT='{ZPROMPT}'\nunsetopt PROMPT_SP\n")
            env = {"HOME": str(home), "ZDOTDIR": str(home), "HISTFILE": str(home / ".hist")}
            before = commands(MACHINE_SPOOL)
            child, startup = _plain([str(ZSH), "-i"], home, env, ZPROMPT)
            line = "echo rc=${OMBOT_MACHINE_RC-none} env=${OMBOT_MACHINE_ZSHENV-none} plain-zsh"
            seen = _say(child, line, ZPROMPT)
            child.sendline("exit")
            child.expect(pexpect.EOF)
            assert MARK in startup and "rc=zshrc env=read plain-zsh" in seen
            assert (os.getuid(), line) in commands(MACHINE_SPOOL)[len(before):]  # the machine's hook took it

        def test_inside_the_helpers_zsh_reads_only_the_test_root(tmp_path: Path) -> None:
            root = tmp_path / "root"
            hook.install(root)
            before = commands(MACHINE_SPOOL)
            shell = Zsh(root, tmp_path / "home")
            assert shell.armed  # by ROOT/etc/zsh/zshrc, seen as /etc/zsh/zshrc
            line = "echo rc=${OMBOT_MACHINE_RC-none} env=${OMBOT_MACHINE_ZSHENV-none} helper-zsh"
            seen = shell.run(line)
            shell.close()
            assert MARK not in shell.startup and "rc=none env=none helper-zsh" in seen
            assert commands(spool_of(root)) == [(os.getuid(), line), (os.getuid(), "exit")]  # exit: from zshexit
            assert commands(MACHINE_SPOOL) == before

    if INSIDE["nobody"]:

        def test_inside_nobody_types_in_a_hooked_shell(open_dir: Path) -> None:
            """The attack tests' setting: `nobody` in a shell hooked by the test root only."""
            root = open_dir / "root"
            hook.install(root)
            before = commands(MACHINE_SPOOL)
            uid = pwd.getpwnam("nobody").pw_uid
            shell = Shell(root, open_dir / "home", user="nobody", env={"LOGNAME": "nobody"})
            seen = shell.run("echo uid=$(id -u) rc=${OMBOT_MACHINE_RC-none} nobody-bash")
            shell.close()
            assert MARK not in shell.startup and f"uid={uid} rc=none nobody-bash" in seen
            expected = [(uid, "echo uid=$(id -u) rc=${OMBOT_MACHINE_RC-none} nobody-bash")]
            if INSIDE is not None and INSIDE["zsh"]:
                z = Zsh(root, open_dir / "zhome", user="nobody")
                z.run("echo nobody-zsh ${OMBOT_MACHINE_ZSHENV-none}")
                z.close()
                assert MARK not in z.startup
                expected += [(uid, "echo nobody-zsh ${OMBOT_MACHINE_ZSHENV-none}"), (uid, "exit")]
            assert sorted(commands(spool_of(root))) == sorted(expected)
            assert oct((spool_of(root) / str(uid)).stat().st_mode & 0o777) == "0o700"
            assert commands(MACHINE_SPOOL) == before
