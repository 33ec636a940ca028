"""Stored time: UTC epoch milliseconds, an int (a 64-bit BIGINT column on every database).

Floats lose it (a REAL keeps 24 bits, a MariaDB FLOAT 6 significant digits) and seconds lose the
millisecond; one integer unit everywhere keeps every table comparable.
"""

from __future__ import annotations

import time

MS_PER_SECOND = 1000


def now_ms() -> int:
    """Now, in UTC epoch milliseconds."""
    return time.time_ns() // 1_000_000


def seconds(epoch_ms: int) -> float:
    """Epoch milliseconds as the epoch seconds time.gmtime() and datetime.fromtimestamp() take."""
    return epoch_ms / MS_PER_SECOND
