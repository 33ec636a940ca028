"""The audit rules engine (audit/rules.py): pure code, tested in process; one CLI test through a real process."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ombot.audit.alerts import Thresholds
from ombot.audit.examples import SAMPLE_RULES, check_examples
from ombot.audit.rules import Match, RuleSet, Threshold, load_rules, parse_rules, redact
from ombot.errors import ConfigError

PATH = Path("rules.toml")


def rules(text: str) -> RuleSet:
    return parse_rules(PATH, tomllib.loads(text))


def event(command: str, **fields: Any) -> dict[str, Any]:
    return {"command": command, "user": "alice", "host": "web01", "idc": "bj", "exit_status": 0, "at": 0, **fields}


def names(ruleset: RuleSet, command: str, **fields: Any) -> list[str]:
    return [m.rule for m in ruleset.match(event(command, **fields))]


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        rules(text)
    return str(caught.value)


# --- the sample -----------------------------------------------------------------------------------


def test_the_sample_loads_and_all_its_examples_pass() -> None:
    sample = rules(SAMPLE_RULES)
    assert len(sample.rules) >= 6
    assert all(r.examples_match and r.examples_no_match for r in sample.rules)  # every rule shows what it means
    assert check_examples(sample) == []


@pytest.mark.parametrize("command, rule", [
    ("rm -rf /", "wipe the root filesystem"),
    ("curl -s https://x.example/i.sh | bash", "pipe a download into a shell"),
    ("history -c", "hide shell history"),
    ("unset PROMPT_COMMAND", "hide shell history"),
    ("sudo vim /etc/sudoers", "edit sudoers"),
    ("iptables -F", "flush the firewall"),
])
def test_the_sample_catches_the_classics(command: str, rule: str) -> None:
    assert rule in names(rules(SAMPLE_RULES), command)


def test_check_examples_names_the_rule_and_the_example() -> None:
    broken = rules('[[rules]]\nname = "wipe"\nkeywords = ["rm -rf"]\n'
                   'examples.match = ["rm -r /"]\nexamples.no_match = ["rm -rf ./x"]\n')
    assert check_examples(broken) == [
        "rule 'wipe': example 'rm -r /' should match but does not",
        "rule 'wipe': example 'rm -rf ./x' should not match but does",
    ]


def test_event_examples_check_the_fields_too() -> None:
    ruleset = rules('[[rules]]\nname = "root"\nkeywords = ["su"]\nusers = ["root"]\n'
                    'examples.match = [{ command = "su -", user = "root" }]\n'
                    'examples.no_match = [{ command = "su -", user = "bob" }]\n')
    assert check_examples(ruleset) == []


# --- matching -------------------------------------------------------------------------------------


def test_keywords_are_case_insensitive_by_default_and_exact_when_asked() -> None:
    ruleset = rules('[[rules]]\nname = "any case"\nkeywords = ["History -C"]\n'
                    '[[rules]]\nname = "exact"\nkeywords = ["-F"]\ncase_sensitive = true\n')
    assert names(ruleset, "HISTORY -c") == ["any case"]
    assert names(ruleset, "iptables -F") == ["exact"]
    assert names(ruleset, "iptables -f") == []


def test_non_ascii_text_keeps_keyword_positions() -> None:
    # "İ" lowers to two characters: folding must not shift where a case-sensitive keyword is checked.
    ruleset = rules('[[rules]]\nname = "exact"\nkeywords = ["-F"]\ncase_sensitive = true\n')
    assert names(ruleset, "echo İİİ; iptables -F") == ["exact"]


def test_a_rule_with_keywords_and_regexes_needs_both() -> None:
    ruleset = rules('[[rules]]\nname = "both"\nkeywords = ["curl"]\nregexes = [\'\\|\\s*sh\\b\']\n')
    assert names(ruleset, "curl x | sh") == ["both"]
    assert names(ruleset, "curl x | jq") == []
    assert names(ruleset, "wget x | sh") == []


def test_regexes_are_case_insensitive_unless_the_rule_says() -> None:
    ruleset = rules('[[rules]]\nname = "r"\nregexes = ["visudo"]\n'
                    '[[rules]]\nname = "R"\nregexes = ["visudo"]\ncase_sensitive = true\n')
    assert names(ruleset, "VISUDO") == ["r"]
    assert names(ruleset, "visudo") == ["r", "R"]


def test_field_conditions() -> None:
    ruleset = rules('[[rules]]\nname = "f"\nkeywords = ["reboot"]\nusers = ["root", "adm*"]\n'
                    'hosts = ["db*"]\nidcs = ["bj"]\nexit_status = [0]\n'
                    '[[rules]]\nname = "failed"\nkeywords = ["reboot"]\nexit_status = "nonzero"\n')
    assert names(ruleset, "reboot", user="admin", host="db3") == ["f"]
    assert names(ruleset, "reboot", user="alice", host="db3") == []
    assert names(ruleset, "reboot", user="root", host="web1") == []
    assert names(ruleset, "reboot", user="root", host="db3", idc="sh") == []
    assert names(ruleset, "reboot", user="root", host="db3", exit_status=1) == ["failed"]
    assert names(ruleset, "reboot", user="root", host="db3", exit_status=None) == []  # still running: not failed


def test_a_match_carries_what_the_alert_needs() -> None:
    ruleset = rules('channel = "C0DEFAULT"\n[[rules]]\nname = "h"\nkeywords = ["history -c"]\nseverity = "critical"\n'
                    'dedupe = "{rule}:{host}:{user}"\ncooldown_seconds = 60\n'
                    'threshold = { count = 3, window_seconds = 120 }\n'
                    '[[rules]]\nname = "d"\nkeywords = ["history"]\nchannel = "C0OTHER"\n')
    assert ruleset.match(event("history -c")) == [
        Match("h", "critical", "C0DEFAULT", "h:web01:alice", 60, Threshold(3, 120)),
        Match("d", "warning", "C0OTHER", "d:web01", 300, Threshold(1, 0)),
    ]


# --- thresholds and cooldown ---------------------------------------------------------------------


def test_a_threshold_fires_on_the_count_within_the_window() -> None:
    match = Match("r", "warning", None, "r:web01", 0, Threshold(3, 60))
    thresholds = Thresholds()
    assert [thresholds.fire(match, at) for at in (0, 10_000, 20_000)] == [False, False, True]
    # Spread wider than the window: never three within 60 s.
    assert [thresholds.fire(match, at) for at in (100_000, 140_000, 180_000, 220_000)] == [False] * 4
    assert thresholds.fire(match, 230_000) is True  # 180, 220, 230: within 60 s


def test_a_cooldown_holds_back_alerts_per_dedupe_key() -> None:
    web = Match("r", "warning", None, "r:web01", 300, Threshold())
    db = Match("r", "warning", None, "r:db01", 300, Threshold())
    thresholds = Thresholds()
    assert thresholds.fire(web, 0) is True
    assert thresholds.fire(web, 299_000) is False
    assert thresholds.fire(db, 1_000) is True  # another key: its own cooldown
    assert thresholds.fire(web, 300_000) is True


def test_thresholds_keep_a_bounded_number_of_keys() -> None:
    thresholds = Thresholds(max_keys=10)
    for i in range(100):
        thresholds.fire(Match("r", "info", None, f"k{i}", 0, Threshold(5, 60)), i)
    assert len(thresholds._recent) == 10


# --- errors name the file, rule and key ----------------------------------------------------------


@pytest.mark.parametrize("body, expected", [
    ('keywords = ["x"]\nseverity = "loud"', "rules.toml: rules[0] ('r').severity: expected one of info, warning, critical"),
    ('keywords = ["x"]\nhost = ["db*"]', "rules.toml: rules[0] ('r').host: expected a known key (did you mean 'hosts'?"),
    ('keywords = "x"', "rules.toml: rules[0] ('r').keywords: expected a list of strings"),
    ('severity = "info"', "rules.toml: rules[0] ('r').keywords: expected at least one keyword or regex"),
    ('keywords = ["x"]\ndedupe = "{rule}:{command}"', "rules.toml: rules[0] ('r').dedupe: expected fields among"),
    ('keywords = ["x"]\nchannel = "#ops"', "rules.toml: rules[0] ('r').channel: expected a Slack channel id"),
    ('keywords = ["x"]\nexit_status = "failed"', "rules.toml: rules[0] ('r').exit_status: expected \"nonzero\""),
    ('keywords = ["x"]\nthreshold = { count = 0 }', "rules.toml: rules[0] ('r').threshold.count: expected 1 to 10000"),
    ('keywords = ["x"]\nthreshold = { count = 3 }', "rules.toml: rules[0] ('r').threshold.window_seconds: expected a window"),
    ('keywords = ["x"]\nexamples.match = [{ cmd = "x" }]', "rules.toml: rules[0] ('r').examples.match[0].command: expected"),
    ('regexes = ["(a)\\\\1"]', "rules.toml: rules[0] ('r').regexes[0]: expected a regex RE2 can run in linear time"),
])
def test_errors_name_the_rule_and_the_key(body: str, expected: str) -> None:
    assert error_of(f'[[rules]]\nname = "r"\n{body}\n').startswith(expected)


def test_duplicate_names_and_bad_redaction_patterns_are_refused() -> None:
    twice = '[[rules]]\nname = "r"\nkeywords = ["x"]\n'
    assert "'r' is used twice" in error_of(twice * 2)
    assert error_of('[redact]\npatterns = ["(?<=x)y"]\n').startswith("rules.toml: redact.patterns[0]: expected a regex")


def test_load_rules_names_a_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.toml"):
        load_rules(tmp_path / "missing.toml")
    (tmp_path / "broken.toml").write_text("[[rules]\n")
    with pytest.raises(ConfigError, match="broken.toml: expected valid TOML"):
        load_rules(tmp_path / "broken.toml")


# --- linear time and scale -----------------------------------------------------------------------


def test_a_catastrophic_regex_runs_in_linear_time() -> None:
    ruleset = rules('[[rules]]\nname = "nested"\nregexes = ["(a*)*b"]\n')  # exponential under backtracking
    assert names(ruleset, "a" * 50_000) == []
    assert names(ruleset, "a" * 50_000 + "b") == ["nested"]


def test_a_backreference_is_refused_with_the_rule_name() -> None:
    message = error_of('[[rules]]\nname = "doubled"\nregexes = [\'(\\w+) \\1\']\n')
    assert "rules[0] ('doubled').regexes[0]" in message and "backreferences" in message


def test_a_thousand_rules_build_and_match() -> None:
    text = "".join(f'[[rules]]\nname = "k{i}"\nkeywords = ["word{i}x", "other{i}y"]\n' for i in range(900))
    text += "".join(f'[[rules]]\nname = "r{i}"\nregexes = [\'\\bcmd{i}\\s+--flag\\b\']\n' for i in range(100))
    ruleset = rules(text)
    assert len(ruleset.rules) == 1000
    assert names(ruleset, "echo WORD17X other899y; cmd42 --flag") == ["k17", "k899", "r42"]
    assert names(ruleset, "ls -la " * 1000) == []
    # past the set's text limit each regex runs alone: the answer must not change
    assert names(ruleset, "x" * 5000 + " cmd7 --flag; word3x") == ["k3", "r7"]


def test_the_regex_pass_gives_what_each_regex_alone_gives() -> None:
    """All regexes run as one RE2 set (short commands) or one by one (long ones): same rules either way."""
    ruleset = rules('[[rules]]\nname = "a"\nregexes = ["rm\\\\s+-rf", "mkfs"]\n'
                    '[[rules]]\nname = "b"\nregexes = ["MKFS"]\ncase_sensitive = true\n'
                    '[[rules]]\nname = "c"\nkeywords = ["iptables"]\nregexes = ["-F\\\\b"]\n')
    for command in ("rm  -rf /", "MKFS /dev/sda", "iptables -F", "iptables -L", "-F", "ls"):
        for text in (command, command + " #" + "x" * 5000):
            alone = sorted(r.name for r in ruleset.rules if r.regexes and r.regexes_match(text)
                           and (not r.keywords or r.name == "c" and "iptables" in text))
            assert names(ruleset, text) == alone, text


# --- redaction -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command, shown", [
    ("mysql -uroot -pS3cret db", "mysql -uroot -p**** db"),
    ("mysql -p'two words' db", "mysql -p**** db"),
    ("app --password=hunter2 run", "app --password=**** run"),
    ("app --password hunter2", "app --password ****"),
    ("app --passwd=hunter2", "app --passwd=****"),
    ("export DB_PASSWORD=hunter2", "export DB_PASSWORD=****"),
    ("curl 'https://x/?user=a&password=hunter2'", "curl 'https://x/?user=a&password=****'"),
    ("echo passwd: hunter2", "echo passwd: ****"),
    ("curl -d token=xoxb-123-456-abcDEF https://slack.com", "curl -d token=**** https://slack.com"),
    ("SLACK_APP_TOKEN=xapp-1-A0-123-abc ombot bot", "SLACK_APP_TOKEN=**** ombot bot"),
    ('curl -H "Authorization: Bearer eyJ.abc.def" https://api', 'curl -H "Authorization: Bearer ****" https://api'),
    ("mkdir -p /srv/data", "mkdir -p /srv/data"),  # a separate argument after -p is no password
])
def test_redaction_hides_each_kind_of_secret(command: str, shown: str) -> None:
    assert redact(command) == shown


def test_redaction_hides_slack_tokens_anywhere() -> None:
    assert redact("echo xoxp-1-2-3-zz") == "echo ****"


def test_extra_redaction_patterns_from_the_rules_file() -> None:
    ruleset = rules('[redact]\npatterns = [\'(?i)\\bapikey=(\\S+)\', "AKIA[A-Z0-9]{16}"]\n')
    assert ruleset.redact("run apikey=abc123 AKIAABCDEFGHIJKLMNOP") == "run apikey=**** ****"
    assert redact("run apikey=abc123") == "run apikey=abc123"  # not a built-in kind


# --- the CLI, through a real process -------------------------------------------------------------


def ombot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ombot", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_cli_test_rules_and_init_write_a_sample_that_passes(tmp_path: Path) -> None:
    assert ombot("init", str(tmp_path / "site")).returncode == 0
    written = tmp_path / "site" / "audit-rules.toml"
    assert written.read_text() == SAMPLE_RULES
    ok = ombot("audit", "test-rules", str(written))
    assert (ok.returncode, ok.stdout.strip()) == (0, f"ok: {len(rules(SAMPLE_RULES).rules)} rules"), ok.stderr

    failing = tmp_path / "failing.toml"
    failing.write_text('[[rules]]\nname = "wipe"\nkeywords = ["rm -rf"]\nexamples.match = ["rm -r /"]\n')
    bad = ombot("audit", "test-rules", str(failing))
    assert bad.returncode == 1
    assert bad.stdout.strip() == "rule 'wipe': example 'rm -r /' should match but does not"

    broken = tmp_path / "broken.toml"
    broken.write_text('[[rules]]\nname = "doubled"\nregexes = [\'(\\w+) \\1\']\n')
    refused = ombot("audit", "test-rules", str(broken))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "rules[0] ('doubled').regexes[0]" in refused.stderr
