"""`ombot backup` and `ombot restore` (docs/backup.md) through real processes: a master and an `ombot bot`
behind the fake Slack with jobs run, an approval waiting, a schedule and shell-audit events stored; a
backup taken while a thread keeps sending jobs and audit events; the site wiped, restored exactly as
the doc says, started again, and asked in chat for what it held at backup time."""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ombot.app.sitefiles import dump_command
from tests.rigs import (ALICE, ALERT_RULES, ApprovalRig, AuditRig, approval, audit_site, event, floor, policy, role,
                        rule, table)
from tests.support import Cluster, bot_table, child_env

LEAD = "U0LEAD"
POLICY = policy(role("ops", ALICE), role("leads", LEAD), table("jobs", viewers=["ops"]), table("audit", viewers=["ops"]),
                rule("shell needs a lead", modules=["shell.exec"], request=["ops"], approval=approval()),
                rule("everyday", modules=["echo"], request=["ops"]))


class Rig(AuditRig, ApprovalRig):
    """A rig whose bot pulls the audit and asks for approvals."""

    def job(self, text: str) -> int:
        """`/om run TEXT`, once its job ended ok: its number."""
        number = self.command(f"run {text}").number("Starting job #")
        assert " ok]" in self.final_card(number)["text"]
        return number


class Load(threading.Thread):
    """Jobs (by chat and by the client library) and audit events, one after another, until stopped."""

    def __init__(self, rig: Rig) -> None:
        super().__init__(daemon=True)
        self.rig, self.rounds, self.steps, self.error = rig, 0, 0, None  # steps: writes acknowledged, 3 a round
        self.ingested: list[str] = []  # audit event ids the master acknowledged: committed there
        self.stop = threading.Event()

    def run(self) -> None:
        router = self.rig.cluster.router(ALICE)
        try:
            while not self.stop.is_set():
                n = self.rounds
                self.rig.command(f"run echo localhost message=load-{n}")
                self.steps += 1
                batch = [event(10_000 + n * 10 + i, data={"command": f"load {n} {i}"}) for i in range(10)]
                self.rig.ingest("m1", batch)
                self.ingested += [e["id"] for e in batch]
                self.steps += 1
                router.submit("local", "echo", {"message": f"load-{n}"}, ["localhost"])
                self.steps += 1
                self.rounds += 1
        except Exception as exc:  # the test fails on it after the backup
            self.error = exc
        finally:
            router.close()


