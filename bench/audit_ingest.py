"""Audit ingest with 1,000 rules loaded: events per second per core, stored and matched.

    .venv/bin/python bench/audit_ingest.py [--events 20000] [--batch 500] [--rounds 3]

Prints figures, asserts nothing. 1,000 generated rules (900 keyword rules of 1-3 keywords, 100 rules
of one regex and no keyword, so every regex runs on every command: the worst case) are written as a
rules file and loaded by the real parser (audit.rules.load_rules). The events are what agents
send: mostly everyday commands, about 3 % hitting a keyword rule and 1 % a regex rule, 200 hosts,
40 users. Series, each single-threaded on its own fresh SQLite file (the default database, with
OMBot's own settings), run in turn for `--rounds` rounds:

  bot path      AuditFeed._store, what the bot's feed does with each page a master returns: the
                central store's insert_new (skip ids already there, insert the rest) and, on the rows
                inserted now, RuleSet.match and Thresholds.fire. Alerts are not posted (no Slack).
  bot insert    audit.store.insert_new alone.
  match only    RuleSet.match + Thresholds.fire on the same events as dicts: no database.
  master store  masters/audit.py AuditIngest._store: the master's insert-ignore of a checked batch.
  master ingest AuditIngest.ingest: each event checked (event_problem), then _store.

Per core = events / CPU seconds of the process (time.process_time), next to the wall-clock rate.
A second pass of the bot path over already-stored events (a lost ack: every event again) shows the
cost of a duplicate delivery. The issue's goal: >= 20,000 events/s per core, stored and matched.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

T0 = 1_800_000_000_000
EVERYDAY = ["ls -la", "cd /srv/app", "git status", "git pull --rebase", "vim config.yml", "tail -f /var/log/syslog",
            "systemctl status nginx", "docker ps", "kubectl get pods -n prod", "grep -r TODO src/", "make test",
            "python3 manage.py migrate", "df -h", "free -m", "top", "ps aux | grep java", "cat /etc/hosts",
            "journalctl -u app --since today", "sudo -i", "ssh db01", "scp build.tar.gz web02:/tmp/",
            "tar xzf release-2.4.1.tar.gz", "export PATH=$PATH:/opt/bin", "echo $HOME", "history | tail"]


def word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def rules_toml(rng: random.Random, keyword_rules: int, regex_rules: int) -> tuple[str, list[str], list[str]]:
    """The rules file, and commands that hit a keyword rule / a regex rule."""
    lines = ['channel = "C0BENCHAUDIT"', ""]
    keyword_hits, regex_hits = [], []
    for i in range(keyword_rules):
        keywords = [f"{word(rng, 5)}-{i}" for _ in range(rng.randint(1, 3))]
        keyword_hits.append(f"sudo {rng.choice(keywords)} --now /srv")
        threshold = "\nthreshold = { count = 3, window_seconds = 60 }" if i % 10 == 0 else ""
        lines += ["[[rules]]", f'name = "keyword rule {i}"', f"keywords = {keywords!r}".replace("'", '"'),
                  f'dedupe = "{{rule}}:{{host}}:{{user}}"{threshold}', ""]
    for i in range(regex_rules):
        tool = f"{word(rng, 4)}{i}"
        lines += ["[[rules]]", f'name = "regex rule {i}"', 'severity = "critical"',
                  f"regexes = ['\\b{tool}\\s+(?:-\\w+\\s+)*--(?:purge|wipe)\\b']", ""]
        regex_hits.append(f"{tool} -q --purge /var/lib/data")
    return "\n".join(lines) + "\n", keyword_hits, regex_hits


def make_events(rng: random.Random, count: int, keyword_hits: list[str], regex_hits: list[str],
                first_seq: int = 0) -> list[dict[str, Any]]:
    events = []
    for seq in range(first_seq, first_seq + count):
        roll = rng.random()
        if roll < 0.03:
            command = rng.choice(keyword_hits)
        elif roll < 0.04:
            command = rng.choice(regex_hits)
        else:
            command = f"{rng.choice(EVERYDAY)} {word(rng, rng.randint(0, 12))}".rstrip()
        host = f"web{seq % 200:03d}"
        events.append({"id": f"{host}:0f3e-11aa:q9c1d:{seq}", "kind": "command", "at": T0 + seq, "host": host,
                       "data": {"uid": 1000 + seq % 40, "user": f"user{seq % 40}", "login_user": "ops",
                                "tty": "/dev/pts/3", "cwd": "/srv/app", "ssh_client": "10.1.2.3 51000 22",
                                "command": command, "exit": 0 if rng.random() < 0.9 else 1}})
    return events


def batches(events: list[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    for start in range(0, len(events), size):
        yield events[start:start + size]


def measured(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


# -- the bot side ------------------------------------------------------------------------------


class BotSide:
    def __init__(self, db_path: Path, rules_path: Path) -> None:
        from ombot.audit import store as audit_store
        from ombot.audit.feed import AuditFeed
        from ombot.audit.rules import load_rules
        from ombot.bot import store

        self.db = store.open_store(f"sqlite:///{db_path}")
        audit_store.prepare()
        self.rules = load_rules(rules_path)
        self.feed = AuditFeed(None, [], self.rules, None, poll_seconds=1.0,  # type: ignore[arg-type]
                              silent_after_seconds=600, silent_channel=None)
        self.matches = 0
        self.fired = 0

    def store_and_match(self, events: list[dict[str, Any]], batch: int) -> int:
        return sum(self.feed._store("bj", chunk) for chunk in batches(events, batch))

    def insert_only(self, events: list[dict[str, Any]], batch: int) -> int:
        from ombot.audit import store as audit_store

        return sum(len(audit_store.insert_new("bj", chunk)) for chunk in batches(events, batch))

    def close(self) -> None:
        self.db.close()


def match_only(rules: Any, events: list[dict[str, Any]]) -> tuple[int, int]:
    """RuleSet.match + Thresholds.fire on event dicts shaped as the feed builds them from its rows."""
    from ombot.audit.alerts import Thresholds

    thresholds = Thresholds()
    matched = fired = 0
    for e in events:
        d = e["data"]
        event = {"id": e["id"], "idc": "bj", "host": e["host"], "kind": e["kind"], "at": e["at"], "user": d["user"],
                 "login_user": d["login_user"], "uid": d["uid"], "tty": d["tty"], "cwd": d["cwd"],
                 "command": d["command"], "exit_status": d["exit"], "ssh_client": d["ssh_client"]}
        for match in rules.match(event):
            matched += 1
            fired += thresholds.fire(match, e["at"])
    return matched, fired


# -- the master side ----------------------------------------------------------------------------


class MasterSide:
    def __init__(self, db_path: Path) -> None:
        from ombot.masters import store
        from ombot.masters.audit import AuditIngest
        from ombot.config import ClientRegistration, Limits, MasterSettings

        self.db = store.open_store(f"sqlite:///{db_path}")
        self.clients = {f"agent-web{h:03d}": ClientRegistration(f"agent-web{h:03d}", "", "agent", f"agent:web{h:03d}",
                                                                host=f"web{h:03d}") for h in range(200)}
        unlimited = Limits(ingest_events_per_second=10**9, ingest_burst_events=10**9,  # the code, not the limit
                           ingest_bytes_per_second=10**12, ingest_burst_bytes=10**12)
        settings = MasterSettings("bench", "local", "127.0.0.1", 1, "", None, None, "local", (), db_path.parent,
                                  f"sqlite:///{db_path}", unlimited)
        self.ingest = AuditIngest(self.clients, settings)

    def by_host(self, events: list[dict[str, Any]], batch: int) -> list[tuple[Any, list[dict[str, Any]]]]:
        """Agent batches: one host's events each, as agents send them (without the bot's `host` key)."""
        per_host: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            per_host.setdefault(e["host"], []).append({k: v for k, v in e.items() if k != "host"})
        return [(self.clients[f"agent-{host}"], chunk) for host, evs in per_host.items() for chunk in batches(evs, batch)]

    def store_only(self, work: list[tuple[Any, list[dict[str, Any]]]]) -> int:
        return sum(self.ingest._store(client, client.host, chunk) for client, chunk in work)

    def checked(self, work: list[tuple[Any, list[dict[str, Any]]]]) -> int:
        from ombot.envelope import new_request

        stored = 0
        for client, chunk in work:
            request = new_request("ingest", "m1", client.user, "agent", {"host": client.host, "events": chunk})
            reply = self.ingest.ingest(client, request)
            if reply["rejected"]:
                raise RuntimeError(f"events rejected: {reply['rejected'][:3]}")
            stored += reply["stored"]
        return stored

    def close(self) -> None:
        self.db.close()


# -- running -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events per series and round (default 20000)")
    parser.add_argument("--batch", type=int, default=500, help="events per insert (the feed's page; default 500)")
    parser.add_argument("--agent-batch", type=int, default=200, help="events per agent batch (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every series (default 3)")
    parser.add_argument("--seed", type=int, default=11)
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    with tempfile.TemporaryDirectory(prefix="ombot-bench-audit-") as tmp:
        root = Path(tmp)
        text, keyword_hits, regex_hits = rules_toml(rng, 900, 100)
        rules_path = root / "rules.toml"
        rules_path.write_text(text)
        started = time.perf_counter()
        from ombot.audit.rules import load_rules

        ruleset = load_rules(rules_path)
        load_s = time.perf_counter() - started
        rates: dict[str, list[tuple[float, float]]] = {}
        counts: dict[str, Any] = {}
        for rnd in range(opts.rounds):
            events = make_events(rng, opts.events, keyword_hits, regex_hits, first_seq=rnd * opts.events)
            results = run_round(root / f"r{rnd}", rules_path, ruleset, events, opts)
            for name, (wall, cpu, count) in results.items():
                rates.setdefault(name, []).append((opts.events / wall, opts.events / cpu if cpu else float("inf")))
                counts[name] = count
        report(opts, len(ruleset.rules), load_s, rates, counts)


def run_round(root: Path, rules_path: Path, ruleset: Any, events: list[dict[str, Any]],
              opts: argparse.Namespace) -> dict[str, tuple[float, float, Any]]:
    root.mkdir()
    out: dict[str, tuple[float, float, Any]] = {}

    def series(name: str, fn: Callable[[], Any]) -> None:
        result: list[Any] = []
        wall, cpu = measured(lambda: result.append(fn()))
        out[name] = (wall, cpu, result[0])

    bot = BotSide(root / "bot.db", rules_path)
    try:
        series("bot path", lambda: bot.store_and_match(events, opts.batch))
        series("bot path, all dup", lambda: bot.store_and_match(events, opts.batch))  # a lost ack: nothing new
    finally:
        bot.close()
    bot = BotSide(root / "bot-insert.db", rules_path)
    try:
        series("bot insert", lambda: bot.insert_only(events, opts.batch))
    finally:
        bot.close()
    series("match only", lambda: match_only(ruleset, events))
    master = MasterSide(root / "master.db")
    try:
        work = master.by_host(events, opts.agent_batch)
        series("master store", lambda: master.store_only(work))
    finally:
        master.close()
    master = MasterSide(root / "master-checked.db")
    try:
        work = master.by_host(events, opts.agent_batch)
        series("master ingest", lambda: master.checked(work))
    finally:
        master.close()
    return out


def report(opts: argparse.Namespace, rules: int, load_s: float, rates: dict[str, list[tuple[float, float]]],
           counts: dict[str, Any]) -> None:
    print(f"audit ingest: {rules} rules (900 keyword, 100 regex) loaded in {load_s * 1000:.0f} ms; "
          f"{opts.events} events per series, {opts.rounds} rounds, page {opts.batch}, agent batch {opts.agent_batch}; "
          f"SQLite, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"  {'series':<18} {'per core (cpu)':>15} {'wall':>10}   events/s, median of rounds (min-max per core)   result")
    for name, values in rates.items():
        per_core = [c for _, c in values]
        wall = statistics.median(w for w, _ in values)
        print(f"  {name:<18} {statistics.median(per_core):>15,.0f} {wall:>10,.0f}   "
              f"({min(per_core):,.0f}-{max(per_core):,.0f})   {describe(name, counts[name])}")
    best = statistics.median(c for _, c in rates["bot path"])
    print(f"  stored and matched (bot path) per core: {best:,.0f}/s   (goal: >= 20,000/s)")


def describe(name: str, count: Any) -> str:
    if name.startswith("match"):
        return f"{count[0]} matches, {count[1]} alerts fired"
    return f"{count} stored" if "dup" not in name else f"{count} stored (all were there)"


if __name__ == "__main__":
    main()
