"""Who may run what, end to end: signed Slack requests to the real `ombot bot` process (HTTP mode),
the fake Slack Web API, and a real master whose own approval floor gates shell.exec.

One rig (master + bot + fake Slack) serves the whole module: every test makes its own requests and
finds them again by the numbers the bot answers with, so no test depends on another's leftovers.
Tests that need a fresh bot process (restart, an empty group cache) restart it themselves.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from ombot import approvals
from ombot.approvals import ApprovalError, Gate
from ombot.approvals import store as astore
from ombot.approvals.policy import parse_policy
from ombot.masters import Refused
from ombot.storage import connect_url
from tests.fakeslack import interactive_body
from tests.rigs import CHANNEL, ApprovalRig, approval, console, console_site, floor, policy, role, rule

ALICE, BOB, MALLORY, ONCALL, DBA = "U0ALICE", "U0BOB", "U0MALLORY", "U0ONCALL", "U0DBA"
LEAD1, LEAD2, LEAD3 = "U0LEAD1", "U0LEAD2", "U0LEAD3"

POLICY = policy(
    role("ops", ALICE, groups=["S0OPS"]), role("leads", LEAD1, LEAD2, LEAD3), role("oncall", ONCALL), role("dbas", DBA),
    rule("db hosts are for dbas", modules=["echo"], targets=["db*"], request=["dbas"]),
    rule("web shell needs two leads", modules=["shell.exec"], targets=["web*"], request=["ops"], approval=approval(2),
         cancel=["oncall"]),
    rule("localhost changes need a lead", modules=["shell.exec", "test.sleep"], targets=["localhost"],
         request=["ops", "leads"], approval=approval()),
    rule("quick approvals expire", modules=["facts"], targets=["localhost"], request=["ops"],
         approval=approval(expiry_seconds=2)),
    rule("leads on db01 may approve their own", modules=["shell.exec"], targets=["db01"], request=["leads"],
         approval=approval(2, self_approval=True)),
    rule("everyday", modules=["echo", "test.sleep"], targets=["web*", "localhost"], request=["ops"], max_hosts=2,
         cancel=["oncall"]))

# The master's own floor: whatever the bot says, shell.exec needs one approver other than the requester.
MASTER_FLOOR = floor("m1")


# -- the rig ----------------------------------------------------------------------------------------


class Rig(ApprovalRig):
    """The approval rig, with what these tests read: running cards, results, the bot's database."""

    def running_card(self, number: int) -> dict[str, Any]:
        return self.fake.wait_for(lambda: next((c for c in self.cards(number) if " running]" in c["text"]), None),
                                  what=f"job #{number} to run")

    def results(self, card: dict[str, Any]) -> str:
        return str(self.replies(card)[0]["text"])

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.cluster.root / "state" / "bot.db", timeout=10)


@pytest.fixture(scope="module")
def shared_rig(make_module_slack_rig) -> Rig:
    return make_module_slack_rig(kind=Rig, policy=POLICY, extra_toml=MASTER_FLOOR, usergroups={"S0OPS": [BOB]})


@pytest.fixture
def rig(shared_rig: Rig) -> Iterator[Rig]:
    yield shared_rig
    shared_rig.fake.assert_no_violations()


# -- who may run what -------------------------------------------------------------------------------


def test_refusals_name_the_rule_and_the_host(rig: Rig) -> None:
    cases = [
        # no role at all: refused before the targets are expanded
        (MALLORY, "echo localhost message=x", "you hold no role that the access policy lets request jobs"),
        # one disallowed host among allowed ones refuses the whole request
        (ALICE, "echo web01,db01 message=x", "rule `db hosts are for dbas` does not let you run `echo` on db01"),
        (ALICE, "echo web01,far01 message=x", "no rule allows `echo` on far01 in local (deny by default)"),
        (ALICE, "ping localhost", "no rule allows `ping` on localhost"),
        (ALICE, "echo web message=x", "3 hosts is over the limit of 2 set by rule `everyday`"),
    ]
    replies = [(rig.command(text, user), expected) for user, text, expected in cases]
    for reply, expected in replies:
        assert reply.wait(expected).startswith("Refused: ")
    assert not any(m["text"].startswith("[approval") and "far01" in m["text"] for m in rig.fake.messages(CHANNEL))


