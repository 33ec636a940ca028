"""`/om audit`: the real `ombot bot` process behind our fake Slack, reading rows from its own database;
the console's transport in process; the pure parts (arguments, rows, the file) directly."""

from __future__ import annotations

import io
import json
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ombot.approvals import Gate, PolicyRefusal
from ombot.approvals.policy import parse_policy
from ombot.audit import AuditQuery
from ombot.audit import store as audit_store
from ombot.bot import store as bot_store
from ombot.bot.audit_search import file_text, parse_audit_query, row_line, search_audit
from ombot.bot.commands import CommandError
from ombot.bot.console import ConsoleTransport
from ombot.bot.transport import ChatRequest
from ombot.errors import ConfigError
from tests.fakeslack import slash_command_body
from tests.rigs import CHANNEL, SlackRig, policy, role, rule, table
from tests.support import Cluster

T0 = 1_800_000_000_000
POLICY = policy(role("everyone", "U0ALICE", "U0BOB"), role("auditors", "U0ALICE", "console:alice"),
                rule("anything", request=["everyone"]), table("audit", viewers=["auditors"]))
RULES = """\
[redact]
patterns = ['(?i)\\btoken=(\\S+)']
"""


def event(seq: int, command: str, host: str = "web01", user: str = "alice", **data: Any) -> dict[str, Any]:
    return {"id": f"{host}:0f3e-11aa:q9c1d:{seq}", "kind": "command", "at": T0 + seq * 1000,
            "data": {"uid": 1000, "user": user, "login_user": "bob", "tty": "/dev/pts/3", "cwd": "/srv",
                     "ssh_client": "10.1.2.3 51000 22", "command": command, "exit": 0} | data}


def store_events(url: str, idc: str, events: list[dict[str, Any]]) -> None:
    """Rows in the bot's database, as the audit feed would have stored them."""
    db = bot_store.open_store(url)
    try:
        audit_store.prepare()
        audit_store.insert_new(idc, events)
    finally:
        db.close()


# --- through Slack ----------------------------------------------------------------------------------


class AuditRig(SlackRig):
    """The rig, asked for the audit: the answer comes back to the asker alone."""

    def ask(self, text: str, user: str = "U0ALICE") -> dict[str, Any]:
        """`/om TEXT` as `user`; the answer that came back to them alone."""
        url = self.fake.new_response_url(channel=CHANNEL, user_id=user)
        status, _ = self.send(slash_command_body(text=text, user_id=user, response_url=url))
        assert status == 200
        token = url.rsplit("/", 1)[1]
        call = self.fake.wait_for(lambda: next((c for c in self.fake.response_posts if c.path.endswith(token)), None),
                                  what=f"the answer to {text!r}")
        assert call is not None and call.body.get("response_type") == "ephemeral"
        body: dict[str, Any] = call.body
        return body


def bot_url(cluster: Cluster) -> str:
    return f"sqlite:///{cluster.root / 'state' / 'bot.db'}"


@pytest.fixture
def rig(make_slack_rig: Callable[..., AuditRig]) -> Callable[[list[dict[str, Any]]], AuditRig]:
    """A bot whose database holds the given events (no master: the search reads the bot's own store)."""
    def start(events: list[dict[str, Any]]) -> AuditRig:
        return make_slack_rig(kind=AuditRig, policy=POLICY, start=(), files={"audit-rules.toml": RULES},
                              prepare=lambda cluster: store_events(bot_url(cluster), "bj", events),
                              audit_rules="audit-rules.toml")
    return start


def test_results_go_to_the_asker_alone_escaped_and_redacted(rig: Callable[..., AuditRig]) -> None:
    typed = "mysql -pHunter2 -e 'select 1' <!channel> ``` token=abc123 <@U0BOB>"
    one = rig([event(1, typed), event(2, "ls /srv"), event(3, "echo 100%"), event(4, "echo 1000")])
    answer = one.ask("audit grep=mysql")
    shown = json.dumps(answer)
    assert "Hunter2" not in shown and "abc123" not in shown  # built-in and the rules file's redactions
    assert "mysql -p****" in shown and "token=****" in shown
    assert "<!channel>" not in shown and "<@U0BOB>" not in shown and "&lt;!channel&gt;" in shown
    blocks = [b["text"]["text"] for b in answer["blocks"]]
    [rows] = [b for b in blocks if b.startswith("```")]
    assert rows.endswith("```") and rows.count("```") == 2  # the typed ``` cannot end the block early
    assert "web01" in rows and "alice (login bob*) from 10.1.2.3*" in rows and "ls /srv" not in rows

    literal = json.dumps(one.ask("audit grep=100%"))  # `%` is no wildcard
    assert "echo 100%" in literal and "echo 1000" not in literal
    assert not one.fake.messages(CHANNEL) and not one.fake.files  # nothing for anyone else to see


