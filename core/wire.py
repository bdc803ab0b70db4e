"""The messages between ``flexkv serve`` and its clients: typed msgspec structs in MessagePack, never pickle.

A request is one struct of ``Request`` (its ``op`` field names it); the server decodes it against that union,
so a message of any other shape is refused with a ``schema`` error before anything runs. A reply is ``Ok`` with
a value made of MessagePack types, or ``Err`` with the exception's kind and message, which the client raises
again as the same FlexKV exception. Arrays travel as little-endian bytes (token ids int64, block hashes and
seeds pairs of uint64).

On the socket a request is the frames ``[request id (8 bytes), body]`` from a ZeroMQ DEALER; the server's
ROUTER answers ``[request id, body]``, so a client drops a late answer to a request it gave up on.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from .errors import ConfigError, FlexKVError, LayoutError, TaskError

PROTOCOL = 1  # raised when a message changes meaning; a server refuses a client of another protocol


class Run(msgspec.Struct, frozen=True):
    """The blocks a request names: a namespace seed and the token ids, or the engine's block hashes."""

    seed: bytes  # 16 bytes: the namespace seed (two uint64)
    tokens: bytes  # int64 token ids
    hashes: bytes | None = None  # (n, 2) uint64 engine block hashes


class Hello(msgspec.Struct, tag="hello", tag_field="op"):
    protocol: int
    client: str  # the client's name in the server's log (host:pid and what it is)
    pid: int
    instance: int  # FlexKV's dp_client_id: the engine instance the client belongs to
    fingerprint: str  # the model's KV layout (ModelConfig.fingerprint)
    tokens_per_block: int
    block_bytes: int
    token: str = ""  # the shared token of a tcp:// server


class Heartbeat(msgspec.Struct, tag="heartbeat", tag_field="op"):
    session: str


class Bye(msgspec.Struct, tag="bye", tag_field="op"):
    session: str


class GetMatch(msgspec.Struct, tag="get_match", tag_field="op"):
    session: str
    run: Run
    first: int
    seq_len: int


class PutMatch(msgspec.Struct, tag="put_match", tag_field="op"):
    session: str
    run: Run
    first: int
    seq_len: int


class Lookup(msgspec.Struct, tag="lookup", tag_field="op"):
    session: str
    run: Run


class Prefetch(msgspec.Struct, tag="prefetch", tag_field="op"):
    session: str
    run: Run
    seq_len: int


class Invalidate(msgspec.Struct, tag="invalidate", tag_field="op"):
    session: str
    run: Run
    start: int


class TryTake(msgspec.Struct, tag="try_take", tag_field="op"):
    """The task's blocks if none is still coming up from SSD, else None (the task unchanged)."""

    session: str
    task: int


class Take(msgspec.Struct, tag="take", tag_field="op"):
    """The task's blocks now: blocks still coming up from SSD end it failed (the client's take timed out)."""

    session: str
    task: int


class Complete(msgspec.Struct, tag="complete", tag_field="op"):
    session: str
    task: int
    ok: bool
    error: str = ""


class Cancel(msgspec.Struct, tag="cancel", tag_field="op"):
    session: str
    tasks: list[int]


class Wait(msgspec.Struct, tag="wait", tag_field="op"):
    """Waits at most ``timeout`` s (the server caps it at its slice; the client waits in slices)."""

    session: str
    tasks: list[int]
    timeout: float
    completely: bool = False


class TryWait(msgspec.Struct, tag="try_wait", tag_field="op"):
    session: str
    tasks: list[int]


class Reset(msgspec.Struct, tag="reset", tag_field="op"):
    session: str


class Stats(msgspec.Struct, tag="stats", tag_field="op"):
    """The server's counters and sessions; needs no session (``flexkv stats``), the token on tcp://."""

    token: str = ""


class Target(msgspec.Struct, frozen=True):
    """One task's slot mapping (int64 bytes), or why the client found it malformed (the tasks then fail)."""

    slots: bytes = b""
    error: str = ""


class Launch(msgspec.Struct, tag="launch", tag_field="op"):
    """Starts the copies of matched tasks on the ranks of the session's engine instance."""

    session: str
    tasks: list[int]
    targets: list[Target]
    layerwise: bool = False
    counter_id: int = 0  # SGLang's layer-done counter of a layer-wise load, handed to the ranks


class RanksReady(msgspec.Struct, tag="ranks_ready", tag_field="op"):
    """How many ranks of the session's instance have registered their KV memory, of how many expected."""

    session: str


Request = (Hello | Heartbeat | Bye | GetMatch | PutMatch | Lookup | Prefetch | Invalidate | TryTake | Take | Complete
           | Cancel | Wait | TryWait | Reset | Stats | Launch | RanksReady)


class Ok(msgspec.Struct, tag="ok", tag_field="op"):
    value: Any = None


class Err(msgspec.Struct, tag="err", tag_field="op"):
    kind: str  # one of ERROR_KINDS, or "schema", "session", "auth", "internal"
    message: str


Reply = Ok | Err

