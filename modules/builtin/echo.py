from ombot.modules import Emit, Plan, module, params as p


@module("echo", category="diagnostics", concurrency="parallel",
        params=[p.String("message", help="text to send back", max_len=1024)])
def run(message: str) -> Plan:
    """Send a message through the whole path and get it back from every host."""
    return Plan(Emit(message))
