from ombot.modules import Plan, SaltState, module, params as p


@module("salt.state", category="config", risk="high", params=[
    p.String("state", help="a state the master allows, by name (nginx, web.app), from the salt-master's file_roots",
             pattern=r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", max_len=128),
])
def run(state: str) -> Plan:
    """Apply a Salt state from the master's allow-list (Salt backend only; check=yes shows the changes)."""
    # The master checks the state against `[masters.ID.salt] states` at submit; a master on another
    # backend refuses the job there, saying it needs the Salt backend.
    return Plan(SaltState(state))
