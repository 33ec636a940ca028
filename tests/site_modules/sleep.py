from ombot.modules import Command, Plan, module, params as p


@module("test.sleep", category="test", params=[p.Int("seconds", min=0, max=600)])
def run(seconds: int) -> Plan:
    """Sleep on each host (tests use it for long-running jobs)."""
    return Plan(Command(["sleep", str(seconds)]), Command(["echo", "woke"]))
