from ombot.modules import Plan, Shell, module, params as p


@module("shell.exec", category="exec", risk="high",
        params=[p.ShellCommand("cmd", help="command line, run by sh -c on each host")])
def run(cmd: str) -> Plan:
    """Run a command line through `sh -c` on each host (pipes and globs work; high risk)."""
    return Plan(Shell(cmd))
