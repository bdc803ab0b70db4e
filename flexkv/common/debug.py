"""``flexkv.common.debug``: the original FlexKV's logger name (``flexkv_logger``), FlexKV's ``flexkv`` logger."""

import logging

flexkv_logger = logging.getLogger("flexkv")

__all__ = ["flexkv_logger"]