def ombot(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The `ombot` command as an operator types it."""
    head = ["--config", str(config)] if config else []
    return subprocess.run([sys.executable, "-m", "ombot", *head, *args], capture_output=True, text=True, timeout=120,
                          env=child_env())


def ids(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as db:
        return {i for (i,) in db.execute(f"SELECT id FROM {table}")}


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


@pytest.mark.slow
def test_a_backup_under_load_restores_into_a_working_site(make_slack_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_slack_rig(kind=Rig, policy=POLICY, extra_toml=floor("m1"), **audit_site(ALERT_RULES))
    site, conf = rig.cluster.root, rig.cluster.config_path
    store = rig.cluster.config().masters["m1"].state_dir / "files"
    store.mkdir(parents=True, exist_ok=True)
    (store / "motd.txt").write_text("pushed by file.push\n")

    jobs = [rig.job(f"echo localhost message=before-{n}") for n in range(2)]
    pending = rig.ask('shell.exec localhost cmd="echo approved-after-restore"')
    schedule = rig.command("schedule every 1h run echo localhost message=hourly").number("Schedule #")
    rig.ingest("m1", [event(n, data={"command": f"echo BEFOREBACKUP {n}", "user": "alice", "uid": 1000})
                      for n in range(5)])
    rig.fake.wait_for(lambda: sum("BEFOREBACKUP" in c for _, c in rig.stored()) == 5, 30, what="the events in the bot")

    load = Load(rig)
    load.start()
    rig.fake.wait_for(lambda: load.rounds >= 2, 60, what="the load to run")
    backup = tmp_path / "backup"
    # What each database had committed before the backup began is in it, whatever came since
    master_had, bot_had = set(load.ingested), {i for i, _ in rig.stored()}
    started_at = load.steps
    taken = ombot("backup", str(backup), "--keys", config=conf)
    during = load.steps - started_at  # writes acknowledged while the backup ran
    load.stop.set()
    load.join(60)
    assert load.error is None, load.error
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert during >= 1  # jobs and events kept coming while it ran
    assert "bot.db" in taken.stdout and "master-m1.db" in taken.stdout and taken.stdout.count("integrity ok") == 2
    assert "holds private keys" in taken.stderr

    after = rig.job("echo localhost message=after-backup")  # what the restore must not bring back
    rig.ingest("m1", [event(99_999, data={"command": "echo AFTERBACKUP"})])
    rig.fake.wait_for(lambda: any("AFTERBACKUP" in c for _, c in rig.stored()), 30, what="the late event in the bot")

    # A restore refuses while the site runs, and leaves it as it was.
    before = conf.read_bytes()
    refused = ombot("restore", str(backup), "--to", str(site), "--replace")
    assert refused.returncode == 2 and "master m1 is running" in refused.stderr, refused.stderr
    rig.cluster.stop_all()
    refused = ombot("restore", str(backup), "--to", str(site), "--replace")
    assert refused.returncode == 2 and "is open in a running process" in refused.stderr, refused.stderr
    assert conf.read_bytes() == before and not list(site.glob(".ombot.toml.*"))
    rig.stop_bots()

    # docs/backup.md, "Restoring": the processes stopped, the site gone, the backup brought back.
    shutil.rmtree(site)
    restored = ombot("restore", str(backup), "--to", str(site))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    databases = [site / "state" / "bot.db", rig.cluster.master_db("m1")]
    assert [integrity(db) for db in databases] == ["ok", "ok"]
    assert ids(databases[0], "bot_audit_event") >= bot_had and ids(databases[1], "auditevent") >= master_had
    assert (store / "motd.txt").read_text() == "pushed by file.push\n"
    rig.cluster.start("m1")
    rig.start_bot()

    for number in jobs:
        assert "*ok*" in rig.command(f"status {number}").wait_body("*ok*")
    assert rig.rows("SELECT count(*) FROM bot_job WHERE params LIKE ?", "%after-backup%") == [(0,)]
    assert f"#{after} " not in rig.command("jobs").wait(" ok")  # newest first: the job run after the backup is not there
    assert f"#{pending.number} `shell.exec`" in rig.command("approvals").wait(f"#{pending.number}")
    assert f"#{schedule} active" in rig.command("schedules").wait(f"#{schedule}")
    found = rig.command("audit grep=BEFOREBACKUP").wait_body("BEFOREBACKUP 4")
    assert all(f"BEFOREBACKUP {n}" in found for n in range(5))
    assert "No audit events match" in rig.command("audit grep=AFTERBACKUP").wait("No audit events")

    # the restored approval still works: approved now, its job runs
    rig.approve(pending, LEAD).wait(f"Approved request #{pending.number}; its job starts now")
    assert " ok]" in rig.final_card(pending.asked.number("Starting job #"))["text"]


WRITER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=wal")
db.execute("PRAGMA wal_autocheckpoint=0")  # nothing reaches the database file itself: all of it is in the -wal
db.execute("PRAGMA synchronous=normal")  # as the bot's: no sync at each commit
db.execute("CREATE TABLE rows (n INTEGER PRIMARY KEY, pad TEXT)")
n = 0
while True:
    n += 1
    db.execute("INSERT INTO rows VALUES (?, ?)", (n, "x" * 500))
    print(n, flush=True)
"""


class Writer(threading.Thread):
    """A process committing one row at a time to a SQLite database in WAL mode, as a busy bot does; `last`
    is the newest row it has said is committed."""

    def __init__(self, database: Path) -> None:
        super().__init__(daemon=True)
        database.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(database)], stdout=subprocess.PIPE, text=True)
        self.last = 0

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.last = int(line)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_the_online_backup_holds_what_was_committed_while_writes_go_on(make_cluster: Callable[..., Cluster],
                                                                       tmp_path: Path) -> None:
    """SQLite's online backup copies what the -wal holds too, consistently, while a writer goes on; a
    copy of the database file would hold none of it."""
    cluster = make_cluster(extra_toml=bot_table(policy=None))
    writer = Writer(cluster.root / "state" / "bot.db")
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while writer.last < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        committed = writer.last
        taken = ombot("backup", str(tmp_path / "b"), config=cluster.config_path)
        assert writer.proc.poll() is None and writer.last > committed  # it wrote on meanwhile
    finally:
        writer.stop()
    assert taken.returncode == 0 and "integrity ok" in taken.stdout, taken.stdout + taken.stderr
    with sqlite3.connect(tmp_path / "b" / "bot.db") as db:
        count, newest = db.execute("SELECT count(*), max(n) FROM rows").fetchone()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file, no -wal beside it
    assert newest >= committed and count == newest  # every row up to a point in time, none missing


