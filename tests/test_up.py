"""`ombot up`, the README's first command, and `ombot slack-manifest`."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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
