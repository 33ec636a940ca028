from typing import Any

from ombot.modules import Command, Plan, module


@module("facts", category="diagnostics", concurrency="parallel")
def run() -> Plan:
    """Uptime, load, memory and root disk usage of each host."""
    return Plan(
        Command(["cat", "/proc/uptime", "/proc/loadavg"]),
        Command(["grep", "-E", "^(MemTotal|MemAvailable):", "/proc/meminfo"]),
        Command(["df", "-P", "-k", "/"]),
        parse=parse,
    )


def parse(out: str) -> dict[str, Any]:
    lines = out.splitlines()
    uptime, load = lines[0].split(), lines[1].split()
    mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines[2:4]}
    disk = lines[5].split()
    return {
        "uptime_seconds": int(float(uptime[0])),
        "load": [float(x) for x in load[:3]],
        "memory_total_bytes": mem["MemTotal"],
        "memory_available_bytes": mem["MemAvailable"],
        "disk_root_total_bytes": int(disk[1]) * 1024,
        "disk_root_used_percent": int(disk[4].rstrip("%")),
    }
