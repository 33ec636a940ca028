"""The shell audit's rules engine: which commands raise an alert, where it goes, how often.

A pure module: rules read from a TOML file (docs/audit.md, "Rules"), matched against one event at a
time. All keywords of all rules are found in one Aho-Corasick pass; regexes run on RE2 (linear
time: a pattern RE2 cannot compile, e.g. a backreference, is refused at load, naming the rule);
then field conditions (user, host, IDC globs; exit status). `redact` hides secrets in commands.
When matches become alerts (thresholds, cooldown, grouping) is audit.alerts; the sample file and the
check of a file's own examples are audit.examples.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import ahocorasick
import re2

from ombot.tables import TableReader, read_toml
from ombot.errors import ConfigError
from ombot.globs import matches_any

SEVERITIES = ("info", "warning", "critical")
DEFAULT_DEDUPE = "{rule}:{host}"
DEDUPE_FIELDS = frozenset({"rule", "severity", "host", "user", "idc", "exit_status"})
DEFAULT_COOLDOWN = 300
REGEX_MEMORY = 1 << 20  # per compiled pattern: past it RE2's DFA falls back to its NFA, still linear
SET_MEMORY = 64 << 20  # all regexes of a rules file in one RE2 set
SET_MAX_TEXT = 4096  # characters: longer commands are matched regex by regex (RuleSet._regex_hits)
MASK = "****"
EXAMPLE_FIELDS = ("command", "user", "host", "idc", "exit_status")
# A Slack channel id (C.../G...), never a name: names change and can be reused.
CHANNEL_ID = re2.compile(r"^[CG][A-Z0-9]{2,}$")


@dataclass(frozen=True)
class Threshold:
    """Alert only when `count` matches with one dedupe key fall within `window_seconds`."""

    count: int = 1
    window_seconds: int = 0


@dataclass(frozen=True)
class Rule:
    """One alert rule of the rules file: what a command must contain, whose and where, and where
    and how often the alert goes."""

    name: str
    keywords: tuple[str, ...]
    regexes: tuple[Any, ...]  # compiled re2 patterns
    case_sensitive: bool
    users: tuple[str, ...]
    hosts: tuple[str, ...]
    idcs: tuple[str, ...]
    exit_status: tuple[int, ...] | str | None  # ints, "nonzero", or None for any
    severity: str
    channel: str | None
    dedupe: str
    cooldown_seconds: int
    threshold: Threshold
    examples_match: tuple[str | dict[str, Any], ...] = ()
    examples_no_match: tuple[str | dict[str, Any], ...] = ()

    def fields_match(self, event: Mapping[str, Any]) -> bool:
        return (matches_any(str(event["user"]), self.users) and matches_any(str(event["host"]), self.hosts)
                and matches_any(str(event["idc"]), self.idcs) and self._exit_matches(event["exit_status"]))

    def _exit_matches(self, status: int | None) -> bool:
        if self.exit_status is None:
            return True
        if self.exit_status == "nonzero":
            return status is not None and status != 0
        return status in self.exit_status

    def regexes_match(self, command: str) -> bool:
        return not self.regexes or any(r.search(command) for r in self.regexes)


@dataclass(frozen=True)
class Match:
    """One rule that an event matched, and what its alert needs."""

    rule: str
    severity: str
    channel: str | None
    dedupe_key: str
    cooldown_seconds: int
    threshold: Threshold


class RuleSet:
    """The rules of one file, with their keywords in one automaton."""

    def __init__(self, rules: Sequence[Rule], redact_patterns: Sequence[str] = (), path: Path | None = None) -> None:
        self.rules = tuple(rules)
        self.redact_patterns = tuple(redact_patterns)
        self.path = path
        self._automaton = _automaton(self.rules)
        self._regex_set, self._regex_owner = _regex_set(self.rules)
        self._regex_only = frozenset(i for i, rule in enumerate(self.rules) if rule.regexes and not rule.keywords)

    def match(self, event: Mapping[str, Any]) -> list[Match]:
        """Every rule the event matches, in file order. The event has at least command, user, host,
        idc, exit_status (int or None) and at (epoch ms)."""
        found = []
        for index in self._candidates(str(event["command"])):
            rule = self.rules[index]
            if rule.fields_match(event):
                found.append(Match(rule.name, rule.severity, rule.channel, _dedupe_key(rule, event),
                                   rule.cooldown_seconds, rule.threshold))
        return found

    def command_matches(self, command: str) -> list[str]:
        """The names of the rules whose keywords and regexes match the command, fields not asked."""
        return [self.rules[i].name for i in self._candidates(command)]

    def redact(self, text: str) -> str:
        return redact(text, self.redact_patterns)

    def _candidates(self, command: str) -> list[int]:
        """Rules whose keywords (if any) and regexes (if any) match: one keyword pass and one regex
        pass, then work only on the rules those name, whatever the number of rules."""
        regex_hits = self._regex_hits(command)
        found = {i for i in self._keyword_hits(command) if not self.rules[i].regexes or i in regex_hits}
        found.update(regex_hits & self._regex_only)  # every rule has keywords or regexes (load checks)
        return sorted(found)

    def _regex_hits(self, command: str) -> set[int]:
        """Rules with a regex that matches. Long commands are searched rule by rule: a set's DFA may
        give up on a long adversarial text, and a regex that silently fails to match is an evasion."""
        if self._regex_set is None:
            return set()
        if len(command) > SET_MAX_TEXT:
            return {i for i in set(self._regex_owner) if self.rules[i].regexes_match(command)}
        return {self._regex_owner[k] for k in self._regex_set.Match(command) or ()}

    def _keyword_hits(self, command: str) -> set[int]:
        """Rules with at least one keyword in the command: one pass over it, whatever the number of rules."""
        if self._automaton is None:
            return set()
        folded = _fold(command)
        hits: set[int] = set()
        for end, entries in self._automaton.iter(folded):
            for index, keyword, case_sensitive in entries:
                if index in hits:
                    continue
                # Case-sensitive keywords share the folded automaton; the original text confirms the case.
                if not case_sensitive or command[end - len(keyword) + 1:end + 1] == keyword:
                    hits.add(index)
        return hits


def _fold(text: str) -> str:
    """Lower case with every character kept at its index (a few characters lower to two)."""
    if text.isascii():
        return text.lower()
    return "".join(low if len(low := c.lower()) == 1 else c for c in text)


def _automaton(rules: Sequence[Rule]) -> Any:
    entries: dict[str, list[tuple[int, str, bool]]] = {}
    for index, rule in enumerate(rules):
        for keyword in rule.keywords:
            entries.setdefault(_fold(keyword), []).append((index, keyword, rule.case_sensitive))
    if not entries:
        return None  # an empty automaton cannot be searched
    automaton = ahocorasick.Automaton()
    for folded, value in entries.items():
        automaton.add_word(folded, value)
    automaton.make_automaton()
    return automaton


def _regex_set(rules: Sequence[Rule]) -> tuple[Any, list[int]]:
    """All rules' regexes in one RE2 set (each already compiled alone at load, so each is valid), and
    which rule each belongs to."""
    owner: list[int] = []
    options = re2.Options()
    options.log_errors = False
    options.never_capture = True
    options.max_mem = SET_MEMORY
    regex_set = re2.Set.SearchSet(options)
    for index, rule in enumerate(rules):
        for regex in rule.regexes:
            regex_set.Add(regex.pattern if rule.case_sensitive else f"(?i:{regex.pattern})")
            owner.append(index)
    if not owner:
        return None, owner
    regex_set.Compile()
    return regex_set, owner


def _dedupe_key(rule: Rule, event: Mapping[str, Any]) -> str:
    values = {name: event.get(name, "") for name in DEDUPE_FIELDS}
    values.update(rule=rule.name, severity=rule.severity)
    return rule.dedupe.format(**{k: "" if v is None else str(v) for k, v in values.items()})


# --- redaction ----------------------------------------------------------------------------------

_VALUE = r"""('[^']*'|"[^"]*"|[^\s'"]+)"""
# Each pattern's first group is the secret; a pattern without groups is hidden whole.
BUILTIN_REDACTIONS = (
    r"(?:^|\s)-p" + _VALUE,                                  # mysql -pSECRET
    r"(?i)--pass(?:word|wd)?(?:=|\s+)" + _VALUE,             # --password=S, --password S, --passwd S
    r"(?i)(?:^|[^a-z])(?:pass|password|passwd|pwd)\s*[=:]\s*" + _VALUE,  # password=S, DB_PASSWORD=S, passwd: S
    r"\bxox[abposr]-[A-Za-z0-9-]+",                          # Slack tokens
    r"\bxapp-[A-Za-z0-9-]+",                                 # Slack app-level tokens
    r"(?i)authorization:\s*(?:bearer|basic|token)\s+([^\s'\"]+)",
)


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """The text with secrets replaced by ****: the built-in kinds, then each extra RE2 pattern."""
    for pattern in (*BUILTIN_REDACTIONS, *extra):
        text = _redaction(pattern).sub(_mask, text)
    return text


