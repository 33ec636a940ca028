"""The ids that tie one piece of work's log lines together (docs/logging.md, "How the ids tie together").

A chat command, console command, schedule firing or button click gets a request id (`rid`); the
approval it opens keeps it, the envelope carries it to the master (its "rid" field), and the master
logs it with the job and each host. The ids live in a context variable, so a log call anywhere
below a `scope` gets them without passing them by hand; ombot.logs puts them on every record.

Threads do not inherit a context variable: work handed to a pool carries its ids with
`contextvars.copy_context().run`, or opens its own `scope`. Stdlib only: the agent ships it too.
"""

from __future__ import annotations

import contextvars
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Union

# The ids a log line may carry, in the order the text format shows them: the request, the Slack
# user it acts for, the approval request's number, the job id, the host, the IDC, the master.
FIELDS = ("rid", "user", "approval", "job", "host", "idc", "master")
RID_LENGTH = 12  # 60 random bits: unique enough to grep for, short enough to read
_RID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # base32 in lower case: within the envelope's rid form

Id = Union[str, int]
_EMPTY: Mapping[str, Id] = MappingProxyType({})
_scope: contextvars.ContextVar[Mapping[str, Id]] = contextvars.ContextVar("ombot_log_ids", default=_EMPTY)
_process: dict[str, Id] = {}  # ids of the whole process (a master's own id and IDC)


def new_rid() -> str:
    return "".join(secrets.choice(_RID_ALPHABET) for _ in range(RID_LENGTH))


def rid() -> str:
    """The request id of the work under way, "" outside any."""
    return str(_scope.get().get("rid", ""))


def ids() -> dict[str, Id]:
    """Every id that applies here: the process's, then the innermost scope's."""
    return {**_process, **_scope.get()}


def process_ids() -> dict[str, Id]:
    return dict(_process)


def _given(found: Mapping[str, object]) -> dict[str, Id]:
    unknown = set(found) - set(FIELDS)
    if unknown:
        raise ValueError(f"not a log id: {', '.join(sorted(unknown))}")
    return {name: value if isinstance(value, int) else str(value)
            for name, value in found.items() if value is not None and value != ""}


@contextmanager
def scope(**found: object) -> Iterator[None]:
    """The ids given (None and "" skipped) for everything logged inside, on top of the outer ones."""
    token = _scope.set({**_scope.get(), **_given(found)})
    try:
        yield
    finally:
        _scope.reset(token)


def tie(**found: object) -> None:
    """Add ids to the innermost scope, for the rest of it (an approval number learnt halfway through
    a command). Outside any scope it does nothing: a pool thread's context outlives its tasks."""
    current = _scope.get()
    if current is not _EMPTY:
        _scope.set({**current, **_given(found)})


def for_process(**found: object) -> None:
    """Ids every line of this process carries (a master's `master` and `idc`)."""
    _process.update(_given(found))