def test_allowed_request_without_approval_runs(rig: Rig) -> None:
    reply = rig.command("echo web01,web02 message=plain")
    number = reply.number("Starting job #")
    card = rig.final_card(number)
    assert f"[#{number} ok] echo on 2 host(s)" in card["text"]
    assert "plain" in rig.results(card)
    # the DBA may run echo on db hosts, which the first rule keeps for them
    number = rig.command("echo db01 message=x", DBA).number("Starting job #")
    assert f"[#{number} ok]" in rig.final_card(number)["text"]


def test_two_of_three_approvals_start_the_job_once(rig: Rig) -> None:
    pending = rig.ask('shell.exec web01,web02 cmd="echo two-of-three"')
    assert "needs 2 approval(s) from leads" in pending.asked.wait("Waiting as request")
    assert "0/2 approvals from leads" in rig.approval_message(pending.number, "pending")["text"]

    rig.approve(pending, LEAD1).wait(f"Approved request #{pending.number}: 1/2 approvals")
    rig.approve(pending, LEAD1).wait(f"You already approved request #{pending.number}")  # counted once
    assert rig.rows("SELECT approver FROM approval_vote WHERE request_id = ?", pending.number) == [(LEAD1,)]
    assert "1/2 approvals" in rig.approval_message(pending.number)["text"]

    rig.approve(pending, LEAD2).wait(f"Approved request #{pending.number}; its job starts now")
    number = pending.asked.number("Starting job #")
    card = rig.final_card(number)
    assert "[#%d ok] shell.exec on 2 host(s)" % number in card["text"]
    assert "two-of-three" in rig.results(card)
    approved = rig.approval_message(pending.number, "approved")
    assert not any(b["type"] == "actions" for b in approved["blocks"])  # no buttons once decided
    assert f"<@{LEAD1}>" in approved["text"] and f"<@{LEAD2}>" in approved["text"]

    rig.approve(pending, LEAD3).wait(f"Request #{pending.number} is no longer open: it was approved")
    assert len(rig.cards(number)) == 1
    assert rig.rows("SELECT COUNT(*) FROM bot_job WHERE job_id = ?", pending.request_id) == [(1,)]
    # the master got the approvers in the envelope and recorded one job under the request's id
    events = rig.master_events(pending.request_id)
    assert [e["kind"] for e in events].count("accepted") == 1


def test_self_and_stranger_approvals_are_refused(rig: Rig) -> None:
    pending = rig.ask('shell.exec localhost cmd="echo mine"', user=LEAD1)
    rig.approve(pending, LEAD1).wait(f"You asked for request #{pending.number}; someone else must approve it")
    rig.approve(pending, MALLORY).wait(f"You are not an approver for request #{pending.number}")
    rig.approve(pending, ALICE).wait(f"You are not an approver for request #{pending.number}")
    assert rig.rows("SELECT COUNT(*) FROM approval_vote WHERE request_id = ?", pending.number) == [(0,)]
    assert rig.rows("SELECT state FROM approval_request WHERE number = ?", pending.number) == [("pending",)]
    rig.approve(pending, LEAD2).wait("its job starts now")
    assert "mine" in rig.results(rig.final_card(pending.asked.number("Starting job #")))


def test_self_approval_when_the_rule_allows_it(rig: Rig) -> None:
    """The rule lets a lead approve their own request; the master's floor still wants someone else,
    so the bot sends only the other approvers and the job runs once the second lead agrees."""
    pending = rig.ask('shell.exec db01 cmd="echo self-approved"', user=LEAD1)
    rig.approve(pending, LEAD1).wait(f"Approved request #{pending.number}: 1/2 approvals")
    rig.approve(pending, LEAD2).wait("its job starts now")
    card = rig.final_card(pending.asked.number("Starting job #"))
    assert " ok]" in card["text"] and "self-approved" in rig.results(card)


