from ombot.modules import Plan, TailFile, module, params as p

LOG_ROOTS = ("/var/log",)


@module("log.tail", category="logs", concurrency="parallel", params=[
    p.Path("path", help="a log file under /var/log", roots=LOG_ROOTS),
    p.Int("lines", help="how many lines from the end", min=1, max=10000, required=False, default=100),
])
def run(path: str, lines: int) -> Plan:
    """Show the last lines of a log file under /var/log."""
    # The backend opens the file and checks the open descriptor (one link, a regular file, really
    # under /var/log): neither a symlink swapped in after a check nor a hardlink can lead elsewhere.
    return Plan(TailFile(path, lines, LOG_ROOTS, param="path"))