# Exceptions that cross the wire as themselves; anything else arrives as a FlexKVError.
ERROR_KINDS: dict[str, type[FlexKVError]] = {
    "TaskError": TaskError, "ConfigError": ConfigError, "LayoutError": LayoutError, "FlexKVError": FlexKVError,
}


class ServerError(FlexKVError):
    """The server refused a request: ``kind`` says why (schema, session, auth, internal, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ServerUnavailable(FlexKVError):
    """The server did not answer within the client's bound, or the client is backing off after that."""


# ------------------------------------------------------------------------- ranks (gpu_register_port)
# A rank's agent registers its KV memory with the dispatcher of the process that owns the control plane, gets
# the CPU tier to map, and then receives the orders of its instance's launches, unasked, on the same socket.


class DescribeModel(msgspec.Struct, tag="describe_model", tag_field="op"):
    """The model a rank must register for: its config keys, tokens_per_block, block_bytes, fingerprint."""

    token: str = ""


class RegisterRank(msgspec.Struct, tag="register_rank", tag_field="op"):
    protocol: int
    client: str
    pid: int
    instance: int
    rank: int
    tp_size: int
    num_blocks: int  # engine blocks of the rank's KV memory (the same on every rank)
    fingerprint: str
    tokens_per_block: int
    block_bytes: int  # the host block (every rank's slices)
    token: str = ""
    replicated: bool = False  # MLA: every rank holds the whole block; one rank stores it, every rank loads it


class RankHeartbeat(msgspec.Struct, tag="rank_heartbeat", tag_field="op"):
    session: str


class RankDone(msgspec.Struct, tag="rank_done", tag_field="op"):
    """A rank copied its slice of an order (``error`` "") or could not. Not answered."""

    session: str
    job: int
    error: str = ""


class RankBye(msgspec.Struct, tag="rank_bye", tag_field="op"):
    session: str


RankRequest = DescribeModel | RegisterRank | RankHeartbeat | RankDone | RankBye


class Order(msgspec.Struct, tag="order", tag_field="op"):
    """To a rank, unasked: copy these blocks (int64 bytes) between its KV memory and the CPU tier."""

    job: int
    task: int
    load: bool
    layerwise: bool
    engine_blocks: bytes
    host_blocks: bytes
    counter: int = 0  # the launch's counter_id (a layer-wise load signals its layers on that counter)


RankInbound = Ok | Err | Order

_request_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_rank_request_decoder = msgspec.msgpack.Decoder(RankRequest)
_rank_inbound_decoder = msgspec.msgpack.Decoder(RankInbound)


def encode(message: msgspec.Struct) -> bytes:
    return _request_encoder.encode(message)


def decode_request(body: bytes) -> Any:
    """A request struct; msgspec.DecodeError / ValidationError for anything else."""
    return _request_decoder.decode(body)


def decode_reply(body: bytes) -> Ok | Err:
    return _reply_decoder.decode(body)


def decode_rank_request(body: bytes) -> Any:
    return _rank_request_decoder.decode(body)


def decode_rank_inbound(body: bytes) -> Ok | Err | Order:
    return _rank_inbound_decoder.decode(body)


def error_reply(exc: BaseException) -> Err:
    """The Err that carries an exception raised while serving a request."""
    for name, cls in ERROR_KINDS.items():
        if type(exc) is cls:
            return Err(name, str(exc))
    if isinstance(exc, ServerError):
        return Err(exc.kind, str(exc))
    if isinstance(exc, FlexKVError):
        return Err("FlexKVError", str(exc))
    return Err("internal", f"{type(exc).__name__}: {exc}")


def raise_error(err: Err) -> None:
    cls = ERROR_KINDS.get(err.kind)
    if cls is not None:
        raise cls(err.message)
    raise ServerError(err.kind, err.message)


# ------------------------------------------------------------------------------------------------- arrays

def run_message(seed: np.ndarray, tokens: np.ndarray, hashes: np.ndarray | None) -> Run:
    return Run(np.ascontiguousarray(seed, "<u8").tobytes(), np.ascontiguousarray(tokens, "<i8").tobytes(),
               None if hashes is None else np.ascontiguousarray(hashes, "<u8").tobytes())


def run_arrays(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(seed, tokens, hashes or None) of a Run, checked: a malformed one raises TaskError."""
    if len(run.seed) != 16:
        raise TaskError(f"run.seed must be 16 bytes, got {len(run.seed)}")
    if len(run.tokens) % 8:
        raise TaskError("run.tokens must be whole int64 values")
    seed = np.frombuffer(run.seed, "<u8").copy()
    tokens = np.frombuffer(run.tokens, "<i8").copy()
    if run.hashes is None:
        return seed, tokens, None
    if len(run.hashes) % 16:
        raise TaskError("run.hashes must be whole 16-byte block hashes")
    return seed, tokens, np.frombuffer(run.hashes, "<u8").reshape(-1, 2).copy()


def ids_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, "<i8").tobytes()


def ids_array(b: bytes) -> np.ndarray:
    return np.frombuffer(b, "<i8").copy()
