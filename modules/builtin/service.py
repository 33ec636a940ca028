from ombot.modules import Command, FirstAvailable, Plan, module, params as p

ACTIONS = ("start", "stop", "restart", "reload", "status")
UNIT_NAME = r"[A-Za-z0-9][A-Za-z0-9@._-]{0,127}"


@module("service", category="services", risk="medium", params=[
    p.Choice("action", help="what to do with the service", choices=ACTIONS),
    p.String("name", help="service name, e.g. nginx or getty@tty1", pattern=UNIT_NAME, max_len=128),
])
def run(action: str, name: str) -> Plan:
    """Start, stop, restart, reload or show the status of a service (systemctl, else service)."""
    return Plan(FirstAvailable(
        Command(["systemctl", action, "--", name]),
        Command(["service", name, action]),
    ))
