"""The Slack HTTP face under attack: oversized bodies are refused before anything is read, replayed
signed requests run once, and a user group Slack cannot answer for costs one lookup, not one per check.

Real `ombot bot` processes in HTTP mode against the fake Slack Web API and a real master.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from ombot.bot import replay
from ombot.bot import store as bot_store
from ombot.clock import now_ms
from tests.fakeslack import interactive_body, signed_request
from tests.rigs import CHANNEL, SECRET, SITE_MODULES, Reply, SlackRig, approval, policy, role, rule
from tests.storage import BACKENDS, scratch

ALICE, BOB, LEAD = "U0ALICE", "U0BOB", "U0LEAD1"
MiB = 1024 * 1024

# S0GONE is unknown to the fake Slack: every lookup of it fails (no_such_subteam).
POLICY = policy(
    role("ops", ALICE, groups=["S0OPS", "S0GONE"]), role("leads", LEAD),
    rule("localhost shell needs a lead", modules=["shell.exec"], targets=["localhost"], request=["ops"],
         approval=approval()),
    rule("anything else", request=["ops"]))

# A module whose generated modal is as large as the forms code makes one within Slack's 250 kB view
# limit: the most input blocks a modal holds, each with the longest hint, the last a select of the most
# options a select takes.
BIG_FORM_FIELDS = 95
BIG_CHOICES = [f"choice-{j:03d}-" + "z" * 64 for j in range(100)]
BIG_FORM = f'''\
from ombot.modules import Command, Plan, module, params as p

HINT = ("Every field carries the longest hint a modal allows, so the view is as big as a generated "
        "one gets: 'quotes', \\"double quotes\\", & ampersands, = signs, % signs and spaces. ") * 14

@module("test.bigform", category="test",
        params=[*(p.String(f"field{{i:02d}}", help=HINT) for i in range({BIG_FORM_FIELDS - 1})),
                p.MultiChoice("many", help=HINT, choices={tuple(BIG_CHOICES)!r})])
def run({", ".join(f"field{i:02d}: str" for i in range(BIG_FORM_FIELDS - 1))}, many: list[str]) -> Plan:
    """A form as large as a modal gets."""
    return Plan(Command(["echo", "big form: " + field00 + " and " + str(len(many)) + " choices"]))
'''


class Rig(SlackRig):
    """The rig, with a command's body kept to send again (a replay) and its answers found by response_url."""

    def command_body(self, text: str, user: str = ALICE) -> tuple[str, str]:
        """(form body, its response_url) of a slash command."""
        fields = self.fake.slash_command(text=text, user_id=user, channel_id=CHANNEL)
        return urlencode(fields), fields["response_url"]

    def answers(self, url: str) -> list[str]:
        return Reply(self.fake, url).texts()

    def answer(self, url: str, needle: str = "") -> str:
        return Reply(self.fake, url).wait(needle)


@pytest.fixture
def rig(make_slack_rig, tmp_path: Path) -> Rig:
    big = tmp_path / "big_modules"
    big.mkdir()
    (big / "bigform.py").write_text(BIG_FORM)
    return make_slack_rig(kind=Rig, module_dirs=[SITE_MODULES, big], policy=POLICY, usergroups={"S0OPS": [BOB]})


