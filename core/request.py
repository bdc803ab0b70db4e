"""Task results as the engines' FlexKV hooks read them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

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
    return_mask: np.ndarray | list[np.ndarray] | None = None  # a list for a batch (launch(..., as_batch=True))
    error: str | None = None

    def get_mask(self, idx: int | None = None) -> Any:
        """The mask; ``get_mask(i)``: task i's mask of a batch, as a torch tensor (the original FlexKV's call)."""
        if idx is None:
            return self.return_mask
        if not isinstance(self.return_mask, list):
            raise TypeError("get_mask(idx) reads one task's mask of a batch response; this response is not a batch")
        import torch

        return torch.from_numpy(self.return_mask[idx])

    @property
    def ok(self) -> bool:
        return self.status is KVResponseStatus.SUCCESS