@lru_cache(maxsize=256)
def _redaction(pattern: str) -> Any:
    return _compile(pattern, case_sensitive=True, capture=True)


def _mask(m: Any) -> str:
    whole = m.group(0)
    if m.re.groups == 0 or m.start(1) < 0:
        return MASK if m.re.groups == 0 else whole
    start, end = m.start(1) - m.start(0), m.end(1) - m.start(0)
    return whole[:start] + MASK + whole[end:]


def _compile(pattern: str, case_sensitive: bool, capture: bool = False) -> Any:
    options = re2.Options()
    options.log_errors = False  # re2 would write every refused pattern to stderr
    options.never_capture = not capture  # matching only: lets RE2 use its DFA throughout
    options.case_sensitive = case_sensitive
    options.max_mem = REGEX_MEMORY
    return re2.compile(pattern, options)


# --- loading ------------------------------------------------------------------------------------


def load_rules(path: Path) -> RuleSet:
    return parse_rules(path, read_toml(path, "an existing audit rules file"))


def parse_rules(path: Path, raw: dict[str, Any]) -> RuleSet:
    top = TableReader(path, raw, "")
    default_channel = _channel(top, None)
    redaction = top.sub("redact")
    patterns = redaction.strings("patterns", ())
    for i, pattern in enumerate(patterns):
        _checked_regex(redaction, f"patterns[{i}]", pattern, True, capture=True)
    redaction.done()
    rules_raw = top.get("rules", list, [], what="an array of [[rules]] tables")
    rules = [_rule(TableReader(path, r, f"rules[{i}]"), i, default_channel) for i, r in enumerate(rules_raw)]
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ConfigError(path, "rules", f"unique rule names; {rule.name!r} is used twice")
        seen.add(rule.name)
    top.done()
    return RuleSet(rules, patterns, path)


