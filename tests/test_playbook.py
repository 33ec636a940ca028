"""ansible.playbook, check runs and the dry-run preview, through real masters on real sshd "hosts".

One master with `backend = "ansible"` (its playbook directory holds the shipped example ntp-check
and a test playbook, motd) and one with the local backend. The master's floor asks one approval
for file.push, so check runs are seen to pass it like real runs.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ombot.envelope import Refused
from tests import sshd
from tests.fakeslack import TEAM_ID, FakeSlack, post_to_bot, slash_command_body
from tests.rigs import CHANNEL, SECRET, approval, floor, policy, role, rule, slack_rig
from tests.support import REPO, Cluster, bot_table, free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sshd.available(), reason="needs openssh-server (sshd)")]

INJECTED = Path(f"/tmp/ombot-injected-{uuid.uuid4().hex}")
LOOKUP = "{{ lookup('pipe', 'touch %s') }}" % INJECTED
MOTD = """\
- name: motd
  hosts: all
  gather_facts: false
  tasks:
    - name: write the message
      ansible.builtin.copy:
        dest: "{{ dest }}"
        content: "{{ message }} x{{ count }}\\n"
"""
MOTD_VARS = """\
description = "write a message to a file"
[vars.message]
kind = "string"
max_len = 1024
[vars.count]
kind = "int"
min = 1
max = 9
required = false
default = 1
[vars.dest]
kind = "path"
roots = ["/tmp"]
"""
POLICY = policy(role("ops", "U0ALICE", "cli:test"), role("leads", "U0LEAD1"),
                rule("pushes need a lead", modules=["file.push"], request=["ops"],
                     approval=approval(expiry_seconds=600)),
                rule("the rest", modules=["*"], request=["ops"]))


@pytest.fixture(scope="module")
def books(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("playbooks")
    for example in (REPO / "examples" / "playbooks").iterdir():
        shutil.copy(example, directory / example.name)
    (directory / "motd.yml").write_text(MOTD)
    (directory / "motd.params.toml").write_text(MOTD_VARS)
    outside = tmp_path_factory.mktemp("elsewhere") / "evil.yml"
    outside.write_text(MOTD)
    (directory / "evil.yml").symlink_to(outside)  # a link out of the directory is not one of its playbooks
    return directory


@pytest.fixture(scope="module")
def cluster(hosts: sshd.SshHosts, books: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    port = free_port()
    made = Cluster(tmp_path_factory.mktemp("playbook") / "c", {"local": ["m1"], "here": ["m2"]},
                   inventory=hosts.inventory() + "[mine]\nlocalhost ansible_connection=local\n", policy=POLICY,
                   extra_toml=(f'[masters.m1.ansible]\nplaybooks = "{books}"\n' + floor("m1", module="file.push")
                               + bot_table(port, TEAM_ID)))
    text = made.config_path.read_text()
    made.config_path.write_text(text.replace('state_dir = "state-m1"', 'state_dir = "state-m1"\nbackend = "ansible"'))
    made.ports["bot"] = port
    made.start("m1")
    made.start("m2")
    yield made
    made.stop_all()


def run(cluster: Cluster, module: str, params: dict[str, Any], targets: list[str], check: bool = False,
        requester: str = "cli:test", approvers: tuple[str, ...] = (), idc: str = "local",
        ) -> tuple[str, dict[str, dict[str, Any]], list[dict[str, Any]]]:
    return cluster.run_job(module, params, targets, idc, requester, check=check, approvers=approvers)


@pytest.fixture
def scratch() -> Iterator[Path]:
    directory = Path(f"/tmp/ombot-playbook-{uuid.uuid4().hex}")
    directory.mkdir()
    yield directory
    shutil.rmtree(directory)


# -- playbooks -------------------------------------------------------------------------------


def test_a_check_run_of_a_playbook_shows_the_diff_and_changes_nothing(cluster: Cluster, scratch: Path) -> None:
    conf = scratch / "ntp.conf"
    conf.write_text("server old.example.org iburst\n")
    params = {"playbook": "ntp-check", "vars": f"ntp_server=ntp.example.org max_poll=8 conf_path={conf}"}
    state, results, events = run(cluster, "ansible.playbook", params, ["web01", "web02"], check=True)
    assert state == "ok", results
    assert events[0]["kind"] == "accepted" and events[0]["data"]["check"] is True
    for result in results.values():
        out = result["stdout"]
        assert "changed: the NTP server drop-in" in out
        assert "-server old.example.org iburst\n+server ntp.example.org iburst maxpoll 8\n" in out
        assert "uses ntp.example.org (maxpoll 8)" in out
    assert conf.read_text() == "server old.example.org iburst\n"  # nothing changed
    state, results, _ = run(cluster, "ansible.playbook", params, ["web01"])  # the real run does change it
    assert state == "ok", results
    assert conf.read_text() == "server ntp.example.org iburst maxpoll 8\n"


def test_extra_vars_are_typed_and_validated(cluster: Cluster, scratch: Path) -> None:
    router = cluster.router()
    try:
        for words, param in ((f"message=hi count=many dest={scratch}/m", "count"),
                             (f"message=hi count=12 dest={scratch}/m", "count"),
                             (f"message=hi dest={scratch}/m colour=red", "colour"), ("message=hi count=2", "dest"),
                             ("message=hi dest=/etc/motd", "dest"), ("dest", "vars"), (f"dest={scratch}/m", "message")):
            with pytest.raises(Refused) as refused:
                router.submit("local", "ansible.playbook", {"playbook": "motd", "vars": words}, ["web01"])
            assert refused.value.code == "invalid_params", words
            assert refused.value.details.get("param") == param, (words, refused.value.message)
    finally:
        router.close()
    assert not list(scratch.iterdir())


def test_extra_vars_are_data_never_templates(cluster: Cluster, scratch: Path) -> None:
    dest = scratch / "motd"
    state, results, _ = run(cluster, "ansible.playbook",
                            {"playbook": "motd", "vars": ["message=" + LOOKUP, "count=3", f"dest={dest}"]}, ["web01"])
    assert state == "ok", results
    assert dest.read_text() == LOOKUP + " x3\n"  # the int arrived as a number, the text as it was typed
    shell = f"; touch {INJECTED} $(touch {INJECTED}) `touch {INJECTED}` ' \" && touch {INJECTED} ${{IFS}}x --help"
    state, results, _ = run(cluster, "ansible.playbook", {"playbook": "motd", "vars": ["message=" + shell, f"dest={dest}"]},
                            ["web01"])
    assert state == "ok", results
    assert dest.read_text() == shell + " x1\n"
    assert not INJECTED.exists()


@pytest.mark.parametrize("name", ["evil", "nosuch", "../motd", "motd.params"])
def test_only_playbooks_of_the_allow_listed_directory_run(cluster: Cluster, name: str) -> None:
    router = cluster.router()
    try:
        with pytest.raises(Refused) as refused:
            router.submit("local", "ansible.playbook", {"playbook": name}, ["web01"])
    finally:
        router.close()
    assert refused.value.code == "invalid_params" and refused.value.details.get("param") == "playbook"
    if name == "nosuch":
        assert "motd, ntp-check" in refused.value.message  # it says what there is


def test_other_backends_refuse_playbooks_and_check_runs(cluster: Cluster) -> None:
    router = cluster.router()
    try:
        with pytest.raises(Refused) as refused:
            router.submit("here", "ansible.playbook", {"playbook": "motd"}, ["localhost"])
        assert refused.value.code == "unsupported" and "cannot run Ansible playbooks" in refused.value.message
        with pytest.raises(Refused) as refused:
            router.submit("here", "echo", {"message": "hi"}, ["localhost"], check=True)
        assert refused.value.code == "unsupported"
        assert "the local backend has no check mode" in refused.value.message
        with pytest.raises(Refused) as refused:  # and the Ansible master refuses another backend's step
            router.submit("local", "salt.state", {"state": "nginx"}, ["web01"])
        assert refused.value.code == "unsupported" and "salt" in refused.value.message.lower()
    finally:
        router.close()


# -- check runs of built-in modules ----------------------------------------------------------


def test_a_check_run_still_needs_the_masters_approvals(cluster: Cluster, scratch: Path) -> None:
    router = cluster.router()
    try:
        with pytest.raises(Refused) as refused:
            router.submit("local", "file.push", {"source": "a.conf", "dest": f"{scratch}/a.conf"}, ["web01"], check=True)
    finally:
        router.close()
    assert refused.value.code == "approval_required"


def test_a_check_run_of_file_push_shows_the_diff_and_changes_nothing(cluster: Cluster, scratch: Path) -> None:
    store = cluster.root / "state-m1" / "files"
    store.mkdir(parents=True, exist_ok=True)
    (store / "a.conf").write_text("key = new\n")
    dest = scratch / "a.conf"
    dest.write_text("key = old\n")
    state, results, _ = run(cluster, "file.push", {"source": "a.conf", "dest": str(dest)}, ["web01", "down01"],
                            check=True, requester="U0ALICE", approvers=("U0LEAD1",))
    assert {h: r["status"] for h, r in results.items()} == {"web01": "ok", "down01": "unreachable"}
    assert "-key = old\n+key = new\n" in results["web01"]["stdout"]
    assert results["web01"]["data"]["ansible"]["changed"] == 1  # the copy; the path check changes nothing
    assert dest.read_text() == "key = old\n"


def test_a_check_run_says_what_it_cannot_check(cluster: Cluster, scratch: Path) -> None:
    state, results, _ = run(cluster, "shell.exec", {"cmd": f"touch {scratch}/x"}, ["web01"], check=True)
    assert state == "ok", results
    assert "check: not run" in results["web01"]["stdout"] and "sh -c" in results["web01"]["stdout"]
    assert not (scratch / "x").exists()


def test_an_echo_reports_an_unreachable_host(cluster: Cluster) -> None:
    state, results, _ = run(cluster, "echo", {"message": "hi"}, ["web01", "down01"])
    assert {h: (r["status"], r["stdout"]) for h, r in results.items()} == {
        "web01": ("ok", "hi\n"), "down01": ("unreachable", "")}
    assert state != "ok"


# -- previews --------------------------------------------------------------------------------


def test_the_preview_operation_shows_the_hosts_and_the_playbook(cluster: Cluster, scratch: Path) -> None:
    before = _jobs(cluster)
    router = cluster.router()
    try:
        shown = router.preview("local", "ansible.playbook", {"playbook": "motd", "vars": f"message=hi dest={scratch}/m"},
                               "web[01-02]", check=True)
        local = router.preview("here", "echo", {"message": "hi"}, "localhost")
        with pytest.raises(Refused) as refused:
            router.preview("local", "ansible.playbook", {"playbook": "motd", "vars": "count=x"}, "web01")
    finally:
        router.close()
    assert shown["hosts"] == ["web01", "web02"] and shown["backend"] == "ansible" and shown["check"] is True
    assert "import_playbook:" in shown["playbook"] and "motd.yml" in shown["playbook"]
    assert "message: !unsafe 'hi'" in shown["playbook"] or 'message: !unsafe "hi"' in shown["playbook"]
    assert shown["options"][-2:] == ["--check", "--diff"]
    assert local == {"module": "echo", "hosts": ["localhost"], "backend": "local", "check": False,
                     "steps": ["emit 'hi'"]}
    assert refused.value.code == "invalid_params"
    assert _jobs(cluster) == before  # a preview records nothing


def _jobs(cluster: Cluster) -> int:
    import sqlite3

    with sqlite3.connect(cluster.root / "state-m1" / "m1.db") as db:
        return int(db.execute("SELECT COUNT(*) FROM job").fetchone()[0])


def test_the_cli_dry_run_prints_the_playbook_and_check_runs_say_so(cluster: Cluster, scratch: Path) -> None:
    result = cluster.ombot("run", "echo", "web01", "message=hi", "--dry-run", "--check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("echo (check run) on 1 host(s) in local: web01\n")
    assert "steps:\n  emit 'hi'\nplaybook (--limit web01, --check --diff):\n" in result.stdout
    assert "ombot:-1:reach" in result.stdout and "check_mode: false" in result.stdout
    result = cluster.ombot("run", "file.push", "web01", "source=a.conf", f"dest={scratch}/a.conf", "--check")
    assert result.returncode == 2 and "approval" in result.stderr  # a check run is gated like a real one
    result = cluster.ombot("run", "ping", "web01", "--check")
    assert result.returncode == 0, result.stderr
    assert "ping (check run) on 1 host(s)" in result.stdout and "state: ok (a check run" in result.stdout


# -- through Slack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slack(cluster: Cluster) -> Iterator[FakeSlack]:
    with slack_rig(cluster.root, cluster=cluster) as rig:
        yield rig.fake


def _command(cluster: Cluster, fake: FakeSlack, text: str, user: str = "U0ALICE") -> None:
    body = slash_command_body(text=text, user_id=user, channel_id=CHANNEL, response_url=fake.new_response_url())
    assert post_to_bot(cluster.ports["bot"], body, SECRET)[0] == 200


def _said(fake: FakeSlack, needle: str, timeout: float = 30) -> str:
    def find() -> str | None:
        texts = [str(c.body.get("text", "")) for c in fake.response_posts]
        texts += [str(m.get("text", "")) for m in fake.messages(CHANNEL, include_replies=True)]
        return next((t for t in texts if needle in t), None)
    return fake.wait_for(find, timeout, what=f"a message saying {needle!r}")


def test_the_bots_dry_run_shows_the_hosts_and_the_playbook(cluster: Cluster, slack: FakeSlack, scratch: Path) -> None:
    _command(cluster, slack, f'ansible.playbook web[01-02] playbook=motd vars="message=hi dest={scratch}/m" dry_run=yes')
    said = _said(slack, "Dry run")
    assert "`ansible.playbook` on 2 host(s) in local: web01, web02" in said
    assert "import_playbook:" in said and "motd.yml" in said
    assert not (scratch / "m").exists()


def test_a_check_run_through_slack_asks_approval_and_its_card_says_check(cluster: Cluster, slack: FakeSlack,
                                                                        scratch: Path) -> None:
    store = cluster.root / "state-m1" / "files"
    store.mkdir(parents=True, exist_ok=True)
    (store / "b.conf").write_text("b = new\n")
    dest = scratch / "b.conf"
    dest.write_text("b = old\n")
    _command(cluster, slack, f"file.push web01 source=b.conf dest={dest} check=yes")
    asked = _said(slack, "needs 1 approval(s)")
    number = asked.split("Waiting as request #", 1)[1].split(";", 1)[0]
    _command(cluster, slack, f"approve {number}", user="U0LEAD1")
    approval = slack.wait_for(lambda: next((m for m in slack.messages(CHANNEL) if "[approval #" in m["text"]), None))
    assert "check=yes" in json.dumps(approval["blocks"])  # the approvers see it is a check run
    _said(slack, "Starting job #")
    card = _said(slack, "file.push (check run) on 1 host(s) in local by U0ALICE: 1/1 hosts", timeout=60)
    assert "[#" in card and " ok]" in card
    card_ts = next(m["ts"] for m in slack.messages(CHANNEL) if m["text"] == card)
    results = slack.wait_for(lambda: next((m for m in slack.thread(CHANNEL, card_ts) if m["ts"] != card_ts), None))
    shown = json.dumps(results)
    assert "+b = new" in shown, shown  # the diff, in the thread
    assert dest.read_text() == "b = old\n"


def test_check_is_a_request_word_like_dry_run() -> None:
    from ombot.bot.commands import CommandError
    from ombot.bot.grammar import run_of

    assert run_of("file.push", ["web01", "source=a", "check=yes"]).check is True
    assert run_of("file.push", ["web01", "source=a", "check=yes"]).params == {"source": "a"}
    assert run_of("echo", ["web01", "check=no"]).check is False
    with pytest.raises(CommandError, match="check is yes or no"):
        run_of("echo", ["web01", "check=maybe"])


def test_a_schedule_refuses_check_rather_than_run_for_real(cluster: Cluster, slack: FakeSlack) -> None:
    _command(cluster, slack, "schedule every 15m run echo web01 message=x check=yes")
    _said(slack, "check=yes is for one look at what would change")


def test_a_check_run_names_only_the_command_it_would_have_chosen(cluster: Cluster) -> None:
    state, results, _ = run(cluster, "service", {"action": "restart", "name": "ombot-no-such"}, ["web01"], check=True)
    out = results["web01"]["stdout"]
    assert state == "ok", results
    assert out.count("check: not run") == 1 and "restart" in out, out  # the choice the host made, not both
