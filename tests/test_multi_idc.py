"""Several IDCs in one request (`idc=bj,sh`, `idc=*`), end to end: signed Slack requests to a real
`ombot bot` (HTTP mode), the fake Slack Web API, and real masters on two backends: IDC bj's master
runs commands on this machine (`local`), IDC sh's drives real sshd "hosts" on loopback through
Ansible (tests/sshd.py). IDC gz's one master is never started: a part there reaches no master.

Both IDCs hold hosts named web01 and web02 (bj also web03): the same names on different machines,
so each check says which IDC's master ran what. The policy's `max_hosts = 4` is above any one part
and below the whole request for the group `web` (3 + 2 hosts).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ombot.approvals import Gate, PolicyRefusal, authorize_parts
from ombot.approvals.policy import parse_policy
from ombot import config as cfg
from ombot.errors import ConfigError
from tests import sshd
from tests.rigs import (
    CHANNEL, SHOWN_PROMPT, SlackRig, approval, console, console_site, floor, policy, quit_console, role, rule, say,
)
from tests.support import BotProcess, Cluster

ALICE, LEAD1 = "U0ALICE", "U0LEAD1"

POLICY = policy(role("ops", ALICE, "cli:test"), role("leads", LEAD1),
                rule("shell needs a lead", modules=["shell.exec"], request=["ops"], approval=approval()),
                rule("everyday", modules=["echo", "ping", "test.sleep"], request=["ops"], max_hosts=4))
# Each master's own floor: the approver must reach every part's master.
FLOORS = floor("bj-1", "sh-1")


# -- the rig ----------------------------------------------------------------------------------------


class Rig(SlackRig):
    """The rig, with a request over several IDCs in mind: one card for every part, each part's job."""

    def card_when(self, number: int, needle: str | re.Pattern[str], timeout: float = 60) -> dict[str, Any]:
        """The request's card once its text shows `needle` (the card is updated in place)."""
        def found() -> dict[str, Any] | None:
            cards = self.cards(number)
            assert len(cards) <= 1, [c["text"] for c in cards]  # one card for every part, never one each
            text = cards[0]["text"] if cards else ""
            hit = needle.search(text) if isinstance(needle, re.Pattern) else needle in text
            return cards[0] if hit else None
        return self.fake.wait_for(found, timeout, what=f"card #{number} showing {needle!r}: {self.cards(number)}")

    def results(self, card: dict[str, Any], count: int) -> list[str]:
        return [m["text"] for m in self.replies(card, count, timeout=60)]

    def approval_messages(self, number: int) -> list[dict[str, Any]]:
        return [m for m in self.fake.messages(CHANNEL) if m.get("text", "").startswith(f"[approval #{number} ")]

    def master_jobs(self, master_id: str) -> dict[str, dict[str, Any]]:
        """Every job the master accepted: id -> hosts, approvers, state."""
        rows = self.master_rows(master_id, "SELECT id, hosts, approvers, state, module FROM job")
        return {r[0]: {"hosts": json.loads(r[1]), "approvers": json.loads(r[2]), "state": r[3], "module": r[4]}
                for r in rows}

    def is_part(self, job_id: str) -> bool:
        """Whether the bot stored the job as a part of a request over several IDCs (bot_multi_part)."""
        return bool(self.rows("SELECT 1 FROM bot_multi_part WHERE job_id = ?", job_id))

    def bot_jobs(self, *numbers: int) -> dict[int, tuple[str, str, str]]:
        """number -> (job id, idc, state) in the bot's database."""
        rows = self.rows(f"SELECT number, job_id, idc, state FROM bot_job WHERE number IN "
                         f"({','.join('?' * len(numbers))})", *numbers)
        return {r[0]: (r[1], r[2], r[3]) for r in rows}


def part_numbers(card: dict[str, Any]) -> dict[str, int]:
    """IDC -> the part's job number, from the card's lines (`bj #5: ok · ...`)."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+) #(\d+): ", card["text"], re.M)}


def in_section(text: str, table: str, old: str, new: str) -> str:
    """Replace `old` with `new` once, inside the TOML table `[table]` only."""
    head, sep, rest = text.partition(f"[{table}]\n")
    assert sep and old in rest
    return head + sep + rest.replace(old, new, 1)


def drop_tables(text: str, names: set[str]) -> str:
    """The TOML text without the tables `names` (each from its header to the next header)."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        header = re.match(r"^\[([^\]]+)\]\s*$", line)
        if header:
            dropping = header.group(1) in names
        if not dropping:
            kept.append(line)
    return "".join(kept)


