"""A synthetic multi-turn chat workload, seeded and reproducible.

Conversations start from one of a few shared system prompts; every turn sends
the whole history plus a new user message, and the answer joins the history.
Many conversations are open at once and their turns interleave, so the set of
prefixes worth keeping grows larger than a small cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChatWorkloadSpec:
    conversations: int = 400
    turns: int = 6
    concurrency: int = 160         # conversations open at once
    system_prompts: int = 8
    system_prompt_tokens: int = 1024
    user_tokens: tuple[int, int] = (64, 384)     # uniform range per message
    answer_tokens: tuple[int, int] = (128, 512)
    vocab_size: int = 32000
    seed: int = 0

    @property
    def num_requests(self) -> int:
        return self.conversations * self.turns


@dataclass(frozen=True)
class ChatRequest:
    conversation: int
    turn: int
    token_ids: np.ndarray  # the prompt: the whole history and the new user message
    answer_ids: np.ndarray  # what the model answers; the engine caches prompt and answer together


def chat_requests(spec: ChatWorkloadSpec) -> Iterator[ChatRequest]:
    """Yields every turn of every conversation, interleaved across the open conversations."""
    rng = np.random.default_rng(spec.seed)
    systems = [rng.integers(0, spec.vocab_size, spec.system_prompt_tokens, dtype=np.int64)
               for _ in range(spec.system_prompts)]
    histories: dict[int, np.ndarray] = {}
    turns_done: dict[int, int] = {}
    next_conversation = 0
    while histories or next_conversation < spec.conversations:
        while len(histories) < spec.concurrency and next_conversation < spec.conversations:
            histories[next_conversation] = systems[int(rng.integers(spec.system_prompts))]
            turns_done[next_conversation] = 0
            next_conversation += 1
        open_ids = list(histories)
        conv = open_ids[int(rng.integers(len(open_ids)))]
        user = rng.integers(0, spec.vocab_size, int(rng.integers(*spec.user_tokens)), dtype=np.int64)
        prompt = np.concatenate([histories[conv], user])
        answer = rng.integers(0, spec.vocab_size, int(rng.integers(*spec.answer_tokens)), dtype=np.int64)
        yield ChatRequest(conv, turns_done[conv], prompt, answer)
        turns_done[conv] += 1
        if turns_done[conv] == spec.turns:
            del histories[conv], turns_done[conv]
        else:
            histories[conv] = np.concatenate([prompt, answer])
