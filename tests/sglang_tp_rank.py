"""One tensor-parallel rank of SGLang 0.5.23 with ``--enable-flexkv --tp-size 2``, on CPU tensors. Run by
tests/test_sglang_tp.py, one process per rank:

    python tests/sglang_tp_rank.py <workdir> <rank> <seed>

Each rank builds SGLang's own ``FlexKVRadixCache`` (its ``FlexKVConnector`` and ``FlexKVComm`` over a gloo
group of the two processes, as SGLang's scheduler does); rank 0's connector starts FlexKV's ``KVManager``,
and every rank registers its KV pool through ``KVTPClient(gpu_register_port)``. Each rank's pool holds its
own half of the KV heads, filled with its own random bytes (``SEED rank<r> <seed>``). The ranks then run the
same SGLang calls in lockstep, as SGLang's ranks do, and each prints ``PASS <check> rank<r>`` or
``FAIL <check> rank<r>: <why>``:

- ``mp_round_trip``: a finished request's pages go out (checkpoint -> store), SGLang's tree and the pools
  are dropped and poisoned, and the next request's match_prefix + init_load_back bring every rank's own head
  slice back byte-exact; another prompt misses.
- ``layerwise_round_trip``: the same with ``FLEXKV_ENABLE_LAYERWISE_TRANSFER=1``: every rank hands its own
  eventfds to FlexKV's server in its own process, the load starts in match_prefix, and each rank's forward
  pass is released layer by layer by its own copy.
- ``killed_rank_fails_within_lease`` (rank 0): rank 1 is stopped, a load is launched on SGLang's KVManager,
  rank 1 is SIGKILLed with the order in flight; the task fails, naming rank 1, within the rank lease, and
  leaves no block locked. Rank 1 ends killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from array import array
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a stand-in: never look it up
sys.path.insert(0, str(HERE / "sglang_standin"))  # torchvision: import-only stand-in (see its docstring)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sglang.srt.runtime_context import SpawnRanks, get_parallel  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.test.parallel_groups import publish  # noqa: E402

WORK, RANK, SEED = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
TP, PAGE, LAYERS, HEADS, HEAD_DIM = 2, 4, 3, 4, 8  # HEADS: the model's KV heads, HEADS // TP per rank
MLA_RANK, MLA_ROPE = 16, 8
LEASE_S = 2.0
POISON = 0xA5
SERVER_ARGS = ServerArgs(model_path="dummy", page_size=PAGE, enable_flexkv=True, tp_size=TP)
publish(SERVER_ARGS, role="scheduler", ranks=SpawnRanks(world_rank=RANK))

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from sglang.srt.mem_cache.storage.flexkv.flexkv_radix_cache import FlexKVRadixCache  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.test.mem_cache_utils import finish_req  # noqa: E402


class _CpuStream:
    """FlexKV's radix cache makes two CUDA streams and synchronizes one; a CPU build has none."""

    def synchronize(self) -> None:
        pass


def write_config() -> None:
    path = WORK / f"flexkv-rank{RANK}.json"  # the same settings on every rank, as SGLang's ranks read one file
    path.write_text(json.dumps({"server_recv_port": f"ipc://{WORK}/flexkv", "server_lease_seconds": LEASE_S,
                                "cache_config": {"tokens_per_block": PAGE, "num_cpu_blocks": 128}}))
    os.environ["FLEXKV_CONFIG_PATH"] = str(path)
    os.environ["FLEXKV_LAYERWISE_EVENTFD_SOCKET"] = str(WORK / "lw")