def sh_on_ansible(hosts: sshd.SshHosts) -> Callable[[Cluster], None]:
    """The site's edit: IDC sh's master drives the sshd hosts through Ansible; all-up.toml is the same
    site without gz, whose master never answers (`idc=*` there can succeed everywhere)."""
    def prepare(cluster: Cluster) -> None:
        (cluster.root / "inventory-sh.ini").write_text(hosts.inventory(group="web", unreachable=None))
        text = in_section(cluster.config_path.read_text(), "masters.sh-1", 'inventory = "inventory.ini"',
                          'inventory = "inventory-sh.ini"\nbackend = "ansible"')
        cluster.config_path.write_text(text)
        without_gz = drop_tables(text, {"idcs.gz", "masters.gz-1", "masters.gz-1.limits"})
        assert "gz-1" not in without_gz and "[bot]" in without_gz
        (cluster.root / "all-up.toml").write_text(without_gz)
    return prepare


@pytest.fixture(scope="module")
def shared_rig(hosts: sshd.SshHosts, make_module_slack_rig) -> Rig:
    return make_module_slack_rig({"bj": ["bj-1"], "sh": ["sh-1"], "gz": ["gz-1"]}, kind=Rig, policy=POLICY,
                                 extra_toml=FLOORS, prepare=sh_on_ansible(hosts), start=["bj-1", "sh-1"])


@pytest.fixture
def rig(shared_rig: Rig) -> Iterator[Rig]:
    yield shared_rig
    shared_rig.fake.assert_no_violations()


# -- through Slack ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_request_runs_in_both_idcs_on_one_card(rig: Rig) -> None:
    number = rig.command("ping web01,web02 idc=bj,sh").number("Starting job #")
    card = rig.card_when(number, re.compile(r"^\[#\d+ ok\].*: 4/4 hosts"))  # both parts whole (see the restart test)
    assert card["text"].startswith(f"[#{number} ok] ping on 4 host(s) in bj,sh by {ALICE}: 4/4 hosts · 4 ok · 0 failed")
    parts = part_numbers(card)
    assert parts["bj"] == number and set(parts) == {"bj", "sh"}
    assert f"bj #{parts['bj']}: ok · 2/2 hosts · 2 ok · 0 failed" in card["text"]
    assert f"sh #{parts['sh']}: ok · 2/2 hosts · 2 ok · 0 failed" in card["text"]
    assert not rig.cards(parts["sh"])  # the sh part has no card of its own
    assert not any(b["type"] == "actions" for b in card["blocks"])  # finished: no Cancel button
    assert len(rig.results(card, 2)) == 2  # each part's results in the one thread

    # Each part went to its own IDC's master, with exactly its own hosts, on that master's backend.
    jobs = rig.bot_jobs(parts["bj"], parts["sh"])
    bj_job, sh_job = jobs[parts["bj"]][0], jobs[parts["sh"]][0]
    assert (jobs[parts["bj"]][1:], jobs[parts["sh"]][1:]) == (("bj", "ok"), ("sh", "ok"))
    # each part's counts are stored with its end: the other part's render (or a restarted bot's) shows them
    assert rig.rows("SELECT hosts_ok, hosts_failed FROM bot_job WHERE number IN (?, ?)",
                    parts["bj"], parts["sh"]) == [(2, 0), (2, 0)]
    assert rig.master_jobs("bj-1")[bj_job]["hosts"] == ["web01", "web02"]
    assert rig.master_jobs("sh-1")[sh_job]["hosts"] == ["web01", "web02"]
    assert bj_job not in rig.master_jobs("sh-1") and sh_job not in rig.master_jobs("bj-1")
    router = rig.cluster.router(ALICE)
    try:
        from ombot.masters import JobRef

        sh_events = router.events(JobRef(sh_job, "sh", "sh-1"))["events"]
        bj_events = router.events(JobRef(bj_job, "bj", "bj-1"))["events"]
    finally:
        router.close()
    sh_hosts = [e["data"] for e in sh_events if e["kind"] == "host"]
    bj_hosts = [e["data"] for e in bj_events if e["kind"] == "host"]
    assert all(h["data"]["ansible"]["ok"] == 1 for h in sh_hosts)  # Ansible's own counts: ssh to the sshds
    assert all("ansible" not in (h.get("data") or {}) for h in bj_hosts)  # the local backend


