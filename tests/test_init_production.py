"""`ombot init --production DIR --idc bj,sh --masters-per-idc 2`: a configuration for several IDCs that
loads as written, passes its own checks, and from which every master starts with its own key once
its placeholder address is replaced (here by loopback ports), all answering `ombot masters`."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ombot import config as cfg
from ombot.bot.settings import BotSettings
from tests.support import Cluster, child_env, free_port

IDCS = {"bj": ["bj-1", "bj-2"], "sh": ["sh-1", "sh-2"]}


def ombot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ombot", *args], capture_output=True, text=True, timeout=120,
                          env=child_env())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("production") / "etc-ombot"
    made = ombot("init", "--production", str(root), "--idc", "bj,sh", "--masters-per-idc", "2")
    assert made.returncode == 0, made.stderr
    assert f"wrote {root / 'ombot.toml'}" in made.stdout and "docs/production.md" in made.stdout
    return root


def test_it_names_every_idc_and_master_with_its_own_key_and_no_secret(site: Path) -> None:
    text = (site / "ombot.toml").read_text()
    raw = tomllib.loads(text)
    assert {idc: table["masters"] for idc, table in raw["idcs"].items()} == IDCS
    for mid in ["bj-1", "bj-2", "sh-1", "sh-2"]:
        master = raw["masters"][mid]
        idc = mid.split("-")[0]
        assert master["address"] == f"{idc}-master-{mid[-1]}.example.internal:18861"
        assert (master["backend"], master["state_dir"], master["inventory"]) == (
            "ansible", f"/var/lib/ombot/{mid}", f"inventory/{idc}.ini")
        assert master["ops_listen"] == "127.0.0.1:9465" and master["approvals"]["shell.exec"] == 1
        assert f'key_file = "keys/{mid}.key"        # only on {mid}\'s host' in text
        assert stat.S_IMODE((site / "keys" / f"{mid}.key").stat().st_mode) == 0o600
    bot = raw["bot"]
    assert (bot["state_dir"], bot["ops_listen"], bot["policy"]) == ("/var/lib/ombot/bot", "127.0.0.1:9464", "policy.toml")
    assert "console_user" not in bot and "console_allow_as" not in bot  # no demo console in production
    assert raw["clients"]["console"]["kind"] == "console"
    assert text.count("# EDIT") + text.count("EDIT:") >= 6  # every placeholder says so
    for secret in ("database =", "xoxb-", "xapp-", "SLACK_SIGNING_SECRET="):
        assert secret not in text.replace("# OMBOT_", "")
    assert "SLACK_BOT_TOKEN=" in (site / "bot.env.example").read_text()
    assert "OMBOT_MASTER_DATABASE_URL" in (site / "master.env.example").read_text()


def test_it_loads_and_passes_its_checks(site: Path) -> None:
    checked = site / "checked.toml"  # beside it: its relative paths hold
    checked.write_text((site / "ombot.toml").read_text())
    conf = cfg.load(checked)
    assert conf.idcs == {idc: tuple(ids) for idc, ids in IDCS.items()}
    assert {m.state_dir for m in conf.masters.values()} == {Path(f"/var/lib/ombot/{mid}") for mid in conf.masters}
    policy = ombot("--config", str(checked), "policy", "check")
    assert policy.returncode == 0 and "ok" in policy.stdout, policy.stderr
    rules = ombot("audit", "test-rules", str(site / "audit-rules.toml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The commented SIEM export, uncommented as a user would, is a valid [bot.audit_export]
    checked.write_text(re.sub(r"(?m)^# (\[bot\.audit_export\]|file = |syslog = )", r"\1", checked.read_text()))
    export = BotSettings.from_config(cfg.load(checked)).audit_export
    assert export is not None and export.syslog is not None and str(export.file).endswith("/bot/audit-export.jsonl")


def test_every_master_starts_with_its_key_and_answers(site: Path, tmp_path: Path) -> None:
    """What a user edits on each master's host: its address (here a loopback port each), and, as the
    test is not a systemd unit, the state directory's place."""
    site = Path(shutil.copytree(site, tmp_path / "etc-ombot"))
    text = (site / "ombot.toml").read_text()
    text = re.sub(r'address = "[a-z]+-master-\d\.example\.internal:18861"',
                  lambda _: f'address = "127.0.0.1:{free_port()}"', text)
    text = re.sub(r'(?m)^ops_listen = "127\.0\.0\.1:\d+"', lambda _: f'ops_listen = "127.0.0.1:{free_port()}"', text)
    text = text.replace('state_dir = "/var/lib/ombot/', f'state_dir = "{tmp_path}/')
    (site / "ombot.toml").write_text(text)
    cluster = Cluster.adopt(site)
    try:
        for mid in cluster.ports:
            cluster.start(mid)
        health = ombot("--config", str(site / "ombot.toml"), "masters")
        assert health.returncode == 0, health.stdout + health.stderr
        assert [line.split()[:3] for line in health.stdout.splitlines()] == [
            [mid, mid.split("-")[0], "up"] for mid in ("bj-1", "bj-2", "sh-1", "sh-2")]
        assert "backend=ansible" in health.stdout
    finally:
        cluster.stop_all()


def test_it_refuses_what_it_cannot_write(tmp_path: Path, site: Path) -> None:
    again = ombot("init", "--production", str(site), "--idc", "bj")
    assert again.returncode == 2 and "exists; refusing to overwrite it" in again.stderr
    for idcs, per_idc, why in (("bj,bj", "2", "distinct IDC names"), ("BJ", "2", "lowercase"),
                               ("bj", "0", "from 1 to 9")):
        bad = ombot("init", "--production", str(tmp_path / idcs), "--idc", idcs, "--masters-per-idc", per_idc)
        assert bad.returncode == 2 and why in bad.stderr, bad.stderr
    assert not (tmp_path / "bj,bj").exists()
    missing = ombot("init", "--production", str(tmp_path / "none"))
    assert missing.returncode == 2 and "--idc bj,sh" in missing.stderr