# -- the body cap ------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def raw_exchange(port: int, head: bytes, timeout: float = 10) -> bytes:
    """Send `head` on a raw connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.slow
def test_an_oversized_body_is_refused_before_it_is_read(rig: Rig) -> None:
    pid = rig.bot.proc.pid
    assert rig.send("token=warm-up", signed_request("wrong-secret", "token=warm-up"))[0] == 401  # threads, imports
    before = rss_kib(pid)
    head = (f"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"X-Slack-Request-Timestamp: {int(time.time())}\r\nX-Slack-Signature: v0=00\r\n"
            f"Content-Length: {300 * MiB}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", rig.port), timeout=10)
    answer = bytearray()
    answered_at: list[float] = []
    closed = threading.Event()

    def read() -> None:
        try:
            while chunk := sock.recv(65536):
                answer.extend(chunk)
                if not answered_at and b"\r\n\r\n" in answer:
                    answered_at.append(time.monotonic())
        except OSError:
            pass
        closed.set()

    sock.sendall(head)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent, peak, cut_off = 0, before, False
    started = time.monotonic()
    try:
        while sent < 48 * MiB and time.monotonic() - started < 20:
            sock.sendall(b"x" * (256 * 1024))  # a body that keeps coming, 256 KiB at a time
            sent += 256 * 1024
            peak = max(peak, rss_kib(pid))
            time.sleep(0.02)
    except OSError:
        cut_off = True  # the bot answered and closed the connection: the rest is never read
    closed.wait(10)
    sock.close()
    status_line = bytes(answer).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.") and b" 413 " in status_line, (status_line, sent)
    assert answered_at and answered_at[0] - started < 5  # answered at once, not after 300 MiB
    assert cut_off and sent < 48 * MiB and time.monotonic() - started < 15  # and the connection closed
    assert peak - before < 20 * 1024, f"RSS grew from {before} KiB to {peak} KiB"
    assert rig.bot.proc.poll() is None
    # the bot still serves the next request
    assert rig.send("token=after", signed_request("wrong-secret", "token=after"))[0] == 401


@pytest.mark.slow
def test_a_post_needs_a_valid_content_length(rig: Rig) -> None:
    base = "POST /slack/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    missing = raw_exchange(rig.port, (base + "Connection: close\r\n\r\ntext=hi").encode())
    assert missing.split(b"\r\n", 1)[0].split(b" ")[1] == b"411", missing[:200]
    chunked = raw_exchange(rig.port, (base + "Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n").encode())
    assert chunked.split(b"\r\n", 1)[0].split(b" ")[1] == b"411", chunked[:200]
    for bad in ("abc", "-5", "1e9", "\u0661\u0662"):
        reply = raw_exchange(rig.port, (base + f"Content-Length: {bad}\r\n\r\n").encode())
        assert reply.split(b"\r\n", 1)[0].split(b" ")[1] == b"400", (bad, reply[:200])
    just_over = "x" * (MiB + 1)
    assert rig.send(just_over, signed_request(SECRET, just_over))[0] == 413
    time.sleep(0.5)
    assert not rig.fake.response_posts


@pytest.mark.slow
def test_the_largest_generated_modal_still_submits(rig: Rig) -> None:
    body, _ = rig.command_body("run test.bigform")  # with a live trigger_id: the modal opens
    assert rig.send(body)[0] == 200
    rig.fake.wait_for_call("views.open")
    view_id, view = next(iter(rig.fake.views.items()))
    view_bytes = len(json.dumps(view, separators=(",", ":")).encode())
    assert view_bytes > 200_000 and sum(b["type"] == "input" for b in view["blocks"]) == BIG_FORM_FIELDS + 1
    values: dict[str, dict[str, Any]] = {"targets": {"v": "localhost"}}
    for i in range(BIG_FORM_FIELDS - 1):
        values[f"p:field{i:02d}"] = {"v": f"value {i} " + "y" * 240}
    values["p:many"] = {"v": {"type": "multi_static_select", "selected_options": [
        {"text": {"type": "plain_text", "text": c}, "value": c} for c in BIG_CHOICES]}}
    submission = interactive_body(rig.fake.view_submission(view_id, values))
    assert len(submission) >= 250_000, len(submission)
    status, answer = rig.send(submission)
    assert (status, answer) == (200, "")
    card = rig.final_card(1)
    assert "[#1 ok] test.bigform" in card["text"]
    assert "big form: value 0 yyy" in rig.fake.wait_for(lambda: next((m["text"] for m in rig.fake.thread(
        CHANNEL, card["ts"]) if m["ts"] != card["ts"]), None), what="results in the thread")


# -- replays -----------------------------------------------------------------------------------------


def job_count(rig: Rig) -> int:
    return rig.rows("SELECT COUNT(*) FROM bot_job")[0][0]


@pytest.mark.slow
def test_a_replayed_command_runs_once_across_restarts_and_processes(rig: Rig, make_slack_rig) -> None:
    body, url = rig.command_body("echo localhost message=once")
    headers = signed_request(SECRET, body)
    assert [rig.send(body, headers) for _ in range(3)] == [(200, "")] * 3  # repeats are acked, then dropped
    rig.final_card(1)
    time.sleep(1.5)  # time for any second job to show
    assert job_count(rig) == 1
    assert len([c for c in rig.cards() if c["text"].startswith("[#1 ")]) == 1 and not any(
        c["text"].startswith("[#2 ") for c in rig.cards())
    assert sum("Starting job #" in t for t in rig.answers(url)) == 1

    asked, asked_url = rig.command_body('shell.exec localhost cmd="echo gated"')
    asked_headers = signed_request(SECRET, asked)
    assert [rig.send(asked, asked_headers)[0] for _ in range(3)] == [200] * 3
    rig.answer(asked_url, "Waiting as request #")
    time.sleep(1.5)
    assert rig.rows("SELECT COUNT(*) FROM approval_request")[0][0] == 1
    assert sum("Waiting as request #" in t for t in rig.answers(asked_url)) == 1

    rig.restart_bot()  # the seen signatures live in the database
    assert rig.send(body, headers) == (200, "")
    assert rig.send(asked, asked_headers)[0] == 200
    time.sleep(1.5)
    assert job_count(rig) == 1 and rig.rows("SELECT COUNT(*) FROM approval_request")[0][0] == 1
    assert "replayed" in rig.bot.log()

    # A second bot process (another config, its own master) on the same database drops it too.
    database = f"sqlite:///{rig.cluster.root / 'state' / 'bot.db'}"
    other = make_slack_rig(fake=rig.fake, policy=POLICY, env={"OMBOT_BOT_DATABASE_URL": database})
    port, second = other.port, other.bot
    try:
        assert rig.send(body, headers, port=port) == (200, "")
        fresh, fresh_url = rig.command_body("echo localhost message=fresh")
        assert rig.send(fresh, port=port) == (200, "")  # a new request is served by the second bot
        rig.answer(fresh_url, "Starting job #2")
        rig.final_card(2)
        time.sleep(1)
        assert job_count(rig) == 2
    finally:
        second.stop()


@pytest.mark.slow
def test_only_the_exact_repeat_is_dropped(rig: Rig) -> None:
    body, url = rig.command_body("echo localhost message=first")
    assert rig.send(body) == (200, "")
    rig.final_card(1)
    time.sleep(1.1)  # a new timestamp: a new signature over the same body is a new request
    assert rig.send(body) == (200, "")
    rig.final_card(2)
    assert job_count(rig) == 2
    # expired rows are purged; recent ones are kept, keyed by a digest, with UTC epoch milliseconds
    rows = rig.rows("SELECT digest, seen_at, expires_at FROM bot_seen_request")
    now_ms = time.time() * 1000
    assert len(rows) >= 2 and all(len(d) == 64 for d, _, _ in rows)
    assert all(now_ms - 60_000 < seen <= now_ms + 1000 < expires for _, seen, expires in rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_racing_connections_take_a_request_once_on_every_database(backend: str, tmp_path: Path) -> None:
    """What two bot processes on one database do: the primary key lets exactly one INSERT win."""
    with scratch(backend, tmp_path) as url:
        db = bot_store.open_store(url)
        try:
            replay.prepare()
            timestamp, signature = str(int(time.time())), "v0=" + "ab" * 32
            start = threading.Barrier(6)
            outcomes: list[bool] = []

            def take() -> None:
                start.wait()
                outcomes.append(replay.first_use(timestamp, signature))  # each thread: its own connection
                bot_store.db.close()

            racers = [threading.Thread(target=take) for _ in range(6)]
            for racer in racers:
                racer.start()
            for racer in racers:
                racer.join(30)
            assert sorted(outcomes) == [False] * 5 + [True]
            assert replay.first_use(timestamp, signature) is False
            assert replay.first_use(timestamp, "v0=" + "cd" * 32) is True
            assert replay.SeenRequest.select().count() == 2
            # rows whose signatures no longer verify are purged (at most once a minute per process)
            replay.SeenRequest.insert(digest="0" * 64, seen_at=1, expires_at=now_ms() - 1).execute()
            replay._next_purge_ms = 0
            assert replay.first_use(timestamp, "v0=" + "ef" * 32) is True
            assert "0" * 64 not in {r.digest for r in replay.SeenRequest.select()}
            assert replay.SeenRequest.select().count() == 3
        finally:
            db.close()


# -- user groups -------------------------------------------------------------------------------------


def group_lookups(rig: Rig, group: str) -> int:
    return len([c for c in rig.fake.calls_to("usergroups.users.list", include_rate_limited=True)
                if c.body.get("usergroup") == group])


@pytest.mark.slow
def test_a_group_slack_cannot_read_is_looked_up_once_and_has_no_members(rig: Rig) -> None:
    for text in ("modules", "echo localhost message=one", "jobs"):
        body, url = rig.command_body(text)
        assert rig.send(body) == (200, "")
        rig.answer(url)
    assert group_lookups(rig, "S0GONE") == 1  # failed once; the failure is cached too
    assert group_lookups(rig, "S0OPS") == 1
    # BOB is in S0OPS, which Slack answers for: allowed; an unreadable group still admits no one
    body, url = rig.command_body("echo localhost message=bob", BOB)
    rig.send(body)
    rig.answer(url, "Starting job #")


@pytest.mark.slow
def test_a_rate_limited_group_lookup_neither_stalls_nor_repeats(rig: Rig) -> None:
    rig.restart_bot()  # nothing cached
    rig.fake.rate_limit("usergroups.users.list", times=1000, retry_after=2)
    started = time.monotonic()
    urls = []
    for text in ("modules", "echo localhost message=limited", "jobs"):
        body, url = rig.command_body(text)
        assert rig.send(body) == (200, "")
        urls.append(url)
    for url in urls:
        rig.answer(url)
    answered = time.monotonic() - started
    lookups = group_lookups(rig, "S0GONE") + group_lookups(rig, "S0OPS")
    assert lookups <= 2, f"{lookups} calls to usergroups.users.list"
    assert answered < 10, f"three commands took {answered:.1f} s"
    # fail closed: while Slack refuses to say, BOB's group admits no one
    body, url = rig.command_body("echo localhost message=bob", BOB)
    rig.send(body)
    assert rig.answer(url, "Refused").startswith("Refused")
    rig.fake.rate_limit("usergroups.users.list", times=0)