def test_a_backup_refuses_a_used_directory_and_leaves_the_keys_out_unless_asked(
        make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = make_cluster(extra_toml=bot_table(policy=None))
    conf = cluster.config_path
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    refused = ombot("backup", str(tmp_path / "used"), config=conf)
    assert refused.returncode == 2 and "is not empty" in refused.stderr

    plain = ombot("backup", str(tmp_path / "plain"), config=conf)
    assert plain.returncode == 0, plain.stderr
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    keys = sorted((cluster.root / "keys").glob("*.key"))
    assert manifest["keys"] is False and sorted(manifest["secrets_not_included"]) == sorted(map(str, keys))
    secrets = [key.read_bytes() for key in keys]
    copied = [p.read_bytes() for p in (tmp_path / "plain").rglob("*") if p.is_file()]
    assert not any(secret in data for secret in secrets for data in copied)
    assert "warning" not in plain.stderr and f"keys not included ({len(keys)})" in plain.stdout

    with_keys = ombot("backup", str(tmp_path / "keys"), "--keys", config=conf)
    assert with_keys.returncode == 0 and "warning:" in with_keys.stderr and "holds private keys" in with_keys.stderr
    kept = [p for p in (tmp_path / "keys" / "key").rglob("*.key")]
    assert sorted(p.read_bytes() for p in kept) == sorted(secrets)
    assert {stat.S_IMODE(p.stat().st_mode) for p in kept} == {0o600}
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_a_damaged_backup_restores_nothing(make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = make_cluster(extra_toml=bot_table(policy=None))
    assert ombot("backup", str(tmp_path / "b"), config=cluster.config_path).returncode == 0
    with open(tmp_path / "b" / "ombot.toml", "a") as f:
        f.write("# changed\n")
    refused = ombot("restore", str(tmp_path / "b"), "--to", str(tmp_path / "site"))
    assert refused.returncode == 2 and "differs from the manifest" in refused.stderr
    assert not (tmp_path / "site").exists() or not any((tmp_path / "site").iterdir())


@pytest.mark.parametrize(("url", "command"), [
    ("postgresql://ombot@db.example.internal:5433/ombot_bot",
     "pg_dump --format=custom --host db.example.internal --port 5433 --username ombot --file bot.dump ombot_bot"),
    ("mysql://ombot@db.example.internal/ombot_bot",
     "mariadb-dump --single-transaction --quick --routines --host db.example.internal --port 3306 --user ombot "
     "--databases ombot_bot > bot.sql"),
])
def test_a_database_server_is_listed_with_the_tool_that_dumps_it(make_cluster: Callable[..., Cluster], tmp_path: Path,
                                                                 url: str, command: str) -> None:
    assert dump_command("bot", url) == command
    cluster = make_cluster(extra_toml=bot_table(policy=None, database=url))
    taken = ombot("backup", str(tmp_path / "b"), config=cluster.config_path)
    assert taken.returncode == 0, taken.stderr
    assert f"skipped the database of bot ({url}): not SQLite; take it with\n    {command}" in taken.stdout
    manifest: dict[str, Any] = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["skipped"] == [{"of": "bot", "url": url, "command": command}]
    assert not any(entry["kind"] == "database" for entry in manifest["files"])