def test_two_last_approvals_at_once_start_one_job(rig: Rig) -> None:
    for round_ in range(3):
        pending = rig.ask(f'shell.exec web03 cmd="echo race-{round_}"')
        bodies = [rig.click_body("om_approve", pending.request_id, pending.ts, user) for user in (LEAD1, LEAD2)]
        barrier = threading.Barrier(len(bodies))
        statuses: list[int] = []

        def click(body: str) -> None:
            barrier.wait()
            statuses.append(rig.send(body)[0])

        threads = [threading.Thread(target=click, args=(body,)) for body, _ in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200, 200]
        answers = [reply.wait(f"#{pending.number}") for _, reply in bodies]
        assert sum("its job starts now" in a for a in answers) == 1, answers
        number = pending.asked.number("Starting job #")
        assert f"race-{round_}" in rig.results(rig.final_card(number))
        assert len(rig.cards(number)) == 1
        assert sum("Starting job #" in t for t in pending.asked.texts()) == 1
        assert rig.rows("SELECT COUNT(*) FROM bot_job WHERE job_id = ?", pending.request_id) == [(1,)]
        assert rig.rows("SELECT COUNT(*) FROM approval_vote WHERE request_id = ?", pending.number) == [(2,)]
        assert [e["kind"] for e in rig.master_events(pending.request_id)].count("accepted") == 1


def test_deny_with_a_reason_from_the_modal(rig: Rig) -> None:
    pending = rig.ask('shell.exec localhost cmd="echo never"')
    opened_before = len(rig.fake.calls_to("views.open"))
    rig.click("om_deny", pending.request_id, pending.ts, MALLORY).wait(
        f"Only an approver (or the requester, to withdraw) can deny request #{pending.number}")
    assert len(rig.fake.calls_to("views.open")) == opened_before  # a stranger gets no modal

    rig.click("om_deny", pending.request_id, pending.ts, LEAD1)
    rig.fake.wait_for_call("views.open", lambda c: pending.request_id in json.dumps(c.body))
    view_id = next(v for v, view in rig.fake.views.items() if view.get("private_metadata") == pending.request_id)
    assert rig.fake.views[view_id]["callback_id"] == "om_deny_reason"

    def submit(reason: str) -> tuple[int, str]:
        payload = rig.fake.view_submission(view_id, {"reason": {"v": reason}}, user_id=LEAD1)
        return rig.send(interactive_body(payload))

    status, answer = submit("   ")
    assert status == 200 and json.loads(answer) == {"response_action": "errors",
                                                    "errors": {"reason": "A denial needs a reason."}}
    assert rig.rows("SELECT state FROM approval_request WHERE number = ?", pending.number) == [("pending",)]
    assert submit("change freeze until Monday") == (200, "")
    denied = rig.approval_message(pending.number, "denied")
    assert f"denied by <@{LEAD1}>: change freeze until Monday" in denied["text"]
    assert not any(b["type"] == "actions" for b in denied["blocks"])
    rig.fake.wait_for(lambda: any(f"Request #{pending.number} (`shell.exec`) was denied by <@{LEAD1}>" in m["text"]
                                  for m in rig.fake.messages(CHANNEL)), what="the requester to be told")
    # a late click, and a second submit of the same modal, find the request decided
    rig.approve(pending, LEAD2).wait(f"Request #{pending.number} is no longer open: it was denied")
    status, answer = submit("again")
    assert "no longer open" in json.loads(answer)["errors"]["reason"]


@pytest.mark.slow
def test_expired_request_is_shown_and_refuses_later_clicks(rig: Rig) -> None:
    pending = rig.ask("facts localhost")
    expired = rig.approval_message(pending.number, "expired")
    assert "expired before enough approvals" in expired["text"]
    assert not any(b["type"] == "actions" for b in expired["blocks"])
    rig.fake.wait_for(lambda: any(f"Request #{pending.number} (`facts`) expired" in m["text"]
                                  for m in rig.fake.messages(CHANNEL)), what="the requester to be told")
    rig.approve(pending, LEAD1).wait(f"Request #{pending.number} is no longer open: it was expired")
    assert not rig.rows("SELECT * FROM bot_job WHERE job_id = ?", pending.request_id)