class Rank:
    """SGLang's FlexKVRadixCache of this rank over its own pools (HEADS // TP heads per layer; MLA: the whole
    latent, as every rank holds it)."""

    def __init__(self, mla: bool = False) -> None:
        group = dist.group.WORLD
        self.mla = mla
        if mla:
            self.kv = MLATokenToKVPool(size=64, page_size=PAGE, dtype=torch.bfloat16, kv_lora_rank=MLA_RANK,
                                       qk_rope_head_dim=MLA_ROPE, layer_num=LAYERS, device="cpu",
                                       enable_memory_saver=False)
        else:
            self.kv = MHATokenToKVPool(size=64, page_size=PAGE, dtype=torch.bfloat16, head_num=HEADS // TP,
                                       head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu", enable_memory_saver=False)
        self.alloc = PagedTokenToKVPoolAllocator(size=self.kv.size, page_size=PAGE, dtype=torch.bfloat16,
                                                 device="cpu", kvcache=self.kv, need_sort=False)
        self.r2t = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
        params = CacheInitParams(disable=False, req_to_token_pool=self.r2t, token_to_kv_pool_allocator=self.alloc,
                                 page_size=PAGE)
        if mla:
            model = SimpleNamespace(num_hidden_layers=LAYERS, attention_arch=SimpleNamespace(name="MLA"),
                                    kv_lora_rank=MLA_RANK, qk_rope_head_dim=MLA_ROPE, dtype=torch.bfloat16)
        else:
            model = SimpleNamespace(num_hidden_layers=LAYERS, head_dim=HEAD_DIM, num_key_value_heads=HEADS,
                                    get_num_kv_heads=lambda tp: HEADS // tp, dtype=torch.bfloat16)
        self.cache = FlexKVRadixCache(params=params, model_config=model, server_args=SERVER_ARGS, tp_rank=RANK,
                                      tp_size=TP, dp_rank=None, pp_rank=0, attn_cp_rank=0, tp_group=group,
                                      attn_tp_group=group)

    def buffers(self) -> list:
        return list(self.kv.kv_buffer) if self.mla else list(self.kv.k_buffer) + list(self.kv.v_buffer)

    def request(self, rid: str, tokens: list[int]):
        req = Req(rid=rid, origin_input_text="", origin_input_ids=array("q", tokens),
                  sampling_params=SamplingParams(temperature=0, max_new_tokens=1))
        self.r2t.alloc([req])
        return req

    def store(self, tokens: list[int], gen: torch.Generator) -> tuple[list, int]:
        """A finished request's KV (this rank's own random bytes) stored through SGLang's checkpoint."""
        req = self.request(f"store-{len(tokens)}", tokens)
        slots = self.alloc.alloc((len(tokens) + PAGE - 1) // PAGE * PAGE)[: len(tokens)]
        self.r2t.write((req.kv.req_pool_idx, slice(0, len(tokens))), slots)
        for buf in self.buffers():
            raw = buf[slots].view(torch.uint8)
            buf[slots] = torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen).view(buf.dtype)
        whole = len(tokens) // PAGE * PAGE
        ref = [buf[slots[:whole]].clone() for buf in self.buffers()]
        dist.barrier()  # the forward pass's all-reduce: every rank has written its KV before rank 0 stores it
        req.kv.kv_committed_len = len(tokens)
        finish_req(self.cache, req, up_to=len(tokens))  # rank 0: put_match + launch; the node stays locked
        self.wait_for_stores()
        self.cache.reset()  # SGLang drops its own tree; FlexKV keeps the pages
        for buf in self.buffers():
            buf.view(torch.uint8).fill_(POISON)
        dist.barrier()  # the test's poison is on every rank before rank 0 can launch a load into it
        self.alloc.clear()
        return ref, whole

    def wait_for_stores(self) -> None:
        """SGLang's scheduler tick on every rank (check_hicache_events scatters rank 0's completions) until
        rank 0 has no storing node locked."""
        deadline = time.monotonic() + 30
        while True:
            self.cache.check_hicache_events()
            left = [self.cache.protected_size()]
            dist.broadcast_object_list(left, src=0)
            if left[0] == 0:
                return
            assert time.monotonic() < deadline, "the store did not complete"
            time.sleep(0.01)

    def differs(self, slots, ref: list) -> list[str]:
        """The buffers whose loaded slots differ from this rank's stored bytes. Asserted by the caller after its
        last SGLang call: every rank must make the same collective calls, also when its own bytes are wrong."""
        out = []
        for i, (buf, want) in enumerate(zip(self.buffers(), ref)):
            got = buf[slots].view(torch.uint8)
            if not torch.equal(got, want.view(torch.uint8)):
                same = (got == want.view(torch.uint8)).float().mean().item()
                out.append(f"buffer {i} (layer {i % LAYERS}): {same:.0%} of bytes right, "
                           f"{(got == POISON).float().mean().item():.0%} poison")
        return out

    def close(self) -> None:
        """Every rank unregisters, then rank 0 stops its KVManager (SGLang's shutdown)."""
        self.cache.flexkv_connector.tp_client.close()
        dist.barrier()
        self.cache.shutdown()


def tokens_of(n: int, salt: int) -> list[int]:
    g = torch.Generator().manual_seed(SEED + salt)
    return torch.randint(1, 30000, (n,), generator=g).tolist()


def mp_round_trip(gen: torch.Generator) -> None:
    rank = Rank()
    try:
        tokens = tokens_of(4 * PAGE + 2, 0)  # 4 whole pages and a tail
        ref, whole = rank.store(tokens, gen)
        req = rank.request("load", tokens)
        res = rank.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)), req=req))
        assert res.device_prefix_len == 0 and res.host_hit_length == whole, (res.device_prefix_len,
                                                                             res.host_hit_length)
        n, node = rank.cache.init_load_back(InitLoadBackParams(best_match_node=res.best_match_node,
                                                               host_hit_length=res.host_hit_length, req=req))
        assert n == whole, n
        bad = rank.differs(node.value, ref)
        other = rank.request("other", tokens_of(4 * PAGE, 1))
        res = rank.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", other.origin_input_ids.tolist())),
                                                        req=other))
        assert res.host_hit_length == 0, res.host_hit_length
        assert not bad, f"this rank's loaded bytes differ: {bad}"
    finally:
        rank.close()


