"""Per-host results as text, the one way: the CLI prints it, the bot puts it in a job's thread.

A result is the `data` of a job's `host` event (docs/protocol.md): host, status, rc, stdout, stderr,
byte counts, truncated, started, ended, error, data.
"""

from __future__ import annotations

import json
from typing import Any

HOST_WIDTH_CAP = 40
OUTPUT_PREVIEW = 60


def host_rows(results: list[dict[str, Any]]) -> list[str]:
    """A header and one row per host (sorted): status, exit code, time, and the first line of output."""
    ordered = sorted(results, key=lambda r: r["host"])
    width = min(max((len(r["host"]) for r in ordered), default=4), HOST_WIDTH_CAP)
    rows = [f"{'HOST':<{width}}  {'STATUS':<11} {'RC':>4} {'TIME':>7}  OUTPUT"]
    for r in ordered:
        rc = "" if r.get("rc") is None else str(r["rc"])
        first = r.get("error") or first_line(r.get("stdout", "")) or first_line(r.get("stderr", ""))
        rows.append(f"{r['host'][:width]:<{width}}  {r['status']:<11} {rc:>4} "
                    f"{r['ended'] - r['started']:>6.1f}s  {_clip(first, OUTPUT_PREVIEW)}")
    return rows


def host_log(results: list[dict[str, Any]]) -> str:
    """Everything each host said, host by host (sorted): errors, parsed data or stdout, stderr, cuts."""
    parts = []
    for r in sorted(results, key=lambda r: r["host"]):
        parts.append(f"=== {r['host']} ({r['status']}, rc={r.get('rc')})")
        if r.get("error"):
            parts.append(f"error: {r['error']}")
        # Parsed data stands for stdout; the Ansible backend's task counts alone are not parsed data.
        if any(key != "ansible" for key in r.get("data") or {}):
            parts.append(json.dumps(r["data"], indent=2, sort_keys=True))
        elif r.get("stdout"):
            parts.append(r["stdout"].rstrip("\n"))
        if r.get("stderr"):
            parts.append("--- stderr\n" + r["stderr"].rstrip("\n"))
        if r.get("truncated"):
            parts.append(f"[output cut by the master: {r['stdout_bytes']} stdout and {r['stderr_bytes']} "
                         f"stderr bytes produced, first {len(r['stdout'].encode())}/{len(r['stderr'].encode())} kept]")
    return "\n".join(parts) + "\n"


def first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
