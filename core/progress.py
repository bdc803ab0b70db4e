"""Progress lines for long operations a user would otherwise watch in silence (a remote index rebuilt from
its bucket; the SSD tier's warm restart logs its own from the core, at the same interval).

``FLEXKV_PROGRESS_INTERVAL_S`` (default 2 s; 0: at every step) bounds how often a line is logged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from .errors import ConfigError

logger = logging.getLogger("flexkv")

PROGRESS_ENV = "FLEXKV_PROGRESS_INTERVAL_S"


def progress_interval_s(env: Mapping[str, str] | None = None) -> float:
    """The least seconds between two progress lines of a long operation: ``FLEXKV_PROGRESS_INTERVAL_S``,
    default 2; 0 logs at every step. A ConfigError names the variable when it is not a number >= 0."""
    text = (os.environ if env is None else env).get(PROGRESS_ENV, "").strip()
    if not text:
        return 2.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"environment variable {PROGRESS_ENV}={text!r} is not a number of seconds >= 0; unset it "
                          "(2 s) or give e.g. 0.5", PROGRESS_ENV)
    return value


class Progress:
    """Logs ``"<what>: <done> <unit>[/<total> (<pct>)], <found> <found_unit>, <rate> <unit>/s[, ETA <s>]"``
    at INFO when ``step`` is called at least ``interval_s`` after the previous line (or the start)."""

    def __init__(self, what: str, unit: str, found_unit: str, total: int | None = None,
                 interval_s: float | None = None) -> None:
        self.what, self.unit, self.found_unit, self.total = what, unit, found_unit, total
        self.interval_s = progress_interval_s() if interval_s is None else interval_s
        self.start = self._last = time.monotonic()
        self.lines = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def step(self, done: int, found: int) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        rate = done / (now - self.start) if now > self.start else 0.0
        of = f"/{self.total} ({100.0 * done / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {(self.total - done) / rate:.1f} s" if self.total and rate > 0 else ""
        logger.info("%s: %d %s%s, %d %s, %.0f %s/s%s", self.what, done, self.unit, of, found, self.found_unit, rate,
                    self.unit.split()[0], eta)
        self.lines += 1


__all__ = ["PROGRESS_ENV", "Progress", "progress_interval_s"]