@pytest.mark.slow
def test_restart_keeps_pending_requests_and_expires_overdue_ones(rig: Rig) -> None:
    waiting = rig.ask('shell.exec localhost cmd="echo after-restart"')
    overdue = rig.ask('shell.exec localhost cmd="echo too-late"')

    def time_passes() -> None:  # while the bot is down, the second request's expiry passes
        with rig.db() as conn:
            conn.execute("UPDATE approval_request SET expires_at = ? WHERE number = ?",
                         (int(time.time() * 1000) - 1000, overdue.number))  # epoch ms, as stored

    rig.restart_bot(between=time_passes)
    rig.approval_message(overdue.number, "expired")  # expired at start, message updated
    rig.approve(waiting, LEAD1).wait("its job starts now")
    card = rig.final_card(waiting.asked.number("Starting job #"))
    assert "after-restart" in rig.results(card)
    rig.approve(overdue, LEAD1).wait("no longer open: it was expired")


def test_master_refuses_gated_module_without_approvals(rig: Rig) -> None:
    router = rig.cluster.router(requester=ALICE)
    try:
        for approvers in ([], [ALICE], [LEAD1, LEAD1]):
            with pytest.raises(Refused) as refused:
                router.submit("local", "shell.exec", {"cmd": "true"}, ["localhost"], approvers=approvers,
                              requester=ALICE)
            assert refused.value.code == "approval_required", approvers
        ref, _ = router.submit("local", "shell.exec", {"cmd": "true"}, ["localhost"], approvers=[LEAD1],
                               requester=ALICE)
        assert router.follow(ref, lambda event: None) == "ok"
    finally:
        router.close()


def test_cancel_permissions(rig: Rig) -> None:
    # an approved job: a stranger may not cancel it, its approver may
    pending = rig.ask("test.sleep localhost seconds=60")
    rig.approve(pending, LEAD1).wait("its job starts now")
    approved = pending.asked.number("Starting job #")
    card = rig.running_card(approved)
    button = next(b for b in card["blocks"] if b["type"] == "actions")["elements"][0]
    rig.click(button["action_id"], button["value"], card["ts"], MALLORY).wait("Refused: only the requester")
    rig.command(f"cancel {approved}", LEAD2).wait("Refused: only the requester")  # a lead, but not its approver
    rig.click(button["action_id"], button["value"], card["ts"], LEAD1).wait(f"Cancelling job #{approved}")
    final = rig.final_card(approved)
    assert f"[#{approved} cancelled]" in final["text"] and f"cancel requested by <@{LEAD1}>" in final["text"]

    # a job without approval: the rule's cancel role may cancel it
    plain = rig.command("test.sleep web01 seconds=60").number("Starting job #")
    rig.running_card(plain)
    rig.command(f"cancel {plain}", DBA).wait("Refused: only the requester")
    rig.command(f"cancel {plain}", ONCALL).wait(f"Cancelling job #{plain}")
    assert f"[#{plain} cancelled]" in rig.final_card(plain)["text"]


def test_group_membership_comes_from_slack_and_fails_closed(rig: Rig) -> None:
    rig.restart_bot()  # a new process: nothing cached about user groups
    rig.fake.fail("usergroups.users.list", "ratelimited", times=1000)
    try:
        rig.command("echo localhost message=grouped", BOB).wait("Refused: you hold no role")
        assert rig.fake.calls_to("usergroups.users.list")
    finally:
        rig.fake.fail("usergroups.users.list", "ratelimited", times=0)
    rig.restart_bot()  # the failure is cached for a while (fail closed meanwhile): a fresh process reads it again
    number = rig.command("echo localhost message=grouped", BOB).number("Starting job #")
    assert f"[#{number} ok]" in rig.final_card(number)["text"]


