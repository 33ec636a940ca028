"""Log lines: UTC whatever the machine's zone, secrets redacted."""

import os
import subprocess
import sys
import time

from tests.support import REPO

_FORMAT_ONE_RECORD = """
import logging
from ombot.logs import RedactingFormatter
record = logging.LogRecord("x", logging.INFO, "p", 1, "token xoxb-123-abc", None, None)
record.created, record.msecs = 0.0, 0.0  # the epoch
print(RedactingFormatter("%(asctime)sZ %(message)s").format(record))
"""


def test_log_lines_are_in_utc_and_redacted_under_any_time_zone() -> None:
    env = {**os.environ, "TZ": "Asia/Tokyo"}  # UTC+9, no daylight saving
    out = subprocess.run([sys.executable, "-c", _FORMAT_ONE_RECORD], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1970-01-01 00:00:00,000Z token xox?-***"
    assert time.gmtime(0).tm_hour == 0  # the expectation itself is the epoch in UTC
