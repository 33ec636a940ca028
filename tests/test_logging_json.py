"""Structured logs (docs/logging.md), through real processes: a bot started with `--log-format json`
and a master with $OMBOT_LOG_FORMAT=json write nothing but JSON objects, one a line; a slash command
that needs approval, approved by another user, is tied to its approval, its job at the master and
the job's host by one request id; the Slack secrets and the database password, echoed into a logged
Slack error, appear in neither log. The agent and the masters `ombot up` starts log JSON when asked;
and the formatters redact every field of a line."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ombot import context
from ombot.logs import ContextFilter, JsonFormatter, RedactingFormatter
from tests.fakeslack import FakeSlack
from tests.rigs import ALICE, CHANNEL, SECRET, ApprovalRig, approval, policy, role, rule, slack_rig
from tests.storage import scratch
from tests.support import REPO, child_env, free_port

BOB = "U0BOB"
BOT_TOKEN = "xoxb-4242-loggingtestbottoken"  # recognisable: none of these may reach a log line
PASSWORD = "Pw-logtest-8c1f2e"  # of the bot's database, in its URL
APP_TOKEN = "xapp-1-A0LOGTEST-loggingtestapptoken"  # only echoed: set, it would turn the bot to Socket Mode
POLICY = policy(role("ops", ALICE), role("leads", BOB),
                rule("echo on localhost needs a lead", modules=["echo"], targets=["localhost"], request=["ops"],
                     approval=approval()))
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class JsonRig(ApprovalRig):
    """The approval rig whose bot logs JSON, asked for on its command line."""

    bot_args = ("--log-format", "json", "bot")


def lines_of(text: str) -> list[dict[str, Any]]:
    """Every line of a log as a JSON object with the four fields every line has (fails on any other line)."""
    found = []
    for line in text.splitlines():
        obj = json.loads(line)
        assert isinstance(obj, dict) and {"ts", "level", "logger", "message"} <= set(obj), line
        assert TS.fullmatch(obj["ts"]), line
        found.append(obj)
    return found


def one(lines: list[dict[str, Any]], what: Callable[[dict[str, Any]], bool], label: str) -> dict[str, Any]:
    matching = [line for line in lines if what(line)]
    assert len(matching) == 1, (label, matching)
    return matching[0]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def bot_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The bot's database: SQLite in the fast tier; on PostgreSQL its URL carries a password (the test
    server trusts any), which the bot hides by its value too, as soon as it opens the database."""
    with scratch(request.param, tmp_path) as url:
        yield url.replace("://postgres@", f"://postgres:{PASSWORD}@", 1)


def test_a_slash_command_its_approval_and_its_job_share_one_request_id_and_no_secret_is_logged(
        tmp_path: Path, bot_database: str) -> None:
    with FakeSlack(bot_token=BOT_TOKEN) as fake, slack_rig(
            tmp_path / "site", kind=JsonRig, policy=POLICY, fake=fake, start=(),
            prepare=lambda cluster: cluster.start("m1", env={"OMBOT_LOG_FORMAT": "json"}),
            env={"OMBOT_BOT_DATABASE_URL": bot_database}) as rig:
        pending = rig.ask("echo localhost message=tied")
        # A Slack error that echoes every secret, which the bot logs: the redaction must hold
        has_password = PASSWORD in bot_database
        fake.fail("chat.update", f"invalid_auth {BOT_TOKEN} {APP_TOKEN} {SECRET} {bot_database}"
                                 + f" password={PASSWORD}" * has_password)
        rig.approve(pending, BOB).wait(f"Approved request #{pending.number}; its job starts now")
        number = pending.asked.number("Starting job #")
        assert f"[#{number} ok]" in rig.final_card(number)["text"]
        # the click's own line comes when its handler returns, which may be after the job ended
        rig.fake.wait_for(lambda: all(line in rig.bot.log() for line in ("ended: ok", '"approve click')),
                          what="the bot's lines for the job's end and for the click")
        rig.fake.wait_for(lambda: "job finished: ok" in rig.cluster.processes["m1"].log(),
                          what="the master's line for the job's end (written after it told its followers)")
        bot_log, master_log = rig.bot.log(), rig.cluster.processes["m1"].log()
        bot, master = lines_of(bot_log), lines_of(master_log)

        command = one(bot, lambda x: x["message"].startswith("command 'echo localhost message=tied'"), "the command")
        rid = command["rid"]
        assert (command["logger"], command["user"], command["approval"]) == ("ombot.bot", ALICE, pending.number)
        assert command["message"] == f"command 'echo localhost message=tied' in {CHANNEL}: ok"
        one(bot, lambda x: x["message"].startswith(f"approval #{pending.number} opened") and x["rid"] == rid, "asked")
        click = one(bot, lambda x: x["message"].startswith("approve click"), "the approval click")
        assert (click["rid"], click["user"], click["approval"]) == (rid, BOB, pending.number)
        job = pending.request_id  # the approved request's id is its job's
        submitted = one(bot, lambda x: x["message"].startswith(f"job #{number} submitted"), "the submit")
        assert (submitted["rid"], submitted["job"], submitted["idc"], submitted["user"]) == (rid, job, "local", ALICE)
        assert submitted["message"].endswith("at master m1")
        ended = one(bot, lambda x: x["message"] == f"job #{number} ended: ok", "the end at the bot")
        assert (ended["rid"], ended["job"]) == (rid, job)

        accepted = one(master, lambda x: x["message"].startswith("job accepted: echo on 1 host(s)"), "the job")
        host = one(master, lambda x: x["message"] == "host localhost: ok", "the host's result")
        finished = one(master, lambda x: x["message"].startswith("job finished: ok (1 ok) in "), "the end at the master")
        for line in (accepted, host, finished):
            assert (line["rid"], line["job"], line["user"], line["master"], line["idc"]) == (rid, job, ALICE, "m1", "local")
        assert host["host"] == "localhost"

        warned = one(bot, lambda x: "invalid_auth" in x["message"], "the Slack error")
        assert warned["level"] == "WARNING" and "***" in warned["message"], warned
        for secret in (BOT_TOKEN, APP_TOKEN, SECRET, *[PASSWORD] * has_password):
            assert secret not in bot_log and secret not in master_log, secret


