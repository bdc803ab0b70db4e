"""Plain helpers for tests that move KV bytes through FlexKV: the engine fake, the one way to build a
manager, and the small steps every test repeats; and the few the config-file tests share (at the end).
Fixtures over them live in tests/conftest.py; this module holds no fixture, so scripts that tests start
in a fresh process import it too.

Every block's data is handled as its bytes (a uint8 tensor): a load is checked byte for byte, so NaN
poison, and NaN patterns in the random data, compare as what they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from flexkv import CacheConfig, EngineLayout, KVCacheLayout, KVCacheLayoutType, KVManager, KVResponseStatus, ModelConfig
from flexkv.core.config_file import load_config

S = KVResponseStatus

# The small default model and cache every manager starts from; tests override single keys.
DEFAULT_MODEL = {"num_layers": 2, "num_kv_heads": 2, "head_size": 8, "dtype": "float16"}
DEFAULT_CACHE = {"tokens_per_block": 16, "num_cpu_blocks": 128}
DEFAULT_ENGINE_BLOCKS = 64
DEFAULT_SSD_BLOCKS = 64
POISON_BYTE = 0xA5

# The engine memory layouts the fake has: FlexKV's three KVCacheLayoutTypes (registered with a KVCacheLayout)
# and three that only block views describe (registered as EngineLayout.from_block_views).
ENUM_KINDS = ("layerfirst", "layerblock", "blockfirst")
VIEW_KINDS = ("vllm_cpu", "trtllm_pool", "sglang")
ENGINE_KINDS = ENUM_KINDS + VIEW_KINDS
# Kinds whose block bytes are FlexKV's host block layout [layer][k|v][token][head][dim]: a block stored from
# one loads into any other. (vLLM's CPU backend transposes K inside a block: its blocks are copied whole.)
HOST_ORDER_KINDS = tuple(k for k in ENGINE_KINDS if k != "vllm_cpu")

_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}
_CACHE_KEYS = {f.name for f in dataclasses.fields(CacheConfig)}
_MANAGER_KEYS = set(inspect.signature(KVManager.__init__).parameters) - {"self", "model_config", "cache_config"}


# --------------------------------------------------------------------------------------------- seeds


def seed_for(nodeid: str) -> int:
    """The seed of one test: FLEXKV_TEST_SEED when set (an int; "random" draws one per test), else a hash
    of the test's id, so every run of a test sees the same data unless asked otherwise."""
    env = os.environ.get("FLEXKV_TEST_SEED", "")
    if env == "random":
        return int.from_bytes(os.urandom(4), "little")
    if env:
        return int(env)
    return zlib.crc32(nodeid.encode())


# --------------------------------------------------------------------------------------------- tokens, slots


def random_tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 50_000, n, dtype=np.int64)


def slots(blocks: Sequence[int], tokens_per_block: int) -> np.ndarray:
    """The engine slots of whole engine blocks, in order."""
    blocks = np.asarray(blocks, dtype=np.int64).reshape(-1)
    return (blocks[:, None] * tokens_per_block + np.arange(tokens_per_block, dtype=np.int64)).reshape(-1)


def partial_slots(block: int, n: int, tokens_per_block: int, start: int = 0) -> np.ndarray:
    """The slots of ``n`` tokens of one engine block from token ``start`` on."""
    return int(block) * tokens_per_block + start + np.arange(n, dtype=np.int64)


