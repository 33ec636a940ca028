from modules import Command, Plan, RequireWithin, module, params as p

LOG_ROOTS = ("/var/log",)


@module("log.tail", category="logs", params=[
    p.Path("path", help="a log file under /var/log", roots=LOG_ROOTS),
    p.Int("lines", help="how many lines from the end", min=1, max=10000, required=False, default=100),
])
def run(path: str, lines: int) -> Plan:
    """Show the last lines of a log file under /var/log."""
    return Plan(
        RequireWithin(path, LOG_ROOTS, param="path"),  # a symlink in /var/log must not lead elsewhere
        Command(["tail", "-n", str(lines), "--", path]),
    )