def test_the_agent_logs_json_lines_naming_its_server(tmp_path: Path) -> None:
    """`ombot-agent run --log-format json`: the agent's own lines, with its host and IDC, while it
    looks for a master that is not there."""
    keys = {name: run_agent("keygen", "--key", str(tmp_path / f"{name}.key")).strip() for name in ("agent", "m1")}
    config = tmp_path / "agent.toml"
    config.write_text(f'host = "web07"\nidc = "sh"\nkey_file = "{tmp_path / "agent.key"}"\n'
                      f'spool_dir = "{tmp_path / "spool"}"\nstate_dir = "{tmp_path / "state"}"\n'
                      'retry_min_seconds = 0.2\nretry_max_seconds = 0.5\nconnect_timeout_seconds = 1\n\n'
                      f'[[masters]]\nid = "m1"\naddress = "127.0.0.1:9"\npublic_key = "{keys["m1"]}"\n')
    (tmp_path / "spool").mkdir(mode=0o700)
    log = tmp_path / "agent.log"
    proc = subprocess.Popen([sys.executable, "-m", "ombot.audit_agent", "run", "--log-format", "json",
                             "--config", str(config)], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env=child_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while "no master reachable" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    lines = lines_of(log.read_text())
    warned = next(line for line in lines if line["message"].startswith("no master reachable"))
    assert (warned["level"], warned["logger"], warned["host"], warned["idc"]) == ("WARNING", "ombot.audit_agent", "web07", "sh")


def test_the_masters_up_starts_log_in_its_format(tmp_path: Path) -> None:
    """`ombot --log-format json up`: the master it starts writes JSON lines to its log file too."""
    demo = tmp_path / "demo"
    init = subprocess.run([sys.executable, "-m", "ombot", "init", str(demo), "--master-port", str(free_port())],
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    master_log = demo / "state" / "local-1.log"
    up = subprocess.Popen([sys.executable, "-m", "ombot", "--log-format", "json", "--config", str(demo / "ombot.toml"),
                           "up"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=child_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in (master_log.read_text() if master_log.exists() else ""):
            assert up.poll() is None and time.monotonic() < deadline, "the master did not start"
            time.sleep(0.1)
    finally:
        up.stdin.close()  # type: ignore[union-attr]  # the console ends, and stops its master
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    listening = next(line for line in lines_of(master_log.read_text()) if "listening on" in line["message"])
    assert (listening["logger"], listening["master"], listening["idc"]) == ("ombot.master", "local-1", "local")


def test_an_unknown_log_format_is_a_usage_error() -> None:
    done = subprocess.run([sys.executable, "-m", "ombot", "--log-format", "yaml", "masters"], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--log-format" in done.stderr, done


def run_agent(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ombot.audit_agent", *args], env=child_env(), capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout


def test_every_field_of_a_json_line_is_redacted_and_a_text_line_shows_the_works_ids(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The formatters themselves: a traceback, an `extra` field and its name are redacted too; the text
    format appends the ids of the work, not those of the process."""
    try:
        raise RuntimeError(f"cannot open postgresql://ombot:{PASSWORD}@db/ombot with {BOT_TOKEN}")
    except RuntimeError:
        record = logging.LogRecord("ombot.test", logging.ERROR, "p", 1, "failed: %s", (APP_TOKEN,), sys.exc_info())
    record.__dict__.update({"detail": {"url": f"mysql://u:{PASSWORD}@h/d", BOT_TOKEN: [APP_TOKEN]}})
    monkeypatch.setattr(context, "_process", {})  # this test process's own ids stay as they were
    context.for_process(master="m9")
    with context.scope(rid="abc123", job="j1"):
        ContextFilter().filter(record)
    line = JsonFormatter().format(record)
    parsed = json.loads(line)
    assert (parsed["message"], parsed["rid"], parsed["job"], parsed["master"]) == ("failed: xapp-***", "abc123", "j1", "m9")
    assert parsed["detail"] == {"url": "mysql://u:***@h/d", "xox?-***": ["xapp-***"]}
    assert "RuntimeError: cannot open postgresql://ombot:***@db/ombot with xox?-***" in parsed["exc"]
    assert not any(secret in line for secret in (PASSWORD, BOT_TOKEN, APP_TOKEN))
    text = RedactingFormatter("%(levelname)s %(message)s").format(record)
    assert text.splitlines()[0] == "ERROR failed: xapp-*** [rid=abc123 job=j1]"