def test_text_fallbacks_apply_the_same_checks(rig: Rig) -> None:
    first = rig.ask('shell.exec localhost cmd="echo by-text"')
    second = rig.ask('shell.exec localhost cmd="echo denied-by-text"')
    listing = rig.command("approvals", LEAD2).wait(f"#{first.number} `shell.exec`")  # asked to approve: sees
    assert f"#{second.number} `shell.exec` on 1 host(s) in local by <@{ALICE}>: 0/1 approvals" in listing
    assert f"#{first.number} " not in rig.command("approvals", MALLORY).first()  # no role: sees none

    rig.command(f"approve {first.number}", MALLORY).wait(f"You are not an approver for request #{first.number}")
    rig.command(f"deny {second.number} nope", MALLORY).wait("Only an approver")
    rig.command(f"deny {second.number}", LEAD2).wait("deny needs a reason")
    rig.command("approve 99999", LEAD1).wait("No approval request '99999'")
    for ref in ("\u00b2", "9" * 25, "#0"):  # a digit int() refuses, a number SQLite refuses
        rig.command(f"approve {ref}", LEAD1).wait(f"No approval request {ref!r}")

    rig.command(f"approve {first.number}", LEAD1).wait("its job starts now")
    assert "by-text" in rig.results(rig.final_card(first.asked.number("Starting job #")))
    rig.command(f"deny {second.number} not during the freeze", LEAD2).wait(f"Denied request #{second.number}.")
    assert "not during the freeze" in rig.approval_message(second.number, "denied")["text"]
    rig.command(f"approve {second.number}", LEAD1).wait("no longer open: it was denied")
    after = rig.command("approvals").first()
    assert f"#{first.number} " not in after and f"#{second.number} " not in after


def test_help_and_modules_show_only_what_the_caller_may_run(rig: Rig) -> None:
    def listed(text: str) -> set[str]:
        return set(re.findall(r"`([a-z][\w.]*)` \(", text))

    assert listed(rig.command("modules", ALICE).wait("echo")) == {"echo", "shell.exec", "test.sleep", "facts"}
    assert listed(rig.command("modules", DBA).wait("echo")) == {"echo"}
    assert listed(rig.command("modules", LEAD1).wait("shell.exec")) == {"shell.exec", "test.sleep"}
    assert "No modules you may run" in rig.command("modules", MALLORY).wait("No modules")
    assert "Modules you may run: none" in rig.command("help", ONCALL).wait("Modules you may run")
    helped = rig.command("help", BOB).wait("Modules you may run")  # through the S0OPS user group
    assert "`echo`" in helped and "`shell.exec`" in helped and "`ping`" not in helped