def slots_for(mask: np.ndarray, engine_blocks: Sequence[int] | np.ndarray, tokens_per_block: int) -> np.ndarray:
    """Engine slots of the masked tokens when sequence block i lives in engine block engine_blocks[i]."""
    positions = np.flatnonzero(mask)
    blocks = np.asarray(list(engine_blocks), dtype=np.int64)[positions // tokens_per_block]
    return blocks * tokens_per_block + positions % tokens_per_block


# --------------------------------------------------------------------------------------------- the engine fake


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, flat (a copy)."""
    return t.contiguous().view(torch.uint8).reshape(-1).clone()


class FakeEngine:
    """An engine's paged KV memory: torch tensors (on the CPU unless ``device`` says otherwise) in one of
    ENGINE_KINDS.

    - ``layerfirst``: per layer [k|v, blocks, tokens, heads, dim] (vLLM's GPU layout)
    - ``layerblock``: per layer [blocks, k|v, tokens, heads, dim]
    - ``blockfirst``: one tensor [blocks, layers, k|v, tokens, heads, dim]
    - ``vllm_cpu``: per layer [blocks, heads, tokens, k|v * dim] (vLLM's CPU backend; block views)
    - ``trtllm_pool``: one tensor [blocks, layers, k|v, tokens * heads * dim] (TensorRT-LLM; block views)
    - ``sglang``: SGLang's token-indexed buffers [blocks * tokens, heads, dim], every layer's K, then every
      layer's V (MLA: one latent buffer per layer); block b is tokens b*T .. b*T+T-1 (block views)

    A block's data is its bytes in the order of its views, which is FlexKV's host block layout
    ([layer][k|v][token][head][dim] for every kind but vllm_cpu: HOST_ORDER_KINDS), so blocks compare across
    those kinds. New memory is poisoned. MLA has one latent instead of k and v.
    """

    def __init__(self, kind: str | KVCacheLayoutType, *, num_layers: int, num_blocks: int, tokens_per_block: int,
                 num_kv_heads: int, head_size: int, dtype: torch.dtype, gen: torch.Generator,
                 use_mla: bool = False, device: str = "cpu") -> None:
        kind = kind.value.lower() if isinstance(kind, KVCacheLayoutType) else kind
        if kind not in ENGINE_KINDS:
            raise ValueError(f"engine kind {kind!r}; use one of {ENGINE_KINDS}")
        self.kind, self.gen, self.dtype, self.device = kind, gen, dtype, device
        self.num_layers, self.num_blocks, self.tokens_per_block = num_layers, num_blocks, tokens_per_block
        L, B, T, H, D = num_layers, num_blocks, tokens_per_block, num_kv_heads, head_size
        kv = 1 if use_mla else 2
        self.kv_layout: KVCacheLayout | None = None
        if kind in ENUM_KINDS:
            self.kv_layout = KVCacheLayout(KVCacheLayoutType(kind.upper()), L, B, T, H, D, is_mla=use_mla)
        shapes = {
            "layerfirst": [(kv, B, T, H, D)] * L,
            "layerblock": [(B, kv, T, H, D)] * L,
            "blockfirst": [(B, L, kv, T, H, D)],
            "vllm_cpu": [(B, H, T, kv * D)] * L,
            "trtllm_pool": [(B, L, kv, T * H * D)],
            "sglang": [(B * T, H, D)] * (kv * L),
        }[kind]
        self.tensors = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
        self.block_bytes = sum(v.numel() * v.element_size() for v in self.views(0))
        self.poison()

    @property
    def kv_caches(self) -> list[torch.Tensor] | torch.Tensor:
        """What register_kv_caches takes with ``kv_layout``: a tensor per layer, or the one tensor."""
        return self.tensors[0] if self.kind == "blockfirst" else self.tensors

    def engine_layout(self) -> EngineLayout:
        if self.kv_layout is not None:
            return EngineLayout.from_kv_layout(self.kv_caches, self.kv_layout)
        if self.kind == "sglang":
            L, B = self.num_layers, self.num_blocks
            per_block = [t.view(B, -1) for t in self.tensors]
            order = list(range(L)) if len(per_block) == L else [i for layer in range(L) for i in (layer, L + layer)]
            return EngineLayout.from_block_views([per_block[i] for i in order], "sglang",
                                                 layers=[i % L for i in order])
        return EngineLayout.from_block_views(self.tensors, self.kind)

    def register(self, kv: KVManager) -> None:
        if self.kv_layout is not None:
            kv.register_kv_caches(self.kv_caches, self.kv_layout)
        else:
            kv.register_kv_caches(self.engine_layout())

    def views(self, b: int) -> list[torch.Tensor]:
        """Block b's memory, as views into the engine's tensors, in host block order."""
        if self.kind == "layerfirst":
            return [t[:, b] for t in self.tensors]
        if self.kind == "sglang":
            L, T = self.num_layers, self.tokens_per_block
            rows = [t[b * T:(b + 1) * T] for t in self.tensors]
            return rows if len(rows) == L else [rows[i] for layer in range(L) for i in (layer, L + layer)]
        return [t[b] for t in self.tensors]

    def read(self, b: int) -> torch.Tensor:
        """Block b's bytes (a copy, on the CPU)."""
        return torch.cat([as_bytes(v).cpu() for v in self.views(int(b))])

    def write(self, b: int, data: torch.Tensor) -> None:
        """Writes bytes (as read() returns them) into block b."""
        assert data.dtype == torch.uint8 and data.numel() == self.block_bytes, (data.dtype, data.numel())
        offset = 0
        for v in self.views(int(b)):
            n = v.numel() * v.element_size()
            v.copy_(data[offset:offset + n].view(self.dtype).view(v.shape).to(v.device))
            offset += n

    def random_block(self) -> torch.Tensor:
        """Fresh random bytes for one block (every bit pattern, NaNs included), from the seeded generator."""
        return torch.randint(0, 256, (self.block_bytes,), dtype=torch.uint8, generator=self.gen)

    def fill(self, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Writes fresh random data into engine blocks; returns each block's bytes."""
        out = []
        for b in blocks:
            data = self.random_block()
            self.write(b, data)
            out.append(data)
        return out

    def poison(self, blocks: Sequence[int] | None = None) -> None:
        """Fills blocks (every block when None) with NaN (float dtypes) or 0xA5 bytes."""
        if blocks is None:
            for t in self.tensors:
                self._poison_tensor(t)
            return
        for b in blocks:
            for v in self.views(int(b)):
                self._poison_tensor(v)

    def _poison_tensor(self, t: torch.Tensor) -> None:
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        else:
            t.view(torch.uint8).fill_(POISON_BYTE)

    def poison_bytes(self) -> torch.Tensor:
        """A poisoned block's bytes."""
        one = torch.empty(1, dtype=self.dtype)
        self._poison_tensor(one)
        return one.view(torch.uint8).repeat(self.block_bytes // one.element_size())

    def is_poisoned(self, b: int) -> bool:
        return torch.equal(self.read(b), self.poison_bytes())

    def assert_poisoned(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            assert self.is_poisoned(b), f"engine block {b} was written but should not have been"

    def assert_blocks(self, blocks: Sequence[int], expected: Sequence[torch.Tensor]) -> None:
        """Each engine block holds exactly the bytes expected of it."""
        blocks = [int(b) for b in blocks]
        assert len(blocks) == len(expected), (len(blocks), len(expected))
        for i, (b, data) in enumerate(zip(blocks, expected)):
            assert torch.equal(self.read(b), data), \
                f"engine block {b} (sequence block {i}) differs from the data stored for it"


# --------------------------------------------------------------------------------------------- managers


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(ModelConfig keys, CacheConfig keys, KVManager keywords) of keyword overrides; an unknown key is an error."""
    model: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    manager: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in _MODEL_KEYS:
            model[key] = value
        elif key in _CACHE_KEYS:
            cache[key] = value
        elif key in _MANAGER_KEYS:
            manager[key] = value
        else:
            raise TypeError(f"{key!r} is neither a ModelConfig nor a CacheConfig key nor a KVManager keyword")
    return model, cache, manager


def configs(config: str | Path | None = None, **overrides: Any) -> tuple[ModelConfig, CacheConfig]:
    """The default model and cache config (or those of a config file, as the engines load it) with keyword
    overrides of single keys (KVManager keywords are not allowed here)."""
    model, cache, manager = split_overrides(overrides)
    if manager:
        raise TypeError(f"{sorted(manager)} are KVManager keywords, not config keys")
    if config is None:
        return ModelConfig(**{**DEFAULT_MODEL, **model}), CacheConfig(**{**DEFAULT_CACHE, **cache})
    loaded = load_config(config)
    assert loaded.model_config is not None, f"{config} has no model_config"
    return dataclasses.replace(loaded.model_config, **model), dataclasses.replace(loaded.cache_config, **cache)


def engine_for(kv: KVManager, kind: str | KVCacheLayoutType = "layerfirst", *, num_blocks: int = DEFAULT_ENGINE_BLOCKS,
               gen: torch.Generator, device: str = "cpu") -> FakeEngine:
    """An engine fake shaped for the manager's model (not registered)."""
    m = kv.model_config
    return FakeEngine(kind, num_layers=m.num_layers, num_blocks=num_blocks, tokens_per_block=kv.tokens_per_block,
                      num_kv_heads=m.num_kv_heads, head_size=m.head_size, dtype=getattr(torch, m.dtype_name),
                      gen=gen, use_mla=m.use_mla, device=device)


def start_manager(*, seed: int, engine: str | KVCacheLayoutType = "layerfirst",
                  engine_blocks: int = DEFAULT_ENGINE_BLOCKS, register: bool = True, device: str = "cpu",
                  ssd_dirs: Sequence[str | Path] | None = None, config: str | Path | None = None,
                  model_config: ModelConfig | None = None, **overrides: Any) -> tuple[KVManager, FakeEngine]:
    """The one way tests build a manager: a started KVManager over the default model and cache config (or a
    config file's) with keyword overrides (ModelConfig and CacheConfig keys, KVManager keywords such as
    ``ssd_env``), and an engine fake of ``engine_blocks`` blocks on ``device``, registered unless
    ``register`` is False. ``ssd_dirs`` turns the SSD tier on (``num_ssd_blocks`` defaults to
    DEFAULT_SSD_BLOCKS). ``model_config`` replaces the model config whole (an engine's subclass of it)."""
    manager = {k: overrides.pop(k) for k in list(overrides) if k in _MANAGER_KEYS}
    if ssd_dirs is not None:
        overrides.setdefault("num_ssd_blocks", DEFAULT_SSD_BLOCKS)
        overrides.update(enable_ssd=True, ssd_cache_dir=";".join(str(d) for d in ssd_dirs))
    model, cache = configs(config, **overrides)
    if model_config is not None:
        if _MODEL_KEYS & set(overrides):
            raise TypeError("give model_config or single model keys, not both")
        model = model_config
    kv = KVManager(model, cache, **manager)
    kv.start()
    try:
        eng = engine_for(kv, engine, num_blocks=engine_blocks, gen=torch.Generator().manual_seed(seed), device=device)
        if register:
            eng.register(kv)
    except BaseException:
        kv.shutdown()
        raise
    return kv, eng


def assert_clean(kv: KVManager) -> None:
    """Every index of the manager's cache (CPU, and SSD when on) is consistent and holds no lock."""
    kv.control_plane.check_consistency()
    locked = kv.control_plane.locked_blocks()
    assert locked == (0, 0), f"blocks left locked (cpu, ssd): {locked}"


def store(kv: KVManager, tokens: np.ndarray, engine_blocks: Sequence[int], namespace: Any = None,
          completely: bool = False) -> np.ndarray:
    """put_match + launch + wait (``completely``: and the write-through to SSD); returns the put's mask."""
    task_id, mask = kv.put_match(tokens, namespace=namespace)
    kv.launch(task_id, slots_for(mask, engine_blocks, kv.tokens_per_block))
    response = kv.wait(task_id, completely=completely)[task_id]
    assert response.ok, response
    return mask


def load(kv: KVManager, tokens: np.ndarray, engine_blocks: Sequence[int], token_mask: Any = None,
         namespace: Any = None) -> np.ndarray:
    """get_match + launch + wait, which must succeed; returns the get's mask."""
    mask, response = try_load(kv, tokens, engine_blocks, token_mask, namespace)
    assert response.ok, response
    return mask


def try_load(kv: KVManager, tokens: np.ndarray, engine_blocks: Sequence[int], token_mask: Any = None,
             namespace: Any = None) -> tuple[np.ndarray, Any]:
    """get_match + launch + wait; returns (the get's mask, its KVResponse), whatever the outcome."""
    task_id, mask = kv.get_match(tokens, token_mask, namespace=namespace)
    kv.launch(task_id, slots_for(mask, engine_blocks, kv.tokens_per_block))
    return mask, kv.wait(task_id)[task_id]


def wait_one(kv: KVManager, tid: int, timeout: float = 20.0):
    """wait() for one task; it must report exactly that task. Returns its KVResponse."""
    res = kv.wait(tid, timeout=timeout)
    assert set(res) == {tid}
    return res[tid]


def hit_tokens(kv: KVManager, tokens: np.ndarray, namespace: Any = None) -> int:
    """How many tokens a get would load now (the get is cancelled: it locks nothing afterwards)."""
    task_id, mask = kv.get_match(tokens, namespace=namespace)
    kv.cancel(task_id)
    kv.wait(task_id)
    return int(mask.sum())


@contextlib.contextmanager
def gated(kv: KVManager) -> Iterator[SimpleNamespace]:
    """The test's clock for tasks in flight: holds the end of every task whose copy finishes until the test
    sets ``gate`` (the control plane's pause_completions), so a launched task stays observably running until
    then (its copy may finish; the control plane does not end the task)."""
    gate = threading.Event()
    kv.control_plane.pause_completions(True)
    opener = threading.Thread(target=lambda: gate.wait(30) and kv.control_plane.pause_completions(False))
    opener.start()
    try:
        yield SimpleNamespace(gate=gate)
    finally:
        gate.set()
        opener.join()
        kv.control_plane.pause_completions(False)


@dataclass
class KVEnv:
    """A started manager, its engine fake and the test's rng, with the steps tests repeat."""

    kv: KVManager
    eng: FakeEngine
    rng: np.random.Generator

    @property
    def tpb(self) -> int:
        return self.kv.tokens_per_block

    def tokens(self, n: int) -> np.ndarray:
        return random_tokens(self.rng, n)

    def slots(self, blocks: Sequence[int]) -> np.ndarray:
        return slots(blocks, self.tpb)

    def partial_slots(self, block: int, n: int, start: int = 0) -> np.ndarray:
        return partial_slots(block, n, self.tpb, start)

    def locked(self) -> int:
        """CPU blocks locked now."""
        return int(self.kv.control_plane.locked_blocks()[0])

    def lock_count(self, block_id: int) -> int:
        return int(self.kv.control_plane.cpu_block(block_id)[1])

    def is_ready(self, block_id: int) -> bool:
        return bool(self.kv.control_plane.cpu_block(block_id)[0])

    def host_ids(self, task_id: int) -> list[int]:
        return [int(i) for i in self.kv.control_plane.inspect(task_id)["host_ids"]]

    def cached(self) -> int:
        return int(self.kv.cache_stats()["cpu"]["num_cached"])

    def put(self, tokens: np.ndarray, src: Sequence[int], namespace: Any = None,
            completely: bool = False) -> list[torch.Tensor]:
        """Fills engine blocks ``src`` (one per whole block of ``tokens``) with fresh data and stores them; every
        whole block must be new. Returns the data of each whole block."""
        nblocks = len(tokens) // self.tpb
        assert len(src) == nblocks, (len(src), nblocks)
        data = self.eng.fill(src)
        mask = store(self.kv, tokens, src, namespace, completely)
        expected = np.zeros(len(tokens), dtype=bool)
        expected[: nblocks * self.tpb] = True
        np.testing.assert_array_equal(mask, expected)
        return data

    def get_and_check(self, tokens: np.ndarray, dst: Sequence[int], expected: Sequence[torch.Tensor],
                      namespace: Any = None) -> None:
        """get_match + launch into poisoned ``dst``: exactly the blocks of ``expected`` hit and load byte-exact,
        and the rest of ``dst`` stays poisoned."""
        self.eng.poison(dst)
        tid, mask = self.kv.get_match(tokens, namespace=namespace)
        want = np.zeros(len(tokens), dtype=bool)
        want[: len(expected) * self.tpb] = True
        np.testing.assert_array_equal(mask, want)
        self.kv.launch(tid, self.slots(dst[: len(expected)]))
        res = self.kv.wait(tid)[tid]
        assert res.status is S.SUCCESS, res
        np.testing.assert_array_equal(res.return_mask, want)
        self.eng.assert_blocks(dst[: len(expected)], expected)
        self.eng.assert_poisoned(dst[len(expected):])


REF_SRC = [0, 1, 2]        # engine blocks the reference sequence was stored from
REF_DST = [60, 61, 62]     # engine blocks it is loaded into by the health check


@dataclass
class RefKVEnv(KVEnv):
    """KVEnv with a reference sequence stored at start, which the health check loads byte-exact (the bad-input
    tests: conftest's ``make_env`` stores it and checks every manager still running at teardown)."""

    ref_tokens: np.ndarray | None = None
    ref_data: list[torch.Tensor] | None = None

    def failed(self) -> int:
        return int(self.kv.cache_stats()["tasks_failed"])

    def assert_healthy(self) -> None:
        """No lock left, index consistent, and the reference sequence still loads byte-exact."""
        assert self.locked() == 0, self.kv.cache_stats()["cpu"]
        self.kv.control_plane.check_consistency()
        if self.ref_tokens is not None:
            self.get_and_check(self.ref_tokens, REF_DST, self.ref_data)
            assert self.locked() == 0
            self.kv.control_plane.check_consistency()


# --------------------------------------------------------------------------------------------- config files


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "configs"  # the example config files
GiB = 1024**3
MiB = 1024**2
QWEN_BLOCK_16 = 64 * 2 * 8 * 128 * 2 * 16  # layers * k|v * heads * head_size * bf16 * tokens = 4 MiB

# The three JSON blocks of the manual's chapter 17, exactly as printed (17.1.2, 17.2.2, 17.4.2).
MANUAL_SINGLE_NODE = """{
    "server_recv_port": "ipc:///tmp/flexkv_test",
    "cache_config": {
        "enable_cpu": true,
        "enable_ssd": true,
        "enable_remote": false,
        "tokens_per_block": 16,
        "num_cpu_blocks": 50000,   // 约 400GB CPU 内存
        "num_ssd_blocks": 200000,  // 约 1.6TB SSD
        "ssd_cache_dir": "/data/flexkv_ssd/",
        "evict_ratio": 0.05,
        "use_ce_transfer_h2d": true,
        "use_ce_transfer_d2h": true,
        "transfer_sms_h2d": 8,
        "ssd_cache_iouring_entries": 512
    }
}
"""

MANUAL_DISTRIBUTED_WORKER = """{
    "server_recv_port": "ipc:///tmp/flexkv_${worker_id}_test",
    "cache_config": {
        "enable_cpu": true,
        "enable_ssd": true,
        "enable_remote": true,
        "tokens_per_block": 64,
        "num_cpu_blocks": 200000,
        "num_ssd_blocks": 2000000,
        "num_remote_blocks": 20000000,
        "ssd_cache_dir": "/data/flexkv_ssd/",
        "remote_cache_path": "s3://flexkv-cache/",
        "evict_ratio": 0.05,
        "remote_config_custom": {
            "endpoint": "s3.amazonaws.com",
            "bucket": "flexkv-cache"
        }
    }
}
"""

MANUAL_LARGE_SCALE = """{
    "cache_config": {
        "tokens_per_block": 64,        // 大 Block，减少传输
        "num_cpu_blocks": 500000,      // 大容量 CPU 缓存
        "num_ssd_blocks": 5000000,     // 大容量 SSD 缓存
        "evict_ratio": 0.0,            // 不淘汰
        "use_ce_transfer_h2d": true,   // 启用 Copy Engine
        "transfer_sms_h2d": 16,        // 增加 SM
        "ssd_cache_iouring_entries": 1024  // 大 I/O 队列
    }
}
"""

MANUAL_BLOCKS = {
    "single_node.json": MANUAL_SINGLE_NODE,
    "distributed_worker.json": MANUAL_DISTRIBUTED_WORKER,
    "large_scale.json": MANUAL_LARGE_SCALE,
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    """Writes a config file ``name`` with ``text`` under tmp_path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_json(tmp_path: Path, data: object, name: str = "c.json") -> Path:
    return write(tmp_path, name, json.dumps(data))


def free_tcp_ports(n: int) -> list[int]:
    """n distinct TCP ports of 127.0.0.1 that nothing listens on now.

    They are drawn below the kernel's ephemeral range: a port the kernel may hand out (as any outgoing
    connection's source port) can be taken between this check and the server's bind, which fails it with
    "Address already in use"."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = 10000 if low > 12000 else 1024
    rng = random.Random()  # not the tests' seeded RNG: concurrent runs must not draw the same ports
    held: list[socket.socket] = []
    try:
        while len(held) < n:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", rng.randrange(first, low)))
            except OSError:
                s.close()
                continue
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def free_tcp_port() -> int:
    """A TCP port nothing listens on now (see free_tcp_ports)."""
    return free_tcp_ports(1)[0]
