"""`ombot up`, the README's first command, and `ombot slack-manifest`."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pexpect
import pytest

from tests.rigs import SHOWN_PROMPT, TERMINAL_ENV, ConsoleLog
from tests.support import child_env, free_port


def ombot(*args: str, stdin: str = "", cwd: Path | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ombot", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=child_env(), cwd=cwd)


@pytest.mark.slow
def test_up_configures_on_first_use_starts_a_master_and_the_console(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    session = "/om echo localhost message=hello-up\n/om facts localhost\n"
    out = ombot("up", str(demo), "--master-port", str(free_port()), stdin=session)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "master local-1 (IDC local) on 127.0.0.1:" in out.stdout
    assert "OMBot console: you are U0DEMO" in out.stdout
    assert "Starting job #1" in out.stdout and "Starting job #2" in out.stdout
    # The console leaves at end of input; jobs it started are recorded and ran on the real master.
    assert (demo / "state" / "local-1.db").exists() and (demo / "state" / "bot.db").exists()


@pytest.mark.slow
def test_up_writes_the_demo_config_when_none_exists(tmp_path: Path) -> None:
    port = free_port()
    out = ombot("up", "fresh", "--master-port", str(port), stdin="", cwd=tmp_path)
    # It wrote a demo config with fresh keys, and then really started from it.
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("wrote a demo configuration to fresh/ombot.toml\n"), out.stdout
    assert f"master local-1 (IDC local) on 127.0.0.1:{port}" in out.stdout
    assert "OMBot console: you are U0DEMO" in out.stdout
    demo = tomllib.loads((tmp_path / "fresh" / "ombot.toml").read_text())
    assert demo["bot"]["console_allow_as"] is True and demo["clients"]["console"]["kind"] == "chat"
    for name in ("bot", "console", "local-1"):
        assert (tmp_path / "fresh" / "keys" / f"{name}.key").exists()


def test_slack_manifest(tmp_path: Path) -> None:
    socket_mode = json.loads(ombot("slack-manifest").stdout)
    assert socket_mode["settings"]["socket_mode_enabled"] is True
    assert socket_mode["features"]["slash_commands"][0]["command"] == "/om"
    assert set(socket_mode["oauth_config"]["scopes"]["bot"]) == {
        "commands", "chat:write", "chat:write.public", "files:write", "usergroups:read", "users:read"}
    http = json.loads(ombot("slack-manifest", "--http-url", "https://ombot.example.com/").stdout)
    assert http["settings"]["socket_mode_enabled"] is False
    assert http["settings"]["interactivity"]["request_url"] == "https://ombot.example.com/slack/events"
    assert http["features"]["slash_commands"][0]["url"] == "https://ombot.example.com/slack/events"


@pytest.mark.slow
def test_up_in_a_terminal_survives_ctrl_c_and_prints_a_command_that_works(tmp_path: Path) -> None:
    """Ctrl-C on a half-typed line clears it: the console and the master it started stay up. The
    command `up` suggests for another terminal runs as printed, though `ombot` is not on PATH."""
    child = pexpect.spawn(sys.executable, ["-m", "ombot", "up", "demo", "--master-port", str(free_port())],
                          env=child_env(TERMINAL_ENV), encoding="utf-8", timeout=60, dimensions=(50, 250),
                          cwd=str(tmp_path), echo=False)
    child.logfile_read = ConsoleLog()
    try:
        child.expect(r"from another terminal: (.+) run facts localhost\r\n")
        suggested = shlex.split(child.match.group(1))
        child.expect_exact(SHOWN_PROMPT)
        child.send("/om echo localhost message=never")
        child.sendcontrol("c")
        child.expect_exact(SHOWN_PROMPT)
        child.sendline("/om echo localhost message=still-up")
        child.expect_exact("(to U0DEMO) Starting job #1: `echo` on 1 host(s) in local: localhost")
        child.expect(r"localhost\s+ok\s+[\d.]+s\s+still-up")  # the master answered after the Ctrl-C

        bare_path = child_env({"PATH": "/usr/bin:/bin"})
        outside = subprocess.run([*suggested, "run", "echo", "localhost", "message=from-outside"], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60, env=bare_path)
        assert outside.returncode == 0, outside.stdout + outside.stderr
        assert re.search(r"^localhost\s+ok\s+.*from-outside$", outside.stdout, re.M), outside.stdout

        child.sendline("/quit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        print(child.logfile_read.text)
        if child.isalive():
            child.terminate(force=True)
    assert "Traceback" not in child.logfile_read.text