def test_the_trail_records_every_action(rig: Rig) -> None:
    since = int(time.time() * 1000)  # the trail's `at` is epoch ms
    rig.command("echo localhost message=x", MALLORY).wait("Refused")
    ran = rig.command("echo localhost message=trail").number("Starting job #")
    pending = rig.ask('shell.exec localhost cmd="echo trail"')
    rig.approve(pending, MALLORY).wait("not an approver")
    rig.approve(pending, LEAD1).wait("its job starts now")
    rig.final_card(ran)
    job = pending.asked.number("Starting job #")
    rig.command(f"cancel {job}", MALLORY).wait("Refused")
    card = rig.fake.wait_for(lambda: rig.cards(job), what=f"the card of job #{job}")[0]
    rig.click("om_cancel", pending.request_id, card["ts"], MALLORY).wait("Refused")  # the job id is the request id

    def entries() -> list[tuple[Any, ...]]:
        return rig.rows("SELECT at, user, channel, origin, action, detail, outcome FROM chat_trail "
                        "WHERE at >= ? ORDER BY id", since)

    def seen(rows: list[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
        return {(user, action, outcome.split(":")[0]) for _, user, _, _, action, _, outcome in rows}

    expected = {(MALLORY, "command", "refused"), (ALICE, "command", "ok"), (MALLORY, "approve click", "error"),
                (LEAD1, "approve click", "ok"), (MALLORY, "cancel click", "refused")}
    # Each click is written to the trail after its answer: wait for the entries, not for a count of them.
    rig.fake.wait_for(lambda: len(entries()) >= 7 and expected <= seen(entries()), what="the trail entries")
    rows = entries()
    assert all(since <= at <= time.time() * 1000 and channel == CHANNEL and origin == "slack"
               for at, _, channel, origin, *_ in rows), rows
    refusal = next(r for r in rows if r[1] == MALLORY and r[4] == "command" and r[5].startswith("echo"))
    assert "you hold no role" in refusal[6]  # MALLORY holds none: refused before any expansion
    cancel = next(r for r in rows if r[5] == f"cancel {job}")
    assert cancel[6].startswith("refused: only the requester")
    click = next(r for r in rows if r[1] == LEAD1 and r[4] == "approve click")
    assert click[5] == pending.request_id


def test_deny_modal_is_in_the_trail(rig: Rig) -> None:
    since = int(time.time() * 1000)  # the trail's `at` is epoch ms
    pending = rig.ask('shell.exec localhost cmd="echo x"')
    rig.click("om_deny", pending.request_id, pending.ts, LEAD3)
    rig.fake.wait_for_call("views.open", lambda c: pending.request_id in json.dumps(c.body))
    view_id = next(v for v, view in rig.fake.views.items() if view.get("private_metadata") == pending.request_id)
    payload = rig.fake.view_submission(view_id, {"reason": {"v": "wrong host"}}, user_id=LEAD3)
    assert rig.send(interactive_body(payload)) == (200, "")
    rows = rig.fake.wait_for(lambda: rig.rows("SELECT user, channel, action, outcome FROM chat_trail "
                                              "WHERE at >= ? AND action = 'deny form'", since), what="the deny form")
    assert rows == [(LEAD3, CHANNEL, "deny form", "ok")]


# -- console mode -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_console_approval_flow_with_as(tmp_path: Path) -> None:
    with console_site(tmp_path / "console", user=ALICE, policy=POLICY, extra_toml=MASTER_FLOOR,
                      console_allow_as=True) as site, console(site) as child:
        child.expect_exact(f"you are {ALICE}")
        child.sendline('/om shell.exec localhost cmd="echo from-the-console"')
        child.expect_exact("Waiting as request #1")
        child.sendline("/om approve 1")
        child.expect_exact("You are not an approver for request #1")
        child.sendline(f"/as {LEAD1}")
        child.expect_exact(f"you are now {LEAD1}")
        child.sendline("/om approve 1")
        child.expect_exact("its job starts now")
        child.expect_exact("[#1 ok] shell.exec on 1 host(s) in local by U0ALICE")
        child.expect_exact("from-the-console")
        child.sendline("/quit")
        child.expect(pexpect.EOF)


# -- the gate itself, under a real race ---------------------------------------------------------------


def test_gate_starts_exactly_once_under_many_concurrent_approvals(tmp_path: Path) -> None:
    """Ten approvers hit one needs-3 request at the same moment, twenty times over: one start each."""
    users = [f"U0AP{i:02d}" for i in range(10)]
    policy = parse_policy(tmp_path / "p.toml", {
        "roles": {"ops": {"users": ["U0REQ"]}, "leads": {"users": users}},
        "rules": [{"name": "gated", "request": ["ops"], "approval": {"count": 3, "roles": ["leads"]}}],
    })
    db = connect_url(f"sqlite:///{tmp_path / 'gate.db'}")
    db.connect()
    approvals.bind(db)
    gate = Gate(policy, lambda group: frozenset())
    for _ in range(20):
        decision = gate.decide("U0REQ", "echo", ["localhost"], "local")
        request = gate.open_request(requester="U0REQ", origin="slack", channel=CHANNEL, reply_url=None,
                                    idc="local", module="echo", params={}, hosts=["localhost"], timeout=None,
                                    decision=decision)
        barrier = threading.Barrier(len(users))
        starts: list[bool] = []

        def vote(user: str) -> None:
            barrier.wait()
            try:
                starts.append(gate.approve(str(request.number), user).start)
            except ApprovalError as exc:  # too late: the request was already approved
                assert "no longer open: it was approved" in str(exc)

        threads = [threading.Thread(target=vote, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert starts.count(True) == 1, starts
        assert astore.find_request(str(request.number)).state == astore.APPROVED