@pytest.mark.slow
def test_a_check_run_over_both_idcs_is_a_check_in_each(rig: Rig) -> None:
    """check=yes reaches every part: the Ansible part runs --check, the local part's master refuses
    (no check mode there) and that part alone fails; nothing runs for real."""
    number = rig.command("ping web01,web02 idc=bj,sh check=yes").number("Starting job #")
    card = rig.card_when(number, re.compile(r"^\[#\d+ (partial|failed|ok)\]"))
    parts = part_numbers(card)
    assert "check run" in card["text"].split("\n")[0], card["text"]
    assert re.search(rf"bj #{parts['bj']}: failed: .*no check mode", card["text"]), card["text"]
    assert f"sh #{parts['sh']}: ok · 2/2 hosts" in card["text"], card["text"]
    sh_job = rig.bot_jobs(parts["sh"])[parts["sh"]][0]
    assert sh_job in rig.master_jobs("sh-1")
    assert not any(j for j in rig.master_jobs("bj-1") if j == rig.bot_jobs(parts["bj"])[parts["bj"]][0])


def shell_jobs(rig: Rig) -> set[str]:
    return {job_id for m in ("bj-1", "sh-1") for job_id, j in rig.master_jobs(m).items() if j["module"] == "shell.exec"}


@pytest.mark.slow
def test_one_approval_covers_every_part(rig: Rig) -> None:
    before = shell_jobs(rig)
    asked = rig.command('shell.exec web01 idc=bj,sh cmd="echo approved-once"')
    request = asked.number("Waiting as request #")
    assert "needs 1 approval(s) from leads" in asked.wait("Waiting as request")
    messages = rig.fake.wait_for(lambda: rig.approval_messages(request) or None, what="the approval message")
    assert len(messages) == 1  # one approval message for both parts
    message = messages[0]
    assert "shell.exec on 2 host(s) in bj,sh" in message["text"]
    assert "bj (1 host): web01" in message["text"] and "sh (1 host): web01" in message["text"]
    assert "hosts per IDC" in json.dumps(message["blocks"])
    assert shell_jobs(rig) == before  # nothing reached a master before the approval

    buttons = next(b for b in message["blocks"] if b["type"] == "actions")["elements"]
    rig.click("om_approve", buttons[0]["value"], message["ts"], LEAD1).wait(
        f"Approved request #{request}; its job starts now")
    number = asked.number("Starting job #")
    card = rig.card_when(number, re.compile(r"^\[#\d+ ok\]"))
    parts = part_numbers(card)
    assert set(parts) == {"bj", "sh"}
    results = rig.results(card, 2)
    assert sum("approved-once" in r for r in results) == 2
    jobs = rig.bot_jobs(*parts.values())
    for idc, master in (("bj", "bj-1"), ("sh", "sh-1")):
        accepted = rig.master_jobs(master)[jobs[parts[idc]][0]]
        assert accepted["approvers"] == [LEAD1] and accepted["state"] == "ok"  # each master's floor was met
    assert "approved (1/1)" in rig.approval_messages(request)[0]["text"]


@pytest.mark.slow
def test_a_part_whose_masters_are_down_fails_while_the_other_runs(rig: Rig) -> None:
    number = rig.command("ping web01 idc=bj,gz").number("Starting job #")
    card = rig.card_when(number, re.compile(r"^\[#\d+ partial\]"))
    parts = part_numbers(card)
    assert f"bj #{parts['bj']}: ok · 1/1 hosts · 1 ok · 0 failed" in card["text"]
    assert re.search(rf"^gz #{parts['gz']}: failed: cannot reach the masters of gz: no master of IDC 'gz' "
                     r"could be reached: gz-1 at 127\.0\.0\.1:\d+", card["text"], re.M)
    jobs = rig.bot_jobs(*parts.values())
    assert jobs[parts["gz"]][1:] == ("gz", "failed") and jobs[parts["bj"]][1:] == ("bj", "ok")