def mla_round_trip(gen: torch.Generator) -> None:
    """MLA: every rank holds the whole latent; rank 0's copy is stored and every rank loads it. The ranks
    here hold different bytes on purpose, so rank 1 must get rank 0's, not its own."""
    rank = Rank(mla=True)
    try:
        tokens = tokens_of(3 * PAGE + 2, 4)
        ref, whole = rank.store(tokens, gen)
        refs = [None] * TP
        dist.all_gather_object(refs, [r.view(torch.uint8).numpy().tobytes() for r in ref])
        req = rank.request("load", tokens)
        res = rank.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)), req=req))
        assert res.host_hit_length == whole, res.host_hit_length
        n, node = rank.cache.init_load_back(InitLoadBackParams(best_match_node=res.best_match_node,
                                                               host_hit_length=res.host_hit_length, req=req))
        assert n == whole, n
        got = [buf[node.value].view(torch.uint8).numpy().tobytes() for buf in rank.buffers()]
        assert got == refs[0], (f"rank {RANK} did not load rank 0's latent: layers equal to rank 0's "
                                f"{[g == w for g, w in zip(got, refs[0])]}, to rank 1's "
                                f"{[g == w for g, w in zip(got, refs[1])]}, poisoned "
                                f"{[set(g) == {POISON} for g in got]}")
        if RANK > 0:
            assert got != refs[RANK], "the ranks' stored bytes were meant to differ"
    finally:
        rank.close()


