"""NumPy reference for weight-push plans: where every element of every destination shard must come
from, and a byte-level replay of a plan's schedule (staging, runs, direct writes) to check it."""

from __future__ import annotations

import numpy as np


def shard_of(global_array: np.ndarray, box) -> np.ndarray:
    return np.ascontiguousarray(global_array[tuple(slice(a, b) for a, b in box)])


def expected_destination(plan, globals_: dict) -> dict:
    """{(dst tensor, rank, local): bytes} every destination buffer must hold: the source tensor's
    box (quantized with the reference for fp8 weights and scales)."""
    from jax_garden import weights

    out = {}
    for di, d in enumerate(plan.dst.tensors):
        base = d.path[:-len(".scale")] if d.kind == "scale" else d.path
        g = np.asarray(globals_[base])
        if d.kind == "fp8":
            g = weights.quantize_fp8(g, d.block)[0]
        elif d.kind == "scale":
            g = weights.quantize_fp8(g, d.block)[1]
        for r, l, box in d.shards:
            out[(di, r, l)] = shard_of(g, box).reshape(-1).view(np.uint8)
    return out


def replay(plan, globals_: dict) -> tuple[dict, dict]:
    """Apply every source rank's chunks with NumPy (staging reference, runs, direct writes):
    returns ({buffer: bytes}, {buffer: times each byte was written})."""
    from jax_garden import weights

    bufs, counts = {}, {}
    for di, d in enumerate(plan.dst.tensors):
        for r, l, box in d.shards:
            n = int(np.prod([b - a for a, b in box], dtype=np.int64)) * d.itemsize
            bufs[(di, r, l)] = np.zeros(n, np.uint8)
            counts[(di, r, l)] = np.zeros(n, np.int32)
    for sr in range(plan.num_src_ranks):
        for c in plan.chunks_of(sr):
            stage = np.zeros(c.nbytes, np.uint8) if c.staged else None
            for it, off in zip(c.items, c.offsets):
                s = plan.src.tensors[it.src_tensor]
                sbox = next(box for r, l, box in s.shards if (r, l) == (it.src_rank, it.src_local))
                shard = shard_of(np.asarray(globals_[s.path]), sbox)
                if c.staged:
                    b = weights.stage_item_numpy(it, shard, plan)
                    assert b.size == it.g.nbytes, (b.size, it.g.nbytes)
                    stage[off:off + b.size] = b
                    src_bytes, base = stage, off
                else:
                    src_bytes, base = shard.reshape(-1).view(np.uint8), it.g.src_byte_off
                runs = it.g.run_dst_offsets()
                assert len(runs) == it.g.n_runs
                n = it.g.run_bytes
                for r, l in it.g.receivers:
                    for t, do in enumerate(runs.tolist()):
                        bufs[(it.dst_tensor, r, l)][do:do + n] = src_bytes[base + t * n:base + (t + 1) * n]
                        counts[(it.dst_tensor, r, l)][do:do + n] += 1
    return bufs, counts


def check_plan(plan, globals_: dict) -> None:
    """Every destination byte written exactly once, with the reference's value."""
    want = expected_destination(plan, globals_)
    got, counts = replay(plan, globals_)
    for key, w in want.items():
        path = plan.dst.tensors[key[0]].path
        c = counts[key]
        assert (c == 1).all(), f"{path} rank {key[1]} local {key[2]}: bytes written {c.min()}..{c.max()} times"
        bad = np.nonzero(got[key] != w)[0]
        assert bad.size == 0, f"{path} rank {key[1]} local {key[2]}: {bad.size} bytes differ, first at {bad[0]}"