@pytest.mark.slow
def test_a_part_whose_masters_went_down_before_submit_fails_while_the_other_runs(rig: Rig) -> None:
    asked = rig.command('shell.exec web02 idc=bj,sh cmd="echo after-approval"')
    request = asked.number("Waiting as request #")
    message = rig.fake.wait_for(lambda: next(iter(rig.approval_messages(request)), None), what="the approval")
    rig.cluster.processes["sh-1"].stop()  # the hosts were expanded; now sh has no master
    try:
        buttons = next(b for b in message["blocks"] if b["type"] == "actions")["elements"]
        rig.click("om_approve", buttons[0]["value"], message["ts"], LEAD1).wait("its job starts now")
        number = asked.number("Starting job #")
        card = rig.card_when(number, re.compile(r"^\[#\d+ partial\]"))
        parts = part_numbers(card)
        assert f"bj #{parts['bj']}: ok · 1/1 hosts · 1 ok · 0 failed" in card["text"]
        assert re.search(rf"^sh #{parts['sh']}: failed: no master of IDC 'sh' could be reached", card["text"], re.M)
        assert any("after-approval" in r for r in rig.results(card, 1))
    finally:
        rig.cluster.start("sh-1")


@pytest.mark.slow
def test_a_bot_restart_mid_run_finishes_the_one_card(rig: Rig) -> None:
    number = rig.command("test.sleep web01 idc=bj,sh seconds=8").number("Starting job #")
    rig.card_when(number, re.compile(r"^bj #\d+: (queued|running).*\n^sh #\d+: (queued|running)", re.M | re.S))
    rig.bot.stop()  # a clean stop lets go of both parts: the next bot adopts them at once
    rig.bot = BotProcess(rig.cluster, rig.bot.env).start(rig.port)
    # Both parts may end at once: the first to render shows the other as the database has it (state,
    # no counts) for the moment until the other's own render, the card's last, shows both whole.
    card = rig.card_when(number, re.compile(r"^\[#\d+ ok\].*: 2/2 hosts"), timeout=90)
    parts = part_numbers(card)
    for idc in ("bj", "sh"):  # the adopting bot read each part's events again: its counts are whole
        assert f"{idc} #{parts[idc]}: ok · 1/1 hosts · 1 ok · 0 failed" in card["text"]
    assert len(rig.results(card, 2)) == 2


@pytest.mark.slow
def test_max_hosts_counts_the_whole_request(rig: Rig) -> None:
    before = {m: set(rig.master_jobs(m)) for m in ("bj-1", "sh-1")}
    reply = rig.command("echo web idc=bj,sh message=too-many")
    assert reply.wait("over the limit") == ("Refused: 5 hosts (bj 3, sh 2) is over the limit of 4 for the whole "
                                            "request, set by rule `everyday` in bj")
    # each part alone is within the limit
    number = rig.command("echo web idc=bj message=alone").number("Starting job #")
    assert rig.fake.wait_for(lambda: next((c for c in rig.cards(number) if c["text"].startswith(f"[#{number} ok]")),
                                          None), 60, what="the bj-only job")
    assert {m: set(rig.master_jobs(m)) - before[m] for m in ("bj-1", "sh-1")} == {
        "bj-1": {rig.bot_jobs(number)[number][0]}, "sh-1": set()}  # the refused request reached no master


@pytest.mark.slow
@pytest.mark.parametrize("how", ["button", "command"])
def test_cancel_stops_every_part(rig: Rig, how: str) -> None:
    number = rig.command("test.sleep web01 idc=bj,sh seconds=120").number("Starting job #")
    card = rig.card_when(number, re.compile(r"^bj #\d+: running.*\n^sh #\d+: running", re.M | re.S))
    parts = part_numbers(card)
    if how == "button":
        button = next(b for b in card["blocks"] if b["type"] == "actions")["elements"][0]
        reply = rig.click(button["action_id"], button["value"], card["ts"], ALICE)
    else:  # any part's number names the whole request
        reply = rig.command(f"cancel {parts['sh']}")
    said = reply.wait("Cancelling job")
    assert f"bj #{parts['bj']} cancelling" in said and f"sh #{parts['sh']} cancelling" in said
    card = rig.card_when(number, re.compile(r"^\[#\d+ cancelled\]"), timeout=90)
    assert re.search(rf"^bj #{parts['bj']}: cancelled", card["text"], re.M)
    assert re.search(rf"^sh #{parts['sh']}: cancelled", card["text"], re.M)
    jobs = rig.bot_jobs(*parts.values())
    assert rig.master_jobs("bj-1")[jobs[parts["bj"]][0]]["state"] == "cancelled"
    assert rig.master_jobs("sh-1")[jobs[parts["sh"]][0]]["state"] == "cancelled"