def layerwise_round_trip(gen: torch.Generator) -> Rank:
    from flexkv.adapters.sglang import layerwise_server

    os.environ["FLEXKV_ENABLE_LAYERWISE_TRANSFER"] = "1"
    rank = Rank()
    connector = rank.cache.flexkv_connector
    assert connector.enable_layerwise, "FLEXKV_ENABLE_LAYERWISE_TRANSFER=1 was not taken up"  # alike on every rank
    server = layerwise_server._SERVERS.get(connector._layerwise_socket)
    prompts = [tokens_of(3 * PAGE + 1, 2), tokens_of(2 * PAGE + 3, 3)]
    stored = [rank.store(tokens, gen) for tokens in prompts]
    manager = connector.kv_manager
    if manager is not None:
        # SGLang 0.5.23 arms (drains) a rank's eventfds in start_load_kv_layerwise without any ordering against
        # rank 0's launch; a copy that lands first has its signals drained and that rank's forward pass waits
        # forever (docs/sglang.md). On a GPU the launch-to-copy time covers it; on CPU the copy takes
        # microseconds, so rank 0 gives rank 1 the time a GPU launch would take.
        launch = manager.launch
        manager.launch = lambda *a, **k: (time.sleep(0.05), launch(*a, **k))[1]
    signalled: list[tuple[int, int]] = []  # what this rank's agent told its eventfd server (counter, layer)
    if connector.tp_client.agent is not None:
        connector.tp_client.agent.add_layer_listener(lambda counter, layer: signalled.append((counter, layer)))
    problems = []
    for i, (tokens, (ref, whole)) in enumerate(zip(prompts, stored)):  # SGLang's counters 0, then 1
        res = rank.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)), req=None))
        assert res.device_prefix_len == whole, res.device_prefix_len  # rank 0's answer: alike on every rank
        waited: list[int] = []

        def forward(waited: list[int]) -> None:  # the attention backend reads each layer's buffers in order
            for layer in range(LAYERS):
                rank.kv.get_key_buffer(layer)
                waited.append(layer)

        t = threading.Thread(target=forward, args=(waited,), daemon=True)
        t.start()
        t.join(30)
        if waited != list(range(LAYERS)):
            problems.append(f"load {i}: the forward pass was released for layers {waited} only; the agent "
                            f"signalled {signalled}")
        bad = rank.differs(res.last_device_node.value, ref)
        if bad:
            problems.append(f"load {i}: this rank's loaded bytes differ: {bad}")
    assert server is not None and server.source is connector.tp_client.agent, (
        "this rank's eventfds are not served by its own RankAgent")
    assert not problems, problems
    return rank


def killed_rank_fails_within_lease(rank: Rank, pids: list[int]) -> None:
    """Rank 0 only: a load on SGLang's KVManager whose order rank 1 never answers (SIGSTOP, then SIGKILL)."""
    manager = rank.cache.flexkv_connector.kv_manager
    tokens = tokens_of(3 * PAGE + 1, 2)  # stored by layerwise_round_trip
    task, mask = manager.get_match(tokens)
    n = int(mask.sum())
    assert n == 3 * PAGE, n
    os.kill(pids[1], signal.SIGSTOP)
    manager.launch([task], [torch.arange(16, 16 + n, dtype=torch.int64)])
    time.sleep(0.2)  # the order is out; rank 1 holds it unanswered
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    report = manager.wait([task], timeout=LEASE_S + 20)[task]
    took = time.monotonic() - t0
    assert report.status.name == "FAILED" and "rank 1" in report.error, report
    assert took < LEASE_S + 2, f"the task failed after {took:.1f} s, the lease is {LEASE_S} s"
    assert manager.cache_stats()["cpu"]["num_locked"] == 0, "the failed load left blocks locked"
    print(f"INFO rank0 killed rank 1's load failed after {took:.2f} s: {report.error}", flush=True)


def check(name: str, fn, *args):
    try:
        out = fn(*args)
    except Exception as e:  # every failure, an AssertionError too, is this check's FAIL line
        traceback.print_exc()
        print(f"FAIL {name} rank{RANK}: {e!r} (FLEXKV_TEST_SEED={SEED} replays it)", flush=True)
        return None
    print(f"PASS {name} rank{RANK}", flush=True)
    return out


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    write_config()
    dist.init_process_group("gloo", init_method=f"file://{WORK}/gloo-init", rank=RANK, world_size=TP)
    get_parallel().override_permanently(world_group=SimpleNamespace(cpu_group=dist.group.WORLD))
    torch.cuda.Stream = _CpuStream
    pids = [None] * TP
    dist.all_gather_object(pids, os.getpid())
    print(f"SEED rank{RANK} {SEED + RANK}", flush=True)
    gen = torch.Generator().manual_seed(SEED + RANK)  # each rank's KV bytes are its own
    check("mp_round_trip", mp_round_trip, gen)
    check("mla_round_trip", mla_round_trip, gen)
    rank = check("layerwise_round_trip", layerwise_round_trip, gen)
    dist.barrier()
    if RANK == 0:
        if rank is not None:
            check("killed_rank_fails_within_lease", killed_rank_fails_within_lease, rank, pids)
            rank.cache.shutdown()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[1], signal.SIGKILL)  # also when the check could not run
    else:
        time.sleep(120)  # rank 0 kills this process
    sys.stdout.flush()
    os._exit(0)  # the gloo group has a dead peer now: no teardown


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
