"""OMBot's Ansible backend against raw ansible-runner: the same command on the same real sshd hosts.

    .venv/bin/python bench/ansible_engine.py [--sizes 1,10,50] [--repeats 3] [--no-process]
    .venv/bin/python bench/ansible_engine.py --mitogen /tmp/ombot-mitogen   # also the mitogen strategy

Prints figures, asserts nothing. One sshd per loopback address (tests/sshd.py) is one host; each
size N runs `uptime` through the `shell` module on the first N of them. In-process series, run
in turn (the order rotates every repeat, so machine noise hits each alike):

  ombot         Router.submit("shell.exec", cmd=uptime) + Router.follow until the job ends, against
                a real master with backend = "ansible" and its shipped defaults (warm start included:
                ansible-playbook forked from a server that imported Ansible; forks = the smallest of
                N, ansible.forks and limits.max_parallel_hosts, which --max-parallel-hosts raises).
  raw tuned     ansible_runner.run of a one-task playbook (`shell: uptime`, no facts) with the same
                tuning: pipelining, ControlMaster/ControlPersist, the same forks, explicit interpreter.
  raw defaults  the same playbook through ansible_runner.run at its defaults (forks 5, no
                pipelining; the interpreter named, as discovery picks a broken pyenv shim here):
                what a user who scripts ansible-runner gets.
  raw ombook    ansible_runner.run of the very playbook the master generates, with the master's
                environment: OMBot minus the master, to split its overhead (master vs playbook shape).
  raw mitogen   (--mitogen) raw tuned with the mitogen_linear strategy from a scratch venv.

Then fresh processes (--no-process skips them): `ombot run shell.exec GROUP cmd=uptime` against the
same master, and a fresh Python running raw tuned ansible-runner. Every run is checked: N hosts ok.
ssh control sockets are warm in every series (each keeps its own, reused within ControlPersist), as
they are on a busy master. Beside each median of seconds it prints the machine's busy CPU seconds per
run (/proc/stat), which every process of a run adds to and which waiting does not inflate: on a
saturated machine it is the steadier figure. The issue's goals, in-process: ombot <= 1.10x raw tuned,
<= 0.6x raw defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.runs import measure, sizes as read_sizes  # noqa: E402  (after the path it is found on)

BINDIR = os.path.dirname(sys.executable)  # ansible-playbook sits beside this Python
PLAYBOOK = "- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.shell: uptime\n"


# -- the raw engine ------------------------------------------------------------------------------


def tuned_env(home: Path) -> dict[str, str]:
    """What the backend tunes, set by hand as a user who read docs/backends.md would."""
    return {"ANSIBLE_HOME": str(home), "ANSIBLE_SSH_CONTROL_PATH_DIR": str(home / "cp"),
            "ANSIBLE_PIPELINING": "True", "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=60s",
            "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3", "ANSIBLE_GATHERING": "explicit",
            "ANSIBLE_RETRY_FILES_ENABLED": "False", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}


def raw_run(data_dir: str, playbook: str, inventory: str, group: str, size: int, forks: int | None,
            envvars: dict[str, str]) -> None:
    """One in-process ansible_runner.run; raises unless every host of the group ended ok."""
    import ansible_runner

    os.environ["PATH"] = f"{BINDIR}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    kw: dict[str, Any] = {"forks": forks} if forks else {}
    result = ansible_runner.run(private_data_dir=data_dir, playbook=playbook, inventory=inventory, limit=group,
                                envvars=envvars, quiet=True, rotate_artifacts=3, **kw)
    ok = result.stats.get("ok", {}) if result.stats else {}
    if result.status != "successful" or len(ok) != size:
        said = result.stdout.read()[-1500:] if result.stdout else ""
        raise RuntimeError(f"raw run on {group}: {result.status}, {len(ok)} of {size} ok:\n{said}")


def raw_child(spec_json: str) -> None:
    """--raw-child: a fresh process running raw tuned ansible-runner once (part b)."""
    spec = json.loads(spec_json)
    raw_run(spec["data_dir"], spec["playbook"], spec["inventory"], spec["group"], spec["size"], spec["forks"],
            spec["env"])


@dataclass
class RawEngine:
    """One raw series: its own private data dir and ssh control sockets (warm after the first run)."""

    root: Path
    inventory: Path
    tuned: bool
    playbook_text: str = PLAYBOOK
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.root / "project").mkdir(parents=True, exist_ok=True)
        (self.root / "home" / "cp").mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "project" / "bench.yml").write_text(self.playbook_text)
        (self.root / "ansible.cfg").touch()  # no ansible.cfg from the working directory

    def env(self) -> dict[str, str]:
        home = self.root / "home"
        # discovery picks a broken pyenv shim on this machine kind, so even "defaults" name the interpreter
        base = tuned_env(home) if self.tuned else {"ANSIBLE_HOME": str(home), "LC_ALL": "C.UTF-8",
                                                   "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3"}
        return {**base, "ANSIBLE_CONFIG": str(self.root / "ansible.cfg"), **self.extra_env}

    def run(self, group: str, size: int, forks: int) -> None:
        raw_run(str(self.root), "bench.yml", str(self.inventory), group, size, forks if self.tuned else None,
                self.env())

    def child_spec(self, group: str, size: int, forks: int) -> str:
        return json.dumps({"data_dir": str(self.root), "playbook": "bench.yml", "inventory": str(self.inventory),
                           "group": group, "size": size, "forks": forks, "env": self.env()})


# -- OMBot --------------------------------------------------------------------------------------


class Ombot:
    """A real master with backend = "ansible" over the sshd hosts, and the client library."""

    def __init__(self, root: Path, inventory_text: str, max_parallel_hosts: int | None) -> None:
        from tests.support import Cluster

        limits = {"max_parallel_hosts": max_parallel_hosts} if max_parallel_hosts else {}
        self.cluster = Cluster(root, {"local": ["m1"]}, inventory=inventory_text, limits=limits)
        text = self.cluster.config_path.read_text()
        self.cluster.config_path.write_text(
            text.replace('state_dir = "state-m1"', 'state_dir = "state-m1"\nbackend = "ansible"'))
        self.cluster.start("m1")
        self.router = self.cluster.router()
        self.last_profile: dict[str, float] = {}

    def run(self, group: str, size: int) -> None:
        hosts = [f"h{i:02d}" for i in range(1, size + 1)]
        seen: dict[str, float] = {}
        started = time.perf_counter()

        def on_event(event: dict[str, Any]) -> None:
            now = time.perf_counter() - started
            if event["kind"] == "host" and event["data"]["status"] == "ok":
                seen[event["data"]["host"]] = now
            if event["kind"] == "finished":
                seen["backend"] = float(event["data"].get("duration", 0))

        ref, reply = self.router.submit("local", "shell.exec", {"cmd": "uptime"}, hosts)
        submitted = time.perf_counter() - started
        state = self.router.follow(ref, on_event, first=reply.get("events", []))
        ok = [h for h in hosts if h in seen]
        if state != "ok" or len(ok) != size:
            raise RuntimeError(f"ombot job on {group}: {state}, {len(ok)} of {size} ok:\n"
                               + self.cluster.processes["m1"].log()[-2000:])
        ended = time.perf_counter() - started
        self.last_profile = {"submit": submitted, "first_host": min(seen[h] for h in hosts),
                             "last_host": max(seen[h] for h in hosts), "end": ended, "backend": seen["backend"]}

    def forks(self, size: int) -> int:
        """The forks the master runs a job on `size` hosts with."""
        from ombot.masters.backends.ansible import job_forks

        settings = self.cluster.config().masters["m1"]
        return job_forks(size, settings.ansible.forks, settings.limits.max_parallel_hosts)

    def cli(self, group: str, size: int) -> None:
        done = self.cluster.ombot("run", "shell.exec", group, "cmd=uptime", timeout=300)
        if done.returncode != 0 or "state: ok" not in done.stdout:  # ok: every host ended ok
            raise RuntimeError(f"ombot run on {group} exited {done.returncode}:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")

    def book(self) -> tuple[str, dict[str, str]]:
        """The playbook this master generates for the job, and the environment it runs it with."""
        from ombot.masters.backends import ansible, ansible_play
        from ombot.modules import Plan, Shell

        settings = self.cluster.config().masters["m1"]
        text = ansible_play.build(Plan(Shell("uptime")), "bench", "bench", settings.ansible.python, None,
                                  settings.limits.output_cap_bytes).text
        return text, ansible.AnsibleBackend(settings)._envvars()

    def close(self) -> None:
        self.router.close()
        self.cluster.stop_all()


# -- measuring ------------------------------------------------------------------------------------


def fresh_raw(engine: RawEngine, group: str, size: int, forks: int) -> None:
    done = subprocess.run([sys.executable, __file__, "--raw-child", engine.child_spec(group, size, forks)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"raw child on {group} exited {done.returncode}:\n{done.stderr[-2000:]}")


def row(label: str, samples: dict[str, list[float]], names: list[str]) -> str:
    return f"  {label:<6}" + "".join(f"{statistics.median(samples[n]):>14.2f}" for n in names)


def spread(label: str, samples: dict[str, list[float]], names: list[str]) -> str:
    return f"  {label:<6}" + "".join(f"{f'{min(samples[n]):.2f}-{max(samples[n]):.2f}':>14}" for n in names)


def ratios(samples: dict[str, list[float]], num: str, dens: list[str]) -> str:
    med = {n: statistics.median(v) for n, v in samples.items()}
    return "   ".join(f"{num}/{d} {med[num] / med[d]:.2f}x" for d in dens if d in med)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10,50", help="host counts (default 1,10,50)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per series and size (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs per series and size (default 1)")
    parser.add_argument("--max-parallel-hosts", type=int, metavar="N",
                        help="the master's limits.max_parallel_hosts (default: its default, 16); forks follow")
    parser.add_argument("--forks-sweep", type=lambda text: [int(n) for n in text.split(",")], metavar="LIST",
                        help="also run raw tuned on the largest size at each of these forks (e.g. 5,10,16,25,50)")
    parser.add_argument("--no-process", action="store_true", help="skip the fresh-process series")
    parser.add_argument("--no-ombook", action="store_true", help="skip the 'raw ombook' profiling series")
    parser.add_argument("--mitogen", type=Path, help="a venv (or site-packages) holding ansible_mitogen")
    parser.add_argument("--raw-child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.raw_child:
        return raw_child(opts.raw_child)
    sizes = read_sizes(parser, opts.sizes, 240, "host")
    from tests import sshd

    if not sshd.available():
        sys.exit("needs openssh-server (sshd and ssh-keygen)")
    with tempfile.TemporaryDirectory(prefix="ombot-bench-ansible-") as tmp:
        bench(Path(tmp), sizes, opts)


def mitogen_strategy_dir(path: Path) -> Path:
    found = sorted(path.glob("**/ansible_mitogen/plugins/strategy"))
    if not found:
        sys.exit(f"no ansible_mitogen/plugins/strategy under {path}")
    return found[0]


def bench(root: Path, sizes: list[int], opts: argparse.Namespace) -> None:
    from tests import sshd

    top = max(sizes)
    names = [f"h{i:02d}" for i in range(1, top + 1)]
    with ExitStack() as cleanup:  # a failed start still stops what started: sshds, ssh masters
        hosts = sshd.SshHosts(root / "sshd", names).start()
        cleanup.callback(end_ssh_masters, root)
        cleanup.callback(hosts.stop)
        groups = "".join(f"[s{n}]\n" + "\n".join(names[:n]) + "\n" for n in sizes)
        inventory_text = hosts.inventory(group="bench", unreachable=None, extra=groups)
        inventory = root / "inventory.ini"
        inventory.write_text(inventory_text)
        ombot = Ombot(root / "cluster", inventory_text, opts.max_parallel_hosts)
        cleanup.callback(ombot.close)
        engines = {"raw tuned": RawEngine(root / "tuned", inventory, tuned=True),
                   "raw defaults": RawEngine(root / "defaults", inventory, tuned=False)}
        if not opts.no_ombook:
            text, env = ombot.book()
            engines["raw ombook"] = RawEngine(root / "ombook", inventory, tuned=True, playbook_text=text,
                                              extra_env={k: v for k, v in env.items() if k != "PATH"})
        if opts.mitogen:
            strategy = mitogen_strategy_dir(opts.mitogen)
            engines["raw mitogen"] = RawEngine(root / "mitogen", inventory, tuned=True, extra_env={
                "ANSIBLE_STRATEGY_PLUGINS": str(strategy), "ANSIBLE_STRATEGY": "mitogen_linear"})
        load = os.getloadavg()[0]
        print(f"ansible engines: `uptime` via the shell module over real ssh (sshd per loopback address), "
              f"repeats={opts.repeats} (after {opts.warmup} warm-up), {os.cpu_count()} CPUs, load {load:.1f}")
        in_process: dict[int, dict[str, list[float]]] = {}
        busy: dict[int, dict[str, list[float]]] = {}
        profiles: dict[int, list[dict[str, float]]] = {}
        forks = {size: ombot.forks(size) for size in sizes}
        for size in sizes:
            group = f"s{size}"
            series: dict[str, Callable[[], None]] = {"ombot": partial(ombot.run, group, size)}
            for name, engine in engines.items():
                series[name] = partial(engine.run, group, size, forks[size])
            profiles[size], busy[size] = [], {}
            in_process[size] = measure(series, opts.repeats, opts.warmup, after=lambda name: profiles[size].append(
                dict(ombot.last_profile)) if name == "ombot" else None, busy=busy[size])
            medians = ", ".join(f"{n} {statistics.median(v):.2f}" for n, v in in_process[size].items())
            print(f"    {size} hosts, forks {forks[size]} (s): {medians}; "
                  + ratios(in_process[size], "ombot", ["raw tuned", "raw defaults"]), flush=True)
        report_in_process(in_process, busy, profiles, forks)
        if opts.forks_sweep:
            sweep_forks(engines["raw tuned"], top, opts.forks_sweep, opts)
        if not opts.no_process:
            fresh: dict[int, dict[str, list[float]]] = {}
            for size in sizes:
                group = f"s{size}"
                fresh[size] = measure({"ombot run": partial(ombot.cli, group, size),
                                       "raw process": partial(fresh_raw, engines["raw tuned"], group, size,
                                                              forks[size])},
                                      opts.repeats, 0)
            report_fresh(fresh)
        print(f"  load average after: {os.getloadavg()[0]:.1f}")


def end_ssh_masters(root: Path) -> None:
    """ControlPersist leaves an ssh mux per host and series for 60 s: end them now, leave nothing."""
    state = root / "cluster" / "state-m1" / "ansible"
    record = state / "cp.path"  # the master's directory under /tmp, when its own path was too long for a socket
    master_dir = Path(record.read_text().strip()) if record.exists() else state / "cp"
    for socket_path in [p for d in [*root.glob("*/home/cp"), master_dir] if d.is_dir() for p in d.iterdir()
                        if p.is_socket()]:
        subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "bench"], capture_output=True,
                       timeout=10)
    if not master_dir.is_relative_to(root):
        shutil.rmtree(master_dir, ignore_errors=True)


def report_in_process(results: dict[int, dict[str, list[float]]], busy: dict[int, dict[str, list[float]]],
                      profiles: dict[int, list[dict[str, float]]], forks: dict[int, int]) -> None:
    names = list(next(iter(results.values())))
    dens = [n for n in names if n != "ombot"]
    print(f"\n  in-process, median seconds per run (forks: {', '.join(f'{n} at {s}' for s, n in forks.items())})")
    print(f"  {'hosts':<6}" + "".join(f"{n:>14}" for n in names))
    for size, samples in results.items():
        print(row(str(size), samples, names))
    print("  min-max")
    for size, samples in results.items():
        print(spread(str(size), samples, names))
    print("  machine busy CPU seconds per run (medians)")
    for size, samples in busy.items():
        print(row(str(size), samples, names))
    print("\n  ratios (medians): seconds | busy CPU seconds")
    for size, samples in results.items():
        print(f"  {size:<6} " + ratios(samples, "ombot", dens) + "  |  " + ratios(busy[size], "ombot", dens))
    print("  goals: ombot/raw tuned <= 1.10x, ombot/raw defaults <= 0.60x")
    print("\n  where ombot's time goes (medians, seconds): submit reply, first host, last host, end (client's clock), "
          "backend run (the master's)")
    for size, runs in profiles.items():
        if runs:
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"  {size:<6} {med['submit']:8.2f} {med['first_host']:10.2f} {med['last_host']:10.2f} "
                  f"{med['end']:8.2f} {med['backend']:8.2f}")


def sweep_forks(engine: RawEngine, size: int, counts: list[int], opts: argparse.Namespace) -> None:
    """Raw tuned on `size` hosts at several forks: what more forks cost when the CPUs are the limit."""
    series: dict[str, Callable[[], None]] = {f"forks {n}": partial(engine.run, f"s{size}", size, n) for n in counts}
    busy: dict[str, list[float]] = {}
    samples = measure(series, opts.repeats, opts.warmup, busy=busy)
    print(f"\n  raw tuned on {size} hosts by forks: median seconds, busy CPU seconds")
    for name, values in samples.items():
        print(f"  {name:<10} {statistics.median(values):8.2f} {statistics.median(busy[name]):8.2f}")


def report_fresh(results: dict[int, dict[str, list[float]]]) -> None:
    names = list(next(iter(results.values())))
    print("\n  fresh processes, median seconds per run")
    print(f"  {'hosts':<6}" + "".join(f"{n:>14}" for n in names) + "      ratio")
    for size, samples in results.items():
        print(row(str(size), samples, names) + "      " + ratios(samples, "ombot run", ["raw process"]))
    print("  min-max")
    for size, samples in results.items():
        print(spread(str(size), samples, names))


if __name__ == "__main__":
    main()
