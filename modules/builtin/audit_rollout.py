from ombot.modules import AgentSetup, Plan, module, params as p

# The interpreter that makes the agent's venv on the host: a system Python of 3.9 or later.
PYTHONS = r"/usr/(local/)?bin/python3(\.[0-9]{1,2})?"


@module("audit.rollout", category="audit", risk="high", timeout=900, params=[
    p.Bool("auditd", help="also load the auditd layer's rules (execve of login sessions)", required=False,
           default=False),
    p.String("python", help="the host's Python 3.9+ that makes the agent's venv", pattern=PYTHONS, max_len=32,
             required=False, default="/usr/bin/python3"),
])
def run(auditd: bool, python: str) -> Plan:
    """Install OMBot's audit agent (its wheels, agent.toml, key, shell hook, service) and enrol it."""
    # The master fills in the wheelhouse and agent.toml when the job runs, binds each host's new key to
    # its enrolment and waits for the agent's first heartbeat (masters/rollout.py, docs/audit.md).
    return Plan(AgentSetup("install", auditd=auditd, python=python))
