"""FlexKV's log: the "flexkv" logger, shown on stderr at FLEXKV_LOG_LEVEL (default INFO) once an engine
adapter or the CLI asks for it, unless the application configured that logger itself.

Warnings and errors are rate-limited (``RateLimitFilter``): lines that differ only in their numbers (task
ids, request ids, counts) are one kind; past ``burst`` lines of a kind in ``window_s`` seconds the rest are
dropped and counted, and the next line of that kind after the window says how many were dropped. A dead
SSD or server then costs a few lines a minute, not one per request.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time

logger = logging.getLogger("flexkv")

_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")


class RateLimitFilter(logging.Filter):
    def __init__(self, burst: int = 5, window_s: float = 60.0, clock: object = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._kinds: dict[str, list[float | int]] = {}  # kind -> [window start, lines in it, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = _NUMBERS.sub("#", record.getMessage())[:160]
        now = self.clock()  # type: ignore[operator]
        with self._lock:
            state = self._kinds.get(kind)
            if state is None or now - state[0] >= self.window_s:
                dropped = int(state[2]) if state else 0
                self._kinds[kind] = [now, 1, 0]
                if len(self._kinds) > 1000:  # many one-off kinds: forget the oldest windows
                    for k in sorted(self._kinds, key=lambda k: self._kinds[k][0])[:500]:
                        del self._kinds[k]
                if dropped:
                    record.msg = f"{record.getMessage()} ({dropped} more like it in the last {self.window_s:g} s " \
                                 "were not logged)"
                    record.args = None
                return True
            if state[1] < self.burst:
                state[1] += 1
                return True
            state[2] += 1
            return False


def setup_logging() -> logging.Logger:
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s flexkv[%(process)d]: %(message)s"))
        logger.addHandler(handler)
        level = os.environ.get("FLEXKV_LOG_LEVEL", "INFO").upper()
        logger.setLevel(level if isinstance(logging.getLevelName(level), int) else "INFO")
        logger.propagate = False
    limit_failure_lines()
    return logger


def limit_failure_lines() -> None:
    """Puts a RateLimitFilter on the "flexkv" logger (once)."""
    if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
        logger.addFilter(RateLimitFilter())
