"""The control plane's hooks for tiers kept outside the core (no server needed): export_blocks packs block
images (SSD header + payload) of ready CPU blocks, import_blocks verifies them against a taken put and copies
the good ones in, add_counters adds a flow's counts."""

from __future__ import annotations

import numpy as np
import pytest

from flexkv.core.errors import TaskError

from kv_helpers import store

TPB = 16


def images_of(env, tokens: np.ndarray) -> np.ndarray:
    cp = env.kv.control_plane
    run = cp.token_run(env.kv._seed(None), tokens)
    return cp.export_blocks(run, 0, len(tokens) // TPB)


def taken_put(env, tokens: np.ndarray) -> tuple[int, np.ndarray]:
    task, _ = env.kv.put_match(tokens)
    seq, host = env.kv.take_external(task)
    return task, seq


def test_images_move_blocks_between_planes_byte_exact(make_kv) -> None:
    a, b = make_kv(), make_kv()
    tokens = a.tokens(4 * TPB)
    data = a.eng.fill([0, 1, 2, 3])
    store(a.kv, tokens, [0, 1, 2, 3])
    images = images_of(a, tokens)
    cp = a.kv.control_plane
    assert images.shape == (4, cp.object_bytes) and cp.object_bytes == 4096 + a.kv.block_bytes
    assert images_of(a, tokens[: 2 * TPB]).shape[0] == 2
    assert a.locked() == 0  # the blocks were locked only while packed

    task, seq = taken_put(b, tokens)
    assert list(seq) == [0, 1, 2, 3]
    ok = b.kv.control_plane.import_blocks(task, [bytes(row) for row in images])
    assert list(ok) == [1, 1, 1, 1]
    b.kv.finish_external(task, True)
    b.get_and_check(tokens, [10, 11, 12, 13], data)


def test_images_that_do_not_verify_are_refused(make_kv) -> None:
    a, b = make_kv(), make_kv()
    tokens = a.tokens(5 * TPB)
    a.eng.fill(range(5))
    store(a.kv, tokens, range(5))
    images = [bytearray(row.tobytes()) for row in images_of(a, tokens)]
    images[1][-1] ^= 1  # payload
    images[2][100] ^= 1  # header (token ids)
    images[3] = images[3][:-8]  # truncated
    images[4] = images_of(a, tokens)[0].tobytes()  # another block's image
    task, _ = taken_put(b, tokens)
    ok = b.kv.control_plane.import_blocks(task, [bytes(images[0]), bytes(images[1]), bytes(images[2]),
                                                 bytes(images[3]), images[4]])
    assert list(ok) == [1, 0, 0, 0, 0]
    b.kv.finish_external(task, False)
    task, _ = taken_put(b, tokens)
    assert list(b.kv.control_plane.import_blocks(task, [None] * 5)) == [0] * 5
    b.kv.finish_external(task, False)


def test_other_models_images_are_refused(make_kv) -> None:
    a, b = make_kv(), make_kv(num_layers=4)  # another model's fingerprint
    tokens = a.tokens(TPB)
    a.eng.fill([0])
    store(a.kv, tokens, [0])
    image = images_of(a, tokens)[0]
    assert a.kv.control_plane.object_fingerprint != b.kv.control_plane.object_fingerprint
    task, _ = taken_put(b, tokens)
    padded = image.tobytes().ljust(b.kv.control_plane.object_bytes, b"\0")
    assert list(b.kv.control_plane.import_blocks(task, [padded])) == [0]
    b.kv.finish_external(task, False)


def test_import_needs_a_taken_put_with_one_image_per_block(env) -> None:
    tokens = env.tokens(2 * TPB)
    cp = env.kv.control_plane
    task, _ = env.kv.put_match(tokens)
    with pytest.raises(TaskError, match="taken"):
        cp.import_blocks(task, [None, None])  # not taken yet
    env.kv.take_external(task)
    with pytest.raises(TaskError, match="2 blocks"):
        cp.import_blocks(task, [None])
    env.kv.finish_external(task, False)
    with pytest.raises(TaskError):
        cp.import_blocks(task, [None, None])  # ended


def test_counters_added_by_name(env) -> None:
    cp = env.kv.control_plane
    cp.add_counters({"remote_hit_blocks": 3, "remote_read_errors": 2})
    stats = env.kv.cache_stats()
    assert stats["remote_hit_blocks"] == 3 and stats["remote_read_errors"] == 2
    with pytest.raises(ValueError, match="no counter named"):
        cp.add_counters({"remote_nonsense": 1})
