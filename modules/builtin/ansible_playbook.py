from ombot.modules import Plan, RunPlaybook, module, params as p


@module("ansible.playbook", category="config", risk="high", params=[
    p.String("playbook", help="a playbook of the master's playbook directory, by name (ntp-server for ntp-server.yml)",
             pattern=r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", max_len=64),
    p.Args("vars", help="NAME=VALUE words, as the playbook's NAME.params.toml declares them", required=False),
])
def run(playbook: str, vars: list[str] | None) -> Plan:
    """Run a playbook from the master's allow-listed directory, with its declared, typed extra vars."""
    # The master checks the playbook and its vars at submit (masters/backends/playbooks.py): only the
    # Ansible backend runs playbooks, and only it knows where they live.
    return Plan(RunPlaybook(playbook, tuple(vars or ())))
