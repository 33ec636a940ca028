"""A rules file's inline examples, checked (`ombot audit test-rules FILE`), and the sample file that
`ombot init` writes (docs/audit.md, "Rules")."""

from __future__ import annotations

from typing import Any

from ombot.audit.rules import RuleSet


def check_examples(ruleset: RuleSet) -> list[str]:
    """Problems with the rules' inline examples: a command string is checked against the rule's
    keywords and regexes; an event table against the whole rule, fields included."""
    problems = []
    for rule in ruleset.rules:
        for wanted, examples in ((True, rule.examples_match), (False, rule.examples_no_match)):
            for example in examples:
                if _example_matches(ruleset, rule.name, example) != wanted:
                    shown = example if isinstance(example, str) else dict(example)
                    problems.append(f"rule {rule.name!r}: example {shown!r} should "
                                    f"{'match' if wanted else 'not match'} but does{'' if not wanted else ' not'}")
    return problems


def _example_matches(ruleset: RuleSet, name: str, example: str | dict[str, Any]) -> bool:
    if isinstance(example, str):
        return name in ruleset.command_matches(example)
    event = {"user": "", "host": "", "idc": "", "exit_status": None, "at": 0, **example}
    return any(m.rule == name for m in ruleset.match(event))


SAMPLE_RULES = r"""# OMBot shell audit rules (docs/audit.md, "Rules"). `ombot audit test-rules FILE` checks this
# file's syntax and that every rule's examples match (or do not) as written.
#
# A rule matches a command when one of its keywords is in it (case-insensitive unless
# case_sensitive = true) and, if it has regexes, one of them matches (RE2 syntax: linear time,
# no backreferences or lookarounds), and its field conditions hold: users, hosts and idcs globs,
# exit_status ("nonzero" or a list). An alert goes to `channel` (a Slack channel id) once
# `threshold.count` matches with one dedupe key fall within `threshold.window_seconds`, and at
# most once per `cooldown_seconds` per dedupe key (fields: rule, severity, host, user, idc, exit_status).

# channel = "C0123AUDIT"          # the default channel for every rule's alerts

# Secrets in commands are hidden in alerts and search results: -pSECRET, --password=..., password=...,
# Slack tokens, Authorization headers; and these RE2 patterns (the first group is hidden, or the
# whole match when there is none).
[redact]
patterns = ['(?i)\btoken=(\S+)', '(?i)\bAWS_SECRET_ACCESS_KEY=(\S+)']

[[rules]]
name = "wipe the root filesystem"
severity = "critical"
keywords = ["rm "]
regexes = ['\brm\s+(?:-{1,2}[\w-]+\s+)*/\*?(?:[\s;&|]|$)']
cooldown_seconds = 0
examples.match = ["rm -rf /", "sudo rm -rf --no-preserve-root /", "rm -fr /*"]
examples.no_match = ["rm -rf /tmp/build", "rm -rf ./build", "rm notes.txt"]

[[rules]]
name = "pipe a download into a shell"
severity = "critical"
regexes = ['\b(?:curl|wget)\b[^|]*\|\s*(?:sudo\s+)?(?:ba|z|da|k)?sh\b']
dedupe = "{rule}:{host}:{user}"
examples.match = ["curl -fsSL https://get.example.com | sh", "wget -qO- http://x.example/i.sh | sudo bash"]
examples.no_match = ["curl -o install.sh https://get.example.com", "curl https://api.example.com | jq ."]

[[rules]]
name = "hide shell history"
severity = "critical"
keywords = ["history -c", "history -w /dev/null", "unset histfile", "unset prompt_command", "histsize=0",
            "histfile=/dev/null", "set +o history"]
dedupe = "{rule}:{host}:{user}"
examples.match = ["history -c", "unset PROMPT_COMMAND", "export HISTSIZE=0", "set +o history"]
examples.no_match = ["history | tail", "echo $PROMPT_COMMAND"]

[[rules]]
name = "edit sudoers"
severity = "warning"
keywords = ["sudoers"]
regexes = ['(?:\b(?:vim?|nano|emacs|tee)\s|\bsed\s+-i).*?/etc/sudoers', '>>?\s*/etc/sudoers', '\bvisudo\b']
examples.match = ["vi /etc/sudoers", "echo 'deploy ALL=(ALL) NOPASSWD:ALL' >> /etc/sudoers",
                  "sudo visudo -f /etc/sudoers.d/deploy", "sed -i 's/^#//' /etc/sudoers.d/ops"]
examples.no_match = ["cat /etc/sudoers", "grep deploy /etc/sudoers.d/*"]

[[rules]]
name = "flush the firewall"
severity = "critical"
case_sensitive = true             # iptables -F flushes; -f is something else
keywords = ["iptables", "ip6tables", "nft"]
regexes = ['\bip6?tables\s+(?:-t\s+\S+\s+)?(?:-F|--flush|-X)\b', '\bip6?tables\s+-P\s+\S+\s+ACCEPT', '\bnft\s+flush\s+ruleset']
examples.match = ["iptables -F", "ip6tables -t nat --flush", "iptables -P INPUT ACCEPT", "nft flush ruleset"]
examples.no_match = ["iptables -L -n", "iptables -f -A INPUT -j DROP"]

[[rules]]
name = "stop the audit"
severity = "critical"
regexes = ['\b(?:systemctl|service)\s+(?:stop|disable|mask|kill)\s+(?:ombot-audit|auditd)\b', '\bauditctl\s+-e\s*0\b']
examples.match = ["systemctl stop ombot-audit", "sudo systemctl mask auditd", "auditctl -e 0"]
examples.no_match = ["systemctl status ombot-audit"]

[[rules]]
name = "repeated failed sudo"
severity = "warning"
keywords = ["sudo "]
exit_status = "nonzero"
dedupe = "{rule}:{host}:{user}"
cooldown_seconds = 1800
threshold = { count = 5, window_seconds = 300 }
examples.match = [{ command = "sudo -i", user = "alice", exit_status = 1 }]
examples.no_match = [{ command = "sudo -i", user = "alice", exit_status = 0 }, "ls /root"]
"""