def _rule(r: TableReader, index: int, default_channel: str | None) -> Rule:
    name = r.get("name", str, what="a rule name")
    if not name.strip():
        raise ConfigError(r.path, r.key("name"), "a rule name", name)
    r.prefix = f"{r.prefix} ({name!r})"  # errors name the rule, not only its place in the file
    case_sensitive = r.get("case_sensitive", bool, False)
    keywords = r.strings("keywords", ())
    if any(not k for k in keywords):
        raise ConfigError(r.path, r.key("keywords"), "non-empty keywords", list(keywords))
    regexes = tuple(_checked_regex(r, f"regexes[{i}]", p, case_sensitive)
                    for i, p in enumerate(r.strings("regexes", ())))
    if not keywords and not regexes:
        raise ConfigError(r.path, r.key("keywords"), "at least one keyword or regex (a rule must say what it matches)")
    severity = r.get("severity", str, "warning")
    if severity not in SEVERITIES:
        raise ConfigError(r.path, r.key("severity"), f"one of {', '.join(SEVERITIES)}", severity)
    examples = r.sub("examples")
    rule = Rule(
        name=name, keywords=keywords, regexes=regexes, case_sensitive=case_sensitive,
        users=_globs(r, "users"), hosts=_globs(r, "hosts"), idcs=_globs(r, "idcs"),
        exit_status=_exit_status(r), severity=severity, channel=_channel(r, default_channel),
        dedupe=_dedupe(r), cooldown_seconds=_seconds(r, "cooldown_seconds", DEFAULT_COOLDOWN),
        threshold=_threshold(r.sub("threshold")) if "threshold" in r.table else Threshold(),
        examples_match=_examples(examples, "match"), examples_no_match=_examples(examples, "no_match"),
    )
    examples.done()
    r.done()  # a misspelt `host` must not silently widen the rule to every host
    return rule


