"""The zsh hook (issue 11, capture): installed like the bash hook, run in a real interactive zsh in
a pty, writing the same records into the same spool, read back the way the agent reads them.

Needs zsh (`apt-get install -y zsh`; .ci/run installs it); skipped, saying so, where it is absent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ombot.audit_agent import hook, spool
from tests.shells import ZPROMPT as PROMPT, ZSH, Zsh
from tests.support import child_env

pytestmark = pytest.mark.skipif(ZSH is None, reason="zsh is not installed (apt-get install -y zsh)")

UID = os.geteuid()


def installed(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    root = tmp_path / "root"
    subprocess.run([sys.executable, "-m", "ombot.audit_agent", "install", "--root", str(root), *extra], check=True,
                   env=child_env(), capture_output=True)
    return root, root / hook.DEFAULT_SPOOL_DIR.lstrip("/")


def spooled(spool_dir: Path) -> list[dict[str, Any]]:
    """The command records now in the spool, as the agent reads them."""
    events = [e for chunk in spool.scan(spool_dir, {}, set()) for e in chunk.events]
    assert all(kind == "command" for kind, _, _ in events), events  # every line the zsh hook wrote is a record
    return [data for _, _, data in events]


def test_install_writes_the_zsh_hook_once(tmp_path: Path) -> None:
    root, _ = installed(tmp_path)
    installed(tmp_path)  # again: still one line in the zshrc
    zshrc = (root / hook.ZSHRC).read_text()
    assert zshrc.count(hook.MARKER) == 1 and str(root / hook.ZSH_BODY) in zshrc
    body = (root / hook.ZSH_BODY).read_text()
    assert str(root / hook.DEFAULT_SPOOL_DIR.lstrip("/")) in body
    assert subprocess.run([str(ZSH), "-n", str(root / hook.ZSH_BODY)], capture_output=True).returncode == 0
    # printed by `hook --shell zsh`, the same code
    printed = subprocess.run([sys.executable, "-m", "ombot.audit_agent", "hook", "--shell", "zsh"], env=child_env(),
                             capture_output=True, text=True, check=True).stdout
    assert printed == hook.hook_text(hook.DEFAULT_SPOOL_DIR, "zsh")
    # bash never parses the zsh hook, and the bash hook is still the default
    assert "preexec_functions" not in (root / hook.HOOK_BODY).read_text()


def test_a_zshrc_that_sources_zshrc_d_gets_the_hook_there(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / hook.ZSHRC_D).mkdir(parents=True)
    original = "for f in /etc/zsh/zshrc.d/*.zsh(N); do . $f; done\n"
    (root / hook.ZSHRC).write_text(original)
    installed(tmp_path)
    assert (root / hook.ZSHRC).read_text() == original  # left alone
    assert "preexec_functions" in (root / hook.ZSHRC_D / "ombot-audit.zsh").read_text()


def test_a_distribution_with_etc_zshrc_gets_the_line_there(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / hook.ZSHRC_OTHER).write_text("# the distribution's\n")
    installed(tmp_path)
    assert (root / hook.ZSHRC_OTHER).read_text().count(hook.MARKER) == 1 and not (root / hook.ZSHRC).exists()


@pytest.mark.slow
def test_typed_commands_arrive_once_with_their_fields(tmp_path: Path) -> None:
    """A real zsh: each line once, with its exit status, the directory it started in, the login
    name, tty and SSH client; an empty line records nothing; a prompt tool that adds itself with
    add-zsh-hook (as themes and direnv do) keeps running."""
    root, spool_dir = installed(tmp_path)
    theme = ["autoload -Uz add-zsh-hook", "__theme() { THEME_RUNS=$((THEME_RUNS+1)) }", "add-zsh-hook precmd __theme"]
    shell = Zsh(root, tmp_path / "home", theme)
    shell.run("echo one | cat")
    shell.run("")  # a re-displayed prompt records nothing
    shell.run("cd /tmp && false")
    shell.run("echo 'a*b' 'back\\slash'")  # no glob expansion of the recorded text, escapes undone
    runs = shell.run("echo runs=$THEME_RUNS")
    shell.close()
    assert "runs=5" in runs  # the theme's precmd ran at every prompt (the first, and the empty line's)
    records = spooled(spool_dir)
    assert [r["command"] for r in records] == ["echo one | cat", "cd /tmp && false", "echo 'a*b' 'back\\slash'",
                                               "echo runs=$THEME_RUNS", "exit"]  # `exit`: from zshexit
    first, second = records[0], records[1]
    assert first["uid"] == UID and first["exit"] == 0 and second["exit"] == 1
    assert first["cwd"] == str(tmp_path / "home") and second["cwd"] == str(tmp_path / "home")  # where it started
    assert records[2]["cwd"] == "/tmp"
    assert first["logname"] == "tester" and first["ssh_client"] == "192.0.2.7" and first["tty"].startswith("/dev/")
    assert first["pid"] == shell.child.pid and first["seen"] == "history" and not first["truncated"]
    assert [r["history"] for r in records[:4]] == [1, 2, 3, 4]
    mode = (spool_dir / str(UID)).stat()
    assert mode.st_uid == UID and oct(mode.st_mode & 0o777) == "0o700"


@pytest.mark.slow
def test_what_the_zsh_hook_still_sees_after_evasion_attempts(tmp_path: Path) -> None:
    """Still captured: a child zsh (it reads the zshrc again), a leading space under
    HIST_IGNORE_SPACE (preexec gets the line history drops), history turned off, removing the
    hook's precmd (preexec puts it back), and the `exec` line itself. Not captured: anything in
    the `zsh -f` it execs (no rc files read), nor a shell whose hooks are all removed in one line;
    only the auditd layer sees those (docs/audit.md)."""
    root, spool_dir = installed(tmp_path)
    shell = Zsh(root, tmp_path / "home", ["setopt HIST_IGNORE_SPACE"])
    shell.run("zsh")  # a child shell: armed again
    shell.run(" echo leading-space")
    shell.run("precmd_functions=()")
    shell.run("echo after-precmd-removed")
    shell.run("HISTSIZE=0; echo history-off")
    shell.run("exit")  # back in the first shell
    shell.child.sendline("exec zsh -f")
    shell.child.expect(r"[%#] ")
    shell.child.sendline(f"PROMPT='{PROMPT}'")
    shell.child.expect_exact(PROMPT)
    shell.run("echo after-exec")
    shell.close()
    seen = [r["command"].strip() for r in spooled(spool_dir)]
    for captured in ("zsh", "echo leading-space", "precmd_functions=()", "echo after-precmd-removed",
                     "HISTSIZE=0; echo history-off", "exec zsh -f"):
        assert seen.count(captured) == 1, (captured, seen)
    assert not any("after-exec" in c for c in seen)
    by_text = {r["command"]: r for r in spooled(spool_dir)}
    assert by_text["exec zsh -f"]["seen"] == "exec" and by_text["exec zsh -f"]["exit"] is None
    assert by_text["precmd_functions=()"]["seen"] == "missed"  # written by the next preexec, status unknown
