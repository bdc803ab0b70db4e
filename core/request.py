"""Task results as the engines' FlexKV hooks read them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


class KVResponseStatus(Enum):
    SUCCESS = "success"
    NOTFOUND = "not_found"
    UNREADY = "unready"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass
class KVResponse:
    """The outcome of one task: its status and, when it ran, the mask of tokens it moved."""

    status: KVResponseStatus
    task_id: int
    return_mask: np.ndarray | None = None
    error: str | None = None

    def get_mask(self) -> np.ndarray | None:
        return self.return_mask

    @property
    def ok(self) -> bool:
        return self.status is KVResponseStatus.SUCCESS
