from ombot.modules import Ping, Plan, module


@module("ping", category="diagnostics", concurrency="parallel")
def run() -> Plan:
    """Check that each host answers through its backend."""
    return Plan(Ping())
