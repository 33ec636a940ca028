#!/usr/bin/env python3
"""Mutation testing of the pure modules, outside CI: `./dev mutate [NAME]`, or this script directly.

Each module is mutated alone, in a scratch copy of the tree, and each mutant runs only that module's
fast unit tests (no master processes: a mutant must die in seconds). See docs/testing.md.

    scripts/mutate.py                 every module, grammar last
    scripts/mutate.py --module params one module
    scripts/mutate.py --list          the survivors of the last run, with their diffs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The rooms at the root that ombot/ links in (ombot/bot -> ../bot): in the scratch copy each one moves
# into ombot/ for real, so mutmut, which neither follows nor keeps symlinks, sees one plain package.
ROOMS = ("approvals", "audit", "audit_agent", "bot", "masters", "modules")
# Never the slow tier: its tests start processes, which import the unmutated tree anyway.
FAST = ["-m", "not slow"]


@dataclass(frozen=True)
class Target:
    name: str
    source: str  # the one file mutated
    tests: list[str]  # pytest arguments selecting its unit tests, and only fast ones
    # Regexes of source lines left unmutated: code that runs once per process (at import, or setting
    # the environment), before mutmut picks a mutant, so no test can see its mutants.
    unmutated: tuple[str, ...] = ()


TARGETS = [
    Target("params", "modules/params.py", ["tests/test_params.py", *FAST, "-k",
                                           "not test_master_with_a_bad_site_module and not after_restart"],
           unmutated=(r"Param\.registry\[cls\.kind\] = cls",)),
    Target("policy", "approvals/policy.py", ["tests/test_policy.py", *FAST, "-k",
                                             "not test_policy_check and not test_sample_policy "
                                             "and not test_policy_explain and not test_run_obeys"]),
    Target("envelope", "ombot/envelope.py", ["tests/test_envelope.py", *FAST]),
    Target("plan", "modules/plan.py", ["tests/test_plan.py", *FAST]),
    Target("inventory", "masters/inventory.py", ["tests/test_inventory.py", *FAST, "-k", "not test_master_runs"],
           unmutated=(r"os\.environ",)),
    # Last: bot/grammar.py was being rewritten when this was written; its pure tests live in test_fuzz.
    Target("grammar", "bot/grammar.py", ["tests/test_fuzz.py", *FAST, "-k",
                                         "not every_command_gets and not known_nasty and not remote_only "
                                         "and not implicit_localhost"]),  # those four drive a bot and a master
]
BY_NAME = {t.name: t for t in TARGETS}


def tree_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore: the tree as it is now, work in progress too."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True).stdout
    return sorted({name for name in listed.decode().split("\0") if name and (REPO / name).is_file()})


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def installed_path(source: str) -> str:
    """Where a source file sits in the scratch copy: a room's under ombot/ (masters/x.py -> ombot/masters/x.py),
    the base's where it is (ombot/envelope.py)."""
    return source if source.startswith("ombot/") else "ombot/" + source


def mutmut_section(target: Target) -> str:
    # Every package is a source path so that mutants/ holds the whole importable tree; only one file mutates.
    return (
        "\n[tool.mutmut]\n"
        f"source_paths = {toml_list(['ombot'])}\n"
        f"only_mutate = {toml_list([installed_path(target.source)])}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(target.tests)}\n"
        "pytest_add_cli_args = [\"-p\", \"no:cacheprovider\"]\n"
        f"do_not_mutate_patterns = {toml_list(list(target.unmutated))}\n"
        "use_git_change_detection = false\n"
    )


def prepare(target: Target, workdir: Path) -> Path:
    scratch = workdir / target.name
    shutil.rmtree(scratch, ignore_errors=True)  # a fresh copy: no result cached from older tests
    for name in tree_files():
        dest = scratch / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest)
    for room in ROOMS:
        shutil.move(scratch / room, scratch / "ombot" / room)
    with open(scratch / "pyproject.toml", "a") as pyproject:
        pyproject.write(mutmut_section(target))
    return scratch


def mutmut(scratch: Path, *args: str, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([str(binary), *args], cwd=scratch, env=env, text=True,
                          capture_output=quiet, check=False)


def run_mutmut(scratch: Path, children: int) -> None:
    """`mutmut run`, its spinner kept out of the terminal: the log is in the scratch copy."""
    log = scratch / "mutmut.log"
    done = mutmut(scratch, "run", "--max-children", str(children), quiet=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"mutmut failed in {scratch} (exit {done.returncode}); see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-20:]))


def survivors(scratch: Path) -> list[str]:
    lines = mutmut(scratch, "results", quiet=True).stdout.splitlines()
    return [line.split(":")[0].strip() for line in lines if line.strip().endswith(": survived")]


def stats(scratch: Path) -> dict[str, int]:
    mutmut(scratch, "export-cicd-stats", quiet=True)
    path = scratch / "mutants" / "mutmut-cicd-stats.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run(target: Target, workdir: Path, children: int) -> str:
    scratch = prepare(target, workdir)
    started = time.monotonic()
    print(f"{target.name}: mutating {target.source}, running {' '.join(target.tests)}", flush=True)
    run_mutmut(scratch, children)
    counted = stats(scratch)
    killed, total = counted.get("killed", 0), counted.get("total", 0)
    score = f"{100 * killed / total:.0f}%" if total else "n/a"
    return (f"{target.name}: {killed}/{total} killed ({score}), {counted.get('survived', 0)} survived, "
            f"{counted.get('timeout', 0)} timed out, {counted.get('no_tests', 0)} untested, "
            f"in {time.monotonic() - started:.0f} s")


def show_survivors(names: list[str], workdir: Path) -> None:
    for name in names:
        scratch = workdir / name
        if not (scratch / "mutants").is_dir():
            print(f"{name}: not run yet (no {scratch}/mutants)")
            continue
        left = survivors(scratch)
        print(f"== {name}: {len(left)} survived")
        for mutant in left:
            mutmut(scratch, "show", mutant)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", choices=list(BY_NAME), action="append", help="run only this one (repeatable)")
    parser.add_argument("--list", action="store_true", help="show the survivors of the last run instead")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ombot-mutate",
                        help="where the scratch copies go (default: %(default)s)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants run at once (default: %(default)s)")
    args = parser.parse_args()
    names = args.module or list(BY_NAME)
    if args.list:
        show_survivors(names, args.workdir)
        return 0
    summary = [run(BY_NAME[name], args.workdir, args.max_children) for name in names]
    print("\n".join(["", "mutation scores:", *summary, f"survivors: {sys.argv[0]} --list"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
