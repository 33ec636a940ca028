"""What the benchmarks share: timing one call, running series in turn, reading --sizes."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable


def timed(fn: Callable[[], None], scale: float = 1.0) -> float:
    """How long `fn()` took, in seconds times `scale` (1000: milliseconds)."""
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * scale


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all CPUs, /proc/stat): the difference
    over a run counts every process it caused (sshds, remote Pythons, workers), and unlike wall time
    it does not grow when the run's processes wait for each other on a saturated machine."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def measure(series: dict[str, Callable[[], None]], repeats: int, warmup: int, scale: float = 1.0,
            after: Callable[[str], None] = lambda name: None,
            busy: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """`warmup` unmeasured rounds of every series, then `repeats` measured ones; `after(name)` follows
    each measured run. With `busy`, the machine's busy CPU seconds of each measured run go there too."""
    for _ in range(warmup):
        for fn in series.values():
            fn()
    names = list(series)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):  # rotate the order: no series always runs first or after the same one
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            before = busy_seconds()
            samples[name].append(timed(series[name], scale))
            if busy is not None:
                busy.setdefault(name, []).append(busy_seconds() - before)
            after(name)
    return samples


def sizes(parser: argparse.ArgumentParser, text: str, most: int, what: str) -> list[int]:
    """--sizes "1,10,50": distinct counts from 1 to `most`, in order."""
    counts = sorted({int(s) for s in text.split(",")})
    if not counts or counts[0] < 1 or counts[-1] > most:
        parser.error(f"--sizes are {what} counts from 1 to {most}")
    return counts