@pytest.mark.slow
def test_a_list_naming_one_idc_is_a_plain_request(rig: Rig) -> None:
    """`idc=sh,` names one IDC: bot.multi hands it to the single-IDC path, so the answer, the job and
    its card are those of `idc=sh` (one job, no part, no per-IDC lines). sh, not the default IDC bj:
    the job must go where the list says."""
    seen = []
    for idc in ("sh,", "sh"):
        reply = rig.command(f"ping web01 idc={idc}")
        number = reply.number("Starting job #")
        assert reply.wait("Starting job #") == f"Starting job #{number}: `ping` on 1 host(s) in sh: web01"
        card = rig.card_when(number, re.compile(r"^\[#\d+ ok\]"))
        job_id, where, state = rig.bot_jobs(number)[number]
        assert (where, state) == ("sh", "ok") and not rig.is_part(job_id)
        assert rig.master_jobs("sh-1")[job_id]["hosts"] == ["web01"] and job_id not in rig.master_jobs("bj-1")
        seen.append(re.sub(r" · took .*", "", card["text"].replace(f"#{number} ", "#N ")))
    assert seen[0] == seen[1] == f"[#N ok] ping on 1 host(s) in sh by {ALICE}: 1/1 hosts · 1 ok · 0 failed"


# -- the CLI ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ombot_run_in_every_idc_exits_0_only_when_every_part_succeeded(rig: Rig) -> None:
    all_up = rig.cluster.root / "all-up.toml"
    ran = rig.cluster.ombot("--config", str(all_up), "run", "ping", "web01", "idc=*")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "ping on 1 host(s) in bj: web01" in ran.stdout and "ping on 1 host(s) in sh: web01" in ran.stdout
    assert re.search(r"^bj: ok$", ran.stdout, re.M) and re.search(r"^sh: ok$", ran.stdout, re.M)

    ran = rig.cluster.ombot("run", "ping", "web01", "--idc", "*")  # gz's master never answers
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert re.search(r"^bj: ok$", ran.stdout, re.M) and re.search(r"^sh: ok$", ran.stdout, re.M)
    assert re.search(r"^gz: failed: no master of IDC 'gz' could be reached", ran.stdout, re.M)

    refused = rig.cluster.ombot("--config", str(all_up), "run", "echo", "web", "message=x", "idc=bj,sh")
    assert refused.returncode == 2  # over max_hosts for the whole request: nothing ran
    assert "5 hosts (bj 3, sh 2) is over the limit of 4" in refused.stderr


@pytest.mark.slow
def test_every_idc_when_only_one_is_configured_is_a_plain_request(tmp_path: Path) -> None:
    """`idc=*` in a site of one IDC: in `ombot console` (the same dispatcher as Slack) the job and its
    card are those of a single-IDC request, with no per-IDC lines."""
    with console_site(tmp_path / "site", {"bj": ["bj-1"]}, user=ALICE, policy=POLICY) as cluster, \
            console(cluster) as child:
        child.expect_exact(SHOWN_PROMPT)  # a terminal shows the prompt's trailing space as a cursor move
        say(child, "/om ping web01 idc=*")
        child.expect_exact(f"(to {ALICE}) Starting job #1: `ping` on 1 host(s) in bj: web01")
        child.expect(rf"\[#1 ok\] ping on 1 host\(s\) in bj by {ALICE}: 1/1 hosts · 1 ok · 0 failed[^\n]*\r?\n")
        child.expect_exact("Results of #1")
        assert quit_console(child) == 0
        assert "IDCs" not in child.logfile_read.text and "bj #1: " not in child.logfile_read.text  # no split
    with sqlite3.connect(cluster.root / "state" / "bot.db", timeout=10) as conn:
        jobs = conn.execute("SELECT number, idc, state, hosts FROM bot_job").fetchall()
        assert jobs == [(1, "bj", "ok", '["web01"]')]
        assert conn.execute("SELECT count(*) FROM bot_multi_part").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM bot_multi_request").fetchone() == (0,)


# -- the policy and the config, without processes ---------------------------------------------------


def gate(policy: str) -> Gate:
    parsed = parse_policy(Path("policy.toml"), __import__("tomllib").loads(policy))
    return Gate(parsed, lambda group: frozenset())


