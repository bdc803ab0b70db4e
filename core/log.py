"""FlexKV's log: the "flexkv" logger, shown on stderr at FLEXKV_LOG_LEVEL (default INFO) once an engine
adapter or the CLI asks for it, unless the application configured that logger itself."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("flexkv")


def setup_logging() -> logging.Logger:
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s flexkv[%(process)d]: %(message)s"))
        logger.addHandler(handler)
        level = os.environ.get("FLEXKV_LOG_LEVEL", "INFO").upper()
        logger.setLevel(level if isinstance(logging.getLevelName(level), int) else "INFO")
        logger.propagate = False
    return logger
