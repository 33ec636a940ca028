from ombot.modules import AgentSetup, Plan, module, params as p

# As audit.rollout's (a module file may not import another: each declares exactly one module).
PYTHONS = r"/usr/(local/)?bin/python3(\.[0-9]{1,2})?"


@module("audit.remove", category="audit", risk="high", timeout=600, params=[
    p.String("python", help="the host's Python that runs the removal", pattern=PYTHONS, max_len=32,
             required=False, default="/usr/bin/python3"),
])
def run(python: str) -> Plan:
    """Remove OMBot's audit agent: its service, hook lines, auditd rules, key, spool and venv."""
    return Plan(AgentSetup("remove", python=python))