@pytest.mark.slow
def test_a_long_result_is_a_file_in_a_direct_message(rig: Callable[..., AuditRig]) -> None:
    one = rig([event(i, f"curl -H 'Authorization: Bearer s3cr3t{i}' https://x/{i}") for i in range(30)]
              + [event(99, "uptime", host="db01")])
    answer = json.dumps(one.ask("audit host=web* since=2020-01-01"))
    assert "30 audit events match" in answer and "direct messages" in answer
    upload = one.fake.wait_for(lambda: next(iter(one.fake.files), None), what="the file")
    assert upload is not None and upload.channel == "U0ALICE"  # the bot's direct message with the asker
    lines = (upload.content or b"").decode().splitlines()
    assert lines[0].startswith("time_utc\tidc\thost") and len(lines) == 31
    assert "s3cr3t" not in "\n".join(lines) and "Bearer ****" in lines[1] and "/29" in lines[1]  # newest first
    assert not any("db01" in line for line in lines)
    assert not one.fake.messages(CHANNEL)


@pytest.mark.slow
def test_people_the_policy_does_not_name_are_refused(rig: Callable[..., AuditRig]) -> None:
    one = rig([event(1, "rm -rf /tmp/x")])
    for user in ("U0BOB", "U0MALLORY"):  # a requester of jobs, and someone the policy does not know
        answer = json.dumps(one.ask("audit", user=user))
        assert "Refused" in answer and "search the shell audit trail" in answer and "rm -rf" not in answer
    assert not one.fake.files


# --- the console ----------------------------------------------------------------------------------


@pytest.fixture
def console_db(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'bot.db'}"
    db = bot_store.open_store(url)
    audit_store.prepare()
    yield url
    db.close()


def gate(policy: str = POLICY) -> Gate:
    return Gate(parse_policy(Path("policy.toml"), tomllib.loads(policy)), lambda group: frozenset(), origin="console")


def test_console_short_and_long_answers(console_db: str) -> None:
    audit_store.insert_new("bj", [event(i, f"make target{i} password=pw{i}") for i in range(25)])
    out = io.StringIO()
    transport = ConsoleTransport(out)
    req = ChatRequest("console:alice", "console", "audit", origin="console")
    search_audit(AuditQuery(grep="target7"), req, transport, gate())
    assert "(to console:alice) 1 audit event(s) match grep=target7" in out.getvalue()
    assert "make target7 password=****" in out.getvalue() and "pw7" not in out.getvalue()
    out.seek(0)
    out.truncate()
    search_audit(AuditQuery(host="web01"), req, transport, gate())
    printed = out.getvalue()
    assert "[console:alice #1]" in printed and "file audit-" in printed  # the DM, printed with its file
    assert printed.count("password=****") == 25 + 5 and "pw1" not in printed  # the file, then the newest 5
    with pytest.raises(PolicyRefusal, match="does not let you search"):
        search_audit(AuditQuery(), ChatRequest("console:mallory", "console", origin="console"), transport, gate())


def test_no_policy_and_no_viewers_refuse_everyone(console_db: str) -> None:
    transport = ConsoleTransport(io.StringIO())
    req = ChatRequest("console:alice", "console", origin="console")
    with pytest.raises(PolicyRefusal, match="no access policy"):
        search_audit(AuditQuery(), req, transport, None)
    without = POLICY.replace('[audit]\nviewers = ["auditors"]\n', "")
    with pytest.raises(PolicyRefusal, match=r"\[audit\] viewers: none are set"):
        search_audit(AuditQuery(), req, transport, gate(without))


def test_policy_viewers_must_be_roles() -> None:
    with pytest.raises(ConfigError, match="audit.viewers"):
        gate(POLICY.replace('viewers = ["auditors"]', 'viewers = ["U0ALICE"]'))
    with pytest.raises(ConfigError, match="audit.viewer"):
        gate(POLICY.replace("viewers =", "viewer ="))


# --- the pure parts -------------------------------------------------------------------------------


def test_arguments() -> None:
    query = parse_audit_query(["host=web*", "user=alice", "grep=rm -rf", "idc=bj", "since=2026-11-20"])["query"]
    assert query == AuditQuery("web*", "alice", "rm -rf", 1_795_132_800_000, "bj")
    recent = parse_audit_query(["since=2h"])["query"].since_ms
    assert abs(recent - (int(time.time() * 1000) - 7_200_000)) < 60_000
    assert parse_audit_query([])["query"] == AuditQuery()
    for bad in (["grep=a", "grep=b"], ["colour=red"], ["grep="], ["mine"], ["since=yesterday"]):
        with pytest.raises(CommandError):
            parse_audit_query(bad)


def test_rows_stay_on_one_line_and_the_file_keeps_tabs_visible(console_db: str) -> None:
    [record] = audit_store.insert_new("bj", [event(1, "printf 'a\\tb'\necho done\tx", exit=3)])
    line = row_line(record, ())
    assert "\n" not in line and line.endswith("[3] $ printf 'a\\tb'\\necho done\tx")
    body = file_text([record], ())
    assert body.count("\n") == 2 and "printf 'a\\\\tb'\\necho done\\tx" in body
