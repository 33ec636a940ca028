"""The two pure functions every job's outcome passes through: the master's `final_state` (per-host
statuses -> the job's state) and the bot's `apply_event` (master events -> what the card shows)."""

from __future__ import annotations

from typing import Any

import pytest

from ombot.bot.jobs import apply_event
from ombot.bot.messages import CardState
from ombot.masters.backends.base import HostStatus
from ombot.masters.livejob import final_state
from ombot.masters.states import FINAL_STATES, JobState

OK, FAILED, UNREACHABLE = HostStatus.OK, HostStatus.FAILED, HostStatus.UNREACHABLE
TIMED_OUT, CANCELLED, UNKNOWN = HostStatus.TIMED_OUT, HostStatus.CANCELLED, HostStatus.UNKNOWN


@pytest.mark.parametrize("statuses, cancelled, expected", [
    ([OK], False, JobState.OK),
    ([OK, OK, OK], False, JobState.OK),
    ([], False, JobState.FAILED),  # no host result at all is never success
    ([FAILED], False, JobState.FAILED),
    ([UNREACHABLE, FAILED], False, JobState.FAILED),
    ([OK, FAILED], False, JobState.PARTIAL),
    ([OK, UNREACHABLE], False, JobState.PARTIAL),
    ([TIMED_OUT], False, JobState.TIMED_OUT),
    ([TIMED_OUT, FAILED], False, JobState.TIMED_OUT),
    ([TIMED_OUT, OK], False, JobState.PARTIAL),  # some hosts did finish
    ([CANCELLED, OK], True, JobState.CANCELLED),
    ([CANCELLED], True, JobState.CANCELLED),
    ([OK, OK], True, JobState.OK),  # a cancel that came after every host finished changes nothing
    ([CANCELLED], False, JobState.FAILED),  # a host cancelled without a cancel request is a failure
    ([TIMED_OUT, CANCELLED], True, JobState.CANCELLED),
    ([OK, UNKNOWN, FAILED], False, JobState.UNKNOWN),  # the backend lost sight of one host: not "partial"
    ([UNKNOWN, CANCELLED], True, JobState.UNKNOWN),
])
def test_final_state(statuses: list[HostStatus], cancelled: bool, expected: JobState) -> None:
    assert final_state(statuses, cancelled) is expected


def test_submitting_is_the_bots_state_before_a_master_accepts_and_never_final() -> None:
    assert card().state == JobState.SUBMITTING == "submitting"
    assert JobState.SUBMITTING not in FINAL_STATES and JobState.QUEUED not in FINAL_STATES


def card() -> CardState:
    return CardState(number=1, job_id="j", requester="U0A", module="echo", params={}, idc="local", hosts=3,
                     created_at=1_700_000_000_000)


def event(kind: str, at: int = 1_700_000_001_234, **data: Any) -> dict[str, Any]:
    return {"seq": 1, "kind": kind, "at": at, "data": data}


def test_apply_event_follows_a_job_through_its_events() -> None:
    shown, results = card(), {}
    assert shown.state == "submitting"
    apply_event(shown, results, event("accepted", hosts=["a", "b", "c"]))
    assert shown.state == "running" and (shown.done, shown.ok, shown.failed) == (0, 0, 0)
    apply_event(shown, results, event("host", host="a", status="ok"))
    apply_event(shown, results, event("host", host="b", status="unreachable"))
    assert (shown.done, shown.ok, shown.failed) == (2, 1, 1) and set(results) == {"a", "b"}
    apply_event(shown, results, event("cancel_requested", by="U0LEAD"))
    assert shown.note == "cancel requested by <@U0LEAD>" and shown.state == "running"
    apply_event(shown, results, event("host", host="c", status="cancelled"))
    apply_event(shown, results, event("finished", at=1_700_000_009_999, state="cancelled", counts={}))
    assert (shown.state, shown.finished_at, shown.final) == ("cancelled", 1_700_000_009_999, True)
    assert (shown.done, shown.ok, shown.failed) == (3, 1, 2)
    assert shown.note == "cancel requested by <@U0LEAD>"  # a finish without a reason keeps the note


def test_a_host_reported_twice_counts_once() -> None:
    shown, results = card(), {}
    apply_event(shown, results, event("host", host="a", status="failed"))
    apply_event(shown, results, event("host", host="a", status="ok"))
    assert (shown.done, shown.ok, shown.failed) == (1, 1, 0)


def test_a_late_accepted_never_reopens_a_final_card() -> None:
    shown, results = card(), {}
    apply_event(shown, results, event("finished", state="unknown", counts={}, reason="the master stopped"))
    apply_event(shown, results, event("accepted", hosts=["a"]))
    assert shown.state == "unknown" and shown.note == "the master stopped" and shown.final


def test_every_job_state_has_an_icon_on_the_card() -> None:
    from ombot.bot.messages import STATE_ICONS

    assert set(STATE_ICONS) == set(JobState)


def test_a_waiting_note_goes_once_hosts_report() -> None:
    shown, results = card(), {}
    apply_event(shown, results, event("accepted", hosts=["a"]))
    apply_event(shown, results, event("waiting", hosts=["a"], behind=["j0"]))
    assert shown.note == "waiting for a (busy with job j0)"
    apply_event(shown, results, event("host", host="a", status="ok"))
    assert shown.note == "" and shown.done == 1
    apply_event(shown, results, event("cancel_requested", by="U0LEAD"))
    apply_event(shown, results, event("host", host="b", status="cancelled"))
    assert shown.note == "cancel requested by <@U0LEAD>"  # other notes stay
