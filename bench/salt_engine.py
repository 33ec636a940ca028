"""OMBot's Salt backend against raw LocalClient.cmd: the same command on the same minions, at several sizes.

    .venv/bin/python bench/salt_engine.py [--sizes 1,10] [--repeats 20] [--warmup 3] [--no-process]
    .venv/bin/python bench/salt_engine.py --sizes 50 --repeats 5 --warmup 1 --answer-seconds 30

Prints figures, asserts nothing. A real salt-master and max(sizes) minions (minion01..minionNN) on
loopback (tests/saltrig.py, as the tests use them; started once, 10 at a time: ~10-30 s for 10, each
~75 MiB and 1-2 CPU s, ~2 min for 50) and a real OMBot master with backend = "salt" on
that salt-master (limits.max_parallel_hosts raised to the largest size). Each size N runs on the
first N minions. 50 minions on 2 CPUs take longer to answer than the backend's default
answer_seconds (5 s): --answer-seconds gives it the raw calls' 30 s. In-process series, run in
turn (the order rotates every repeat):

  ombot          Router.submit("shell.exec", cmd=uptime) + Router.follow until the job ends: the
                 backend's cmd.run_all with python_shell through LocalClient.cmd_iter, answers
                 streamed per minion, the job records in SQLite.
  raw run_all    LocalClient.cmd(minions, "cmd.run_all", ["uptime"], tgt_type="list",
                 kwarg={"python_shell": True}) on one LocalClient kept between runs (the backend
                 keeps its clients too).
  raw cmd.run    LocalClient.cmd(minions, "cmd.run", ["uptime"], tgt_type="list"): the shortest call.

Then fresh processes (--no-process skips them): `ombot run shell.exec minion01,... cmd=uptime`
against the same master, and a fresh Python making a LocalClient and calling cmd.run_all once.
Every run is checked: each of the N minions answered with exit 0. One table per size, then a
summary of the medians and the ratio ombot / raw run_all per size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.runs import measure, sizes as read_sizes  # noqa: E402  (after the path it is found on)

MS = 1000  # every figure here is in milliseconds


def raw_call(client: Any, minions: list[str], fun: str, kwarg: dict[str, Any] | None = None) -> None:
    reply = client.cmd(minions, fun, ["uptime"], tgt_type="list", timeout=30, kwarg=kwarg or {})
    if sorted(reply) != minions:
        raise RuntimeError(f"raw {fun}: answers from {sorted(reply)}, not {minions}")
    for minion, value in reply.items():
        if fun == "cmd.run_all" and (not isinstance(value, dict) or value.get("retcode") != 0):
            raise RuntimeError(f"raw {fun} on {minion}: {value!r}")
        if fun == "cmd.run" and "load average" not in str(value):
            raise RuntimeError(f"raw {fun} on {minion}: {value!r}")


def raw_child(spec: str) -> None:
    """--raw-child CONFIG,MINION,...: a fresh process making a LocalClient and running cmd.run_all once."""
    import salt.client

    config, *minions = spec.split(",")
    raw_call(salt.client.LocalClient(c_path=config), minions, "cmd.run_all", {"python_shell": True})


class Ombot:
    def __init__(self, root: Path, salt_config: Path, max_size: int, answer_seconds: float | None) -> None:
        from tests.support import Cluster

        answer = f"answer_seconds = {answer_seconds}\n" if answer_seconds else ""
        self.cluster = Cluster(root, {"local": ["m1"]}, limits={"max_parallel_hosts": max(max_size, 16)},
                               extra_toml=f'[masters.m1.salt]\nconfig = "{salt_config}"\ninventory = "minions"\n{answer}')
        # the salt-master's accepted keys are the inventory: no inventory file beside them
        text = self.cluster.config_path.read_text().replace('inventory = "inventory.ini"\n', '', 1)
        self.cluster.config_path.write_text(
            text.replace('state_dir = "state-m1"', 'state_dir = "state-m1"\nbackend = "salt"'))
        self.cluster.start("m1")
        self.router = self.cluster.router()

    def run(self, minions: list[str]) -> None:
        ok: list[str] = []
        bad: dict[str, str] = {}

        def on_event(event: dict[str, Any]) -> None:
            if event["kind"] != "host":
                return
            data = event["data"]
            if data["status"] == "ok" and "load average" in data["stdout"]:
                ok.append(data["host"])
            else:
                bad[data["host"]] = f"{data['status']} rc={data['rc']}: {data['error'] or data['stderr'][-200:]}"

        ref, reply = self.router.submit("local", "shell.exec", {"cmd": "uptime"}, minions)
        state = self.router.follow(ref, on_event, first=reply.get("events", []))
        if state != "ok" or sorted(ok) != minions:
            raise RuntimeError(f"ombot job: {state}, {len(ok)} of {len(minions)} ok; the others: "
                               + "; ".join(f"{h} {why}" for h, why in sorted(bad.items()))
                               + "\n" + self.cluster.processes["m1"].log()[-2000:])

    def cli(self, minions: list[str]) -> None:
        done = self.cluster.ombot("run", "shell.exec", ",".join(minions), "cmd=uptime", timeout=120)
        if done.returncode != 0 or "state: ok" not in done.stdout:
            raise RuntimeError(f"ombot run exited {done.returncode}:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")

    def close(self) -> None:
        self.router.close()
        self.cluster.stop_all()


def show(title: str, samples: dict[str, list[float]], base: str) -> dict[str, float]:
    print(f"\n  {title}, ms")
    print(f"  {'series':<14} {'p50':>9} {'min':>9} {'max':>9}   ratio to {base} (p50)")
    med = {n: statistics.median(v) for n, v in samples.items()}
    for name, values in samples.items():
        print(f"  {name:<14} {med[name]:9.1f} {min(values):9.1f} {max(values):9.1f}   {med[name] / med[base]:.2f}x")
    return med


def summary(medians: dict[int, dict[str, float]]) -> None:
    names = list(next(iter(medians.values())))
    print("\n  summary, p50 ms")
    print(f"  {'minions':<8}" + "".join(f"{n:>14}" for n in names) + f"{'ombot/run_all':>15}"
          + (f"{'run/process':>13}" if "raw process" in names else ""))
    for size, med in medians.items():
        line = f"  {size:<8}" + "".join(f"{med[n]:14.1f}" for n in names)
        line += f"{med['ombot'] / med['raw run_all']:14.2f}x"
        if "raw process" in med:
            line += f"{med['ombot run'] / med['raw process']:12.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10", help="minion counts, comma-separated (default 1,10; up to 99)")
    parser.add_argument("--repeats", type=int, default=20, help="measured runs per series and size (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured runs per series and size first (default 3)")
    parser.add_argument("--answer-seconds", type=float, metavar="S",
                        help="the backend's answer_seconds (default: its default, 5); the raw calls wait up to 30 s")
    parser.add_argument("--no-process", action="store_true", help="skip the fresh-process series")
    parser.add_argument("--raw-child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.raw_child:
        return raw_child(opts.raw_child)
    sizes = read_sizes(parser, opts.sizes, 99, "minion")
    from tests import saltrig

    if not saltrig.available():
        sys.exit("needs the salt extra and root (salt-master and salt-minion run as root here)")
    with tempfile.TemporaryDirectory(prefix="ombot-bench-salt-") as tmp:
        bench(Path(tmp), sizes, opts)


def bench(root: Path, sizes: list[int], opts: argparse.Namespace) -> None:
    import salt.client

    from tests import saltrig

    top = max(sizes)
    names = [f"minion{i:02d}" for i in range(1, top + 1)]
    started = time.monotonic()
    # ~1-2 CPU s each to start and authenticate: 10 at once (50 at once overload the master's 2 workers:
    # returns time out and test.ping job processes pile up on the minions)
    rig = saltrig.SaltRig(root / "salt", minions=names).start(timeout=120, jobs=os.cpu_count() or 2, batch=10)
    ombot, client = None, None
    try:
        print(f"salt engines: `uptime` on {', '.join(map(str, sizes))} minions ({top} started in "
              f"{time.monotonic() - started:.0f} s), repeats={opts.repeats} (after {opts.warmup} warm-up), "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
        ombot = Ombot(root / "cluster", rig.master_config, top, opts.answer_seconds)
        client = salt.client.LocalClient(c_path=str(rig.master_config))
        medians: dict[int, dict[str, float]] = {}
        for size in sizes:
            minions = names[:size]
            medians[size] = show(f"{size} minion{'s' * (size > 1)}, in-process", measure({
                "ombot": partial(ombot.run, minions),
                "raw run_all": partial(raw_call, client, minions, "cmd.run_all", {"python_shell": True}),
                "raw cmd.run": partial(raw_call, client, minions, "cmd.run"),
            }, opts.repeats, opts.warmup, MS), "raw run_all")
            if not opts.no_process:
                child = [sys.executable, __file__, "--raw-child", ",".join([str(rig.master_config), *minions])]

                def fresh_raw() -> None:
                    done = subprocess.run(child, capture_output=True, text=True, timeout=120)
                    if done.returncode != 0:
                        raise RuntimeError(f"raw child exited {done.returncode}:\n{done.stderr[-2000:]}")

                medians[size] |= show(f"{size} minion{'s' * (size > 1)}, fresh processes", measure(
                    {"ombot run": partial(ombot.cli, minions), "raw process": fresh_raw},
                    max(3, opts.repeats // 4), 1, MS), "raw process")
            sys.stdout.flush()
        summary(medians)
        print(f"\n  load average after: {os.getloadavg()[0]:.1f}")
    finally:
        if client is not None:
            client.destroy()  # before the salt-master goes, or its reconnect logs an error at exit
        if ombot is not None:
            ombot.close()
        rig.stop()


if __name__ == "__main__":
    main()