def _checked_regex(r: TableReader, key: str, pattern: str, case_sensitive: bool, capture: bool = False) -> Any:
    try:
        return _compile(pattern, case_sensitive, capture)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ConfigError(r.path, r.key(key), f"a regex RE2 can run in linear time ({reason}; RE2 has no "
                                              "backreferences or lookarounds)", pattern) from None
    except UnicodeEncodeError:
        raise ConfigError(r.path, r.key(key), "valid Unicode text", pattern) from None


def _globs(r: TableReader, key: str) -> tuple[str, ...]:
    globs = r.strings(key, ("*",))
    if not globs:
        raise ConfigError(r.path, r.key(key), "at least one glob (leave the key out to match everything)", [])
    return globs


def _exit_status(r: TableReader) -> tuple[int, ...] | str | None:
    value = r.get("exit_status", (list, str), None, what='"nonzero" or a list of exit statuses')
    if value is None or value == "nonzero":
        return value
    if isinstance(value, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(r.path, r.key("exit_status"), '"nonzero" or a list of exit statuses', value)
    return tuple(value)


def _channel(r: TableReader, default: str | None) -> str | None:
    channel = r.get("channel", str, default)
    if channel is not None and not CHANNEL_ID.match(channel):
        raise ConfigError(r.path, r.key("channel"), "a Slack channel id (C..., G...), not a channel name", channel)
    return channel


def _dedupe(r: TableReader) -> str:
    template = r.get("dedupe", str, DEFAULT_DEDUPE)
    try:
        fields = {f for _, f, spec, conv in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ConfigError(r.path, r.key("dedupe"), f"a template like {DEFAULT_DEDUPE!r} ({exc})", template) from None
    unknown = fields - DEDUPE_FIELDS
    if unknown:
        raise ConfigError(r.path, r.key("dedupe"), f"fields among {{{'}, {'.join(sorted(DEDUPE_FIELDS))}}}", template)
    return template


def _seconds(r: TableReader, key: str, default: int) -> int:
    value = r.get(key, int, default)
    if not 0 <= value <= 7 * 86400:
        raise ConfigError(r.path, r.key(key), "0 to 604800 seconds", value)
    return int(value)


def _threshold(t: TableReader) -> Threshold:
    count = t.get("count", int)
    if not 1 <= count <= 10_000:
        raise ConfigError(t.path, t.key("count"), "1 to 10000 matches", count)
    window = _seconds(t, "window_seconds", 0)
    if count > 1 and window == 0:
        raise ConfigError(t.path, t.key("window_seconds"), "a window of at least 1 second for a count over 1", 0)
    t.done()
    return Threshold(count, window)


def _examples(e: TableReader, key: str) -> tuple[str | dict[str, Any], ...]:
    values = e.get(key, list, [], what="a list of commands or event tables")
    for i, value in enumerate(values):
        if isinstance(value, dict):
            ex = TableReader(e.path, value, f"{e.key(key)}[{i}]")
            ex.get("command", str)
            for name in ("user", "host", "idc"):
                ex.get(name, str, "")
            ex.get("exit_status", int, None)
            ex.done()
        elif not isinstance(value, str):
            raise ConfigError(e.path, f"{e.key(key)}[{i}]", "a command or an event table", value)
    return tuple(values)
