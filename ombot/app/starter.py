"""What `ombot init` and `ombot init --production` share: the sample rules of the policy, the CLI
key's name, and the fresh keys."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ombot.keys import Identity

# Both starters' policy ends with these rules (str.format text: braces doubled).
POLICY_RULES = """\
[[rules]]
name = "risky changes need a lead"
modules = ["shell.exec", "script.run", "file.push", "ansible.playbook", "salt.state"]
request = ["ops"]
max_hosts = 20
approval = {{ count = 1, roles = ["leads"], expiry_seconds = 1800 }}
cancel = ["leads"]

[[rules]]
name = "the audit agent's rollout needs a lead"
modules = ["audit.rollout", "audit.remove"]
request = ["ops"]
max_hosts = 500
approval = {{ count = 1, roles = ["leads"], expiry_seconds = 1800 }}
cancel = ["leads"]

[[rules]]
name = "everyday operations"
modules = ["echo", "ping", "facts", "log.tail", "service"]
request = ["ops"]
max_hosts = 100
cancel = ["leads"]
"""


def cli_id(unix_user: str) -> str:
    """The operator's CLI registration: cli-USER."""
    return f"cli-{unix_user}".replace("_", "-")[:63]


def make_keys(directory: Path, names: list[str]) -> dict[str, Identity]:
    """A fresh key pair for each name, saved as DIRECTORY/keys/NAME.key (0600) and .pub."""
    from ombot.keys import Identity

    keys = {name: Identity.generate() for name in names}
    for name, identity in keys.items():
        identity.save(directory / "keys" / f"{name}.key")
    return keys
