"""The agent's spool reader, notice budget and queue bound on their own (the attacks through the real
processes are in test_audit_hostile.py): what a user can put in the spool, and the time a record gets."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ombot.audit_agent import records, spool
from ombot.audit_agent.agent import NoticeBudget
from ombot.audit_agent.queue import EventQueue

UID = os.geteuid()


def line(text: str, when: float, pid: int = 4242) -> str:
    return "\t".join(["om1", f"{when:.6f}", str(pid), "1", "0", "history", str(UID), "", "tester", "/dev/pts/3",
                      "", "/srv", text, str(len(text))]) + "\n"


def spool_of(tmp_path: Path, text: str = "") -> Path:
    top = tmp_path / "spool"
    (top / str(UID)).mkdir(parents=True)
    (top / str(UID) / "spool").write_text(text)
    return top


def test_uid_names_are_ascii_digits_of_a_uid() -> None:
    assert spool.is_uid_name("0") and spool.is_uid_name("65534") and spool.is_uid_name(str(spool.UID_MAX))
    for name in ("\u00b2", "\u0663", "1\u00b2", "", "-1", "+1", " 1", "4294967295", "99999999999", "1e3"):
        assert not spool.is_uid_name(name), name


def test_printable_names_escape_bytes_that_are_not_utf8() -> None:
    assert records.printable(os.fsdecode(b"a\xffb")) == "a\\xffb" and records.printable("caf\u00e9") == "caf\u00e9"


def test_the_trusted_time_is_the_claim_clamped_into_the_read_window() -> None:
    assert records.trusted_time(1500, 1000, 2000) == 1500  # plausible: kept
    assert records.trusted_time(10, 1000, 2000) == 1000  # before the previous read: could not be new now
    assert records.trusted_time(9_999_999, 1000, 2000) == 2000  # after this read: not yet written
    assert records.trusted_time(None, 1000, 2000) == 2000
    assert records.trusted_time(1500, 3000, 2000) == 2000  # a window upside down (a clock stepped back)


def test_a_record_keeps_its_claimed_time_beside_the_trusted_one() -> None:
    kind, at, data = records.parse_record(line("ls", 1000.0).rstrip("\n"), UID, since_ms=5_000_000, read_ms=6_000_000)
    assert (kind, at, data["claimed_at"]) == ("command", 5_000_000, 1_000_000)


def test_a_backlog_read_over_several_passes_keeps_its_times(tmp_path: Path) -> None:
    """Lines left for the next pass (MAX_LINES a pass) keep the window of the read that found them
    unread, so their times are not squashed to the later passes."""
    start = time.time() - 3600
    count = spool.MAX_LINES + 100
    top = spool_of(tmp_path, "".join(line(f"c{n}", start + n / 10) for n in range(count)))
    offsets: dict[str, int] = {}
    scanner = spool.SpoolScanner(top, offsets, last_scan_ms=int((start - 60) * 1000))
    got = []
    for _ in range(2):
        for chunk in scanner.scan():
            offsets[chunk.key] = chunk.offset
            got += chunk.events
    assert len(got) == count and [at for _, at, _ in got] == [int((start + n / 10) * 1000) for n in range(count)]


def test_a_huge_sparse_spool_is_read_in_slices_and_its_endless_line_cut(tmp_path: Path) -> None:
    top = spool_of(tmp_path, line("echo before", time.time()))
    path = top / str(UID) / "spool"
    os.truncate(path, 3 << 30)
    with open(path, "a") as f:
        f.write("\n" + line("echo after", time.time()))
    offsets: dict[str, int] = {}
    scanner = spool.SpoolScanner(top, offsets)
    events = []
    for _ in range(4):
        for chunk in scanner.scan():
            offsets[chunk.key] = chunk.offset
            events += chunk.events
    assert [d.get("command") or d["code"] for _, _, d in events] == ["echo before", "spool_line", "echo after"]
    assert len(events[1][2]["line"]) <= records.SHOWN_BYTES


def test_a_spool_truncated_under_the_agent_is_read_again_from_its_start(tmp_path: Path) -> None:
    top = spool_of(tmp_path, line("echo one", time.time()) + line("echo two", time.time()))
    path = top / str(UID) / "spool"
    offsets: dict[str, int] = {}
    scanner = spool.SpoolScanner(top, offsets)
    for chunk in scanner.scan():
        offsets[chunk.key] = chunk.offset
    path.write_text(line("echo three", time.time()))  # shorter than what was read
    events = [e for chunk in scanner.scan() for e in chunk.events]
    assert [d.get("command") or d["code"] for _, _, d in events] == ["spool_truncated", "echo three"]


def test_junk_entries_are_reported_once_each_and_a_flood_of_them_once_in_all(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    top = spool_of(tmp_path)
    monkeypatch.setattr(spool, "MAX_REPORTED", 5)
    for n in range(8):
        (top / f"junk{n}").mkdir()
    scanner = spool.SpoolScanner(top, {})
    first = [d["problem"] for chunk in scanner.scan() for _, _, d in chunk.events]
    assert len(first) == 6 and "over 5 unexpected entries" in first[-1]
    (top / "junk9").mkdir()  # the listing changes: nothing is reported twice
    assert [e for chunk in scanner.scan() for e in chunk.events] == []


def test_the_notice_budget_holds_back_a_flood_and_says_how_many() -> None:
    budget = NoticeBudget(burst=3, every=3600)
    flood = [records.notice("spool_line", "junk", uid=1000) for _ in range(10)]
    other = [records.notice("spool_line", "junk", uid=1001)]
    command = ("command", 1, {"command": "ls"})
    assert len(budget.admit(flood + other + [command])) == 3 + 1 + 1  # the burst, another user's, the command
    assert budget.held == {"uid 1000": 7} and budget.summaries() == []  # no token left to say it yet
    budget._tokens["uid 1000"] = 1.0
    said = budget.summaries()
    assert len(said) == 1 and said[0][2]["count"] == 7 and budget.held == {}


def test_a_full_queue_drops_from_the_user_with_the_most_queued(tmp_path: Path) -> None:
    queue = EventQueue(tmp_path / "state", "web01", max_events=10)
    queue.add([("command", n, {"uid": 0, "command": f"root{n}"}) for n in range(3)])
    queue.add([("command", 10 + n, {"uid": 1000, "command": f"flood{n}"}) for n in range(20)])
    kept = queue.batch(100, 1 << 20)
    dropped = [e for e in kept if e["kind"] == "dropped"]
    assert [e["data"]["command"] for e in kept if e["kind"] == "command"][:3] == ["root0", "root1", "root2"]
    assert len(dropped) == 1 and dropped[0]["data"]["uids"] == {"1000": 14}
    queue.close()
