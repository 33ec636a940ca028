"""A channel's overflow summary: what did not fit the channel's alert queue (audit.queue), counted per
rule (its matches and the hosts they came from) and per notice text, in one message that joins the
queue once there is room, at least as a warning: it tells of a flood, so it does not wait behind one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ombot.audit.alerts import FIELD_LIMIT, SEVERITY_ICONS, AlertGroup, field_text
from ombot.message import Message, clip, escape, section

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}  # most severe posted first
OVERFLOW_SEVERITY = "warning"  # a summary's least rank: it tells of a flood, so it does not wait behind one
OVERFLOW_HOSTS = 3  # host names a summary shows per rule; the rest are counted
OVERFLOW_TRACKED = 1_000  # distinct hosts per rule, and notice texts, a summary remembers; past it, counts only
OVERFLOW_LINE = 800  # characters per line of a summary
OVERFLOW_BODY = 2_400  # characters of lines in its section (Slack: 3,000), the rest counted in one line


def rank(severity: str) -> int:
    """Where a severity queues: higher goes first; an unknown one as a warning."""
    return SEVERITY_RANK.get(severity, SEVERITY_RANK[OVERFLOW_SEVERITY])


@dataclass
class Spill:
    """What one rule lost to a channel's overflow: its matches, and the hosts they came from."""

    matches: int = 0
    hosts: dict[str, None] = field(default_factory=dict)  # first seen first, at most OVERFLOW_TRACKED
    untracked: bool = False  # and more hosts than those

    def add_host(self, host: str) -> None:
        if host not in self.hosts:
            if len(self.hosts) < OVERFLOW_TRACKED:
                self.hosts[host] = None
            else:
                self.untracked = True


@dataclass
class Overflow:
    """A channel's summary of what did not fit its queue: one message, queued once there is room, and
    filled until it is taken to be posted (what overflows later goes in the next one)."""

    rules: dict[tuple[str, str], Spill] = field(default_factory=dict)  # (rule, severity) -> what it lost
    notices: dict[tuple[str, str], int] = field(default_factory=dict)  # (first line, severity) -> how many
    other_notices: int = 0  # notices past OVERFLOW_TRACKED texts
    severity: str = OVERFLOW_SEVERITY  # where it queues: the highest severity it holds, at least OVERFLOW_SEVERITY
    attempts: int = 0

    def add_matches(self, group: AlertGroup, matches: int) -> None:
        spill = self.rules.setdefault((group.match.rule, group.match.severity), Spill())
        spill.matches += matches
        for event in (group.first, group.last):
            spill.add_host(str(event.get("host") or "?"))
        self._raise(group.match.severity)

    def add_notice(self, message: Message, severity: str) -> None:
        """A notice that did not fit: counted by its first line."""
        self._count_notice((message.text.split("\n", 1)[0], severity), 1)
        self._raise(severity)

    def merge(self, other: Overflow) -> None:
        """Another summary's content (one whose post failed and found no room when tried again)."""
        for key, spill in other.rules.items():
            mine = self.rules.setdefault(key, Spill())
            mine.matches += spill.matches
            for host in spill.hosts:
                mine.add_host(host)
            mine.untracked = mine.untracked or spill.untracked
        for key, count in other.notices.items():
            self._count_notice(key, count)
        self.other_notices += other.other_notices
        self._raise(other.severity)

    def matches(self) -> int:
        return sum(spill.matches for spill in self.rules.values())

    def notice_count(self) -> int:
        return sum(self.notices.values()) + self.other_notices

    def _count_notice(self, key: tuple[str, str], count: int) -> None:
        if key in self.notices or len(self.notices) < OVERFLOW_TRACKED:
            self.notices[key] = self.notices.get(key, 0) + count
        else:
            self.other_notices += count

    def _raise(self, severity: str) -> None:
        if rank(severity) > rank(self.severity):
            self.severity = severity


def overflow_message(summary: Overflow, queue: int) -> Message:
    """The summary as the channel shows it: per rule, how many matches on which hosts, and the notices,
    the most severe first; what does not fit its section is counted in its last line."""
    lines: list[tuple[int, int, str, str, int, int]] = []  # (rank, count, mrkdwn, plain text, matches, notices)
    for (rule, severity), spill in summary.rules.items():
        what = f"{_more(spill.matches, 'match')} of rule"
        lines.append((rank(severity), spill.matches,
                      f"\u2026 and {what} *{field_text(rule)}* ({field_text(severity)}) on {_hosts(spill, True)}",
                      f"{what} {clip(rule, FIELD_LIMIT)} ({severity}) on {_hosts(spill, False)}", spill.matches, 0))
    for (text, severity), count in summary.notices.items():
        what = _more(count, "notice")
        text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")  # escaped once below, not twice
        lines.append((rank(severity), count, f"\u2026 and {what}: {field_text(text)}",
                      f"{what}: {clip(text, FIELD_LIMIT)}", 0, count))
    if summary.other_notices:
        lines.append((-1, 0, f"\u2026 and {_more(summary.other_notices, 'notice')}",
                      _more(summary.other_notices, "notice"), 0, summary.other_notices))
    lines.sort(key=lambda line: (-line[0], -line[1]))
    body: list[str] = []
    plain: list[str] = []
    size = 0
    for n, (_, _, markup, text, _, _) in enumerate(lines):
        markup = clip(markup, OVERFLOW_LINE)
        if size + len(markup) > OVERFLOW_BODY:
            rest = lines[n:]
            matches, notices = sum(line[4] for line in rest), sum(line[5] for line in rest)
            rules = sum(1 for line in rest if line[4])
            counted = [f"{_more(matches, 'match')} of {rules} other rule{'' if rules == 1 else 's'}"] if matches else []
            counted += [_more(notices, "notice")] if notices else []
            body.append(f"\u2026 and {' and '.join(counted)}")
            plain.append(" and ".join(counted))
            break
        body.append(markup)
        plain.append(text)
        size += len(markup) + 1
    icon = SEVERITY_ICONS.get(summary.severity, "")
    headline = (f"{icon} *audit alerts overflowed this channel's queue* (at most {queue} wait to be posted, "
                f"the most severe first)")
    tail = "were not posted one by one; search them with `/om audit`."
    text = f"[audit overflow] {'; '.join(plain)} were not posted one by one; search them with /om audit"
    return Message(clip(escape(text), 3000), [section(headline), section("\n".join(body) + "\n" + tail)])


def _more(count: int, noun: str) -> str:
    return f"{count} more {noun if count == 1 else noun + ('es' if noun.endswith('ch') else 's')}"


def _hosts(spill: Spill, markup: bool) -> str:
    names = [f"`{field_text(host)}`" if markup else clip(host, FIELD_LIMIT) for host in list(spill.hosts)[:OVERFLOW_HOSTS]]
    rest = len(spill.hosts) - len(names)
    if rest or spill.untracked:
        more = f"{rest}{'+' if spill.untracked else ''} more host{'' if rest == 1 and not spill.untracked else 's'}"
        return ", ".join(names) + " and " + more
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