def test_parts_are_decided_per_idc_and_combined_strictly() -> None:
    policy = gate(POLICY + '\n[[rules]]\nname = "sh only"\nmodules = ["facts"]\nidcs = ["sh"]\nrequest = ["ops"]\n'
                  '\n[roles.dbas]\nusers = ["U0DBA"]\n'
                  '\n[[rules]]\nname = "dba shell"\nmodules = ["script.run"]\nidcs = ["bj"]\nrequest = ["ops"]\n'
                  'approval = { count = 2, roles = ["dbas"] }\n'
                  '\n[[rules]]\nname = "lead script"\nmodules = ["script.run"]\nidcs = ["sh"]\nrequest = ["ops"]\n'
                  'approval = { count = 1, roles = ["leads"] }\n')
    decision = authorize_parts(policy, ALICE, "echo", [("bj", ["web01", "web02"]), ("sh", ["web01", "web02"])])
    assert decision.allowed and not decision.needs_approval and decision.max_hosts == 4
    with pytest.raises(PolicyRefusal, match=r"^5 hosts \(bj 3, sh 2\) is over the limit of 4 for the whole request"):
        authorize_parts(policy, ALICE, "echo", [("bj", ["web01", "web02", "web03"]), ("sh", ["web01", "web02"])])
    with pytest.raises(PolicyRefusal, match=r"^in bj: no rule allows `facts` on web01 in bj"):
        authorize_parts(policy, ALICE, "facts", [("sh", ["web01"]), ("bj", ["web01"])])
    shell = authorize_parts(policy, ALICE, "shell.exec", [("bj", ["web01"]), ("sh", ["web01"])])
    assert shell.needs_approval and shell.approval is not None and shell.approval.roles == ("leads",)
    with pytest.raises(PolicyRefusal, match=r"different roles \(bj: dbas; sh: leads\)"):
        authorize_parts(policy, ALICE, "script.run", [("bj", ["web01"]), ("sh", ["web01"])])


def test_named_idcs() -> None:
    conf = cfg.Config(Path("ombot.toml"), None, {}, {"bj": ("bj-1",), "sh": ("sh-1",), "gz": ("gz-1",)}, {})
    assert cfg.named_idcs(conf, "*") == ["bj", "sh", "gz"]
    assert cfg.named_idcs(conf, "sh, bj,sh") == ["sh", "bj"]
    assert not cfg.several_idcs("bj") and not cfg.several_idcs(None)
    assert cfg.several_idcs("bj,sh") and cfg.several_idcs("*")
    with pytest.raises(Exception, match=r"unknown IDC 'xx' \(known: bj, sh, gz"):
        cfg.named_idcs(conf, "bj,xx")


def test_masters_of_one_idc_must_name_one_backend(tmp_path: Path) -> None:
    made = Cluster(tmp_path / "c", {"bj": ["bj-1", "bj-2"], "sh": ["sh-1"]})
    text = in_section(made.config_path.read_text(), "masters.sh-1", 'state_dir = "state-sh-1"',
                      'state_dir = "state-sh-1"\nbackend = "ansible"')
    made.config_path.write_text(text)
    assert cfg.load(made.config_path).masters["sh-1"].backend == "ansible"  # one backend per IDC: fine
    made.config_path.write_text(in_section(text, "masters.bj-2", 'state_dir = "state-bj-2"',
                                           'state_dir = "state-bj-2"\nbackend = "ansible"'))
    with pytest.raises(ConfigError) as caught:
        cfg.load(made.config_path)
    message = str(caught.value)
    assert "idcs.bj" in message and "one backend for all masters of IDC 'bj'" in message
    assert "bj-1 (local), bj-2 (ansible)" in message


def test_retention_forgets_a_split_once_its_parts_are_gone(tmp_path: Path) -> None:
    from ombot.bot import multi, store

    store.open_store(f"sqlite:///{tmp_path / 'bot.db'}")
    multi.prepare()
    long_ago = store.now() - 30 * 86_400_000
    for request_id in ("gone", "running", "pending"):
        multi.MultiRequest.create(request_id=request_id, parts=[{"idc": "bj", "hosts": ["web01"], "reason": ""}],
                                  created_at=store.now() if request_id == "pending" else long_ago)
    multi.MultiPart.create(job_id="job-gone", request_id="gone", idc="bj", position=0)  # its job was deleted
    multi.MultiPart.create(job_id="job-here", request_id="running", idc="bj", position=0)
    store.BotJob.create(job_id="job-here", requester=ALICE, origin="slack", channel=CHANNEL, idc="bj", module="echo",
                        params={}, host_count=1, hosts=["web01"], state="running", created_at=long_ago)
    multi.forget_before(store.now())
    assert sorted(r.request_id for r in multi.MultiRequest.select()) == ["pending", "running"]
    assert [p.job_id for p in multi.MultiPart.select()] == ["job-here"]
