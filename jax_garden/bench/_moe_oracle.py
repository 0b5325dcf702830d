"""What dispatch/combine must return (docs/moe-ffi.md), in NumPy, for the benchmarks' oracle check at
every rung: the segment layout (rows by source rank, token, k; segments padded to expert_padding;
capacity drops), the unpadded counts, and combine summed in f32 in k order with each product and sum
rounded separately, then rounded once to bf16. The test suite's reference (tests/moe_reference.py)
checks the implementations; tests/test_bench_smoke.py checks this one against it."""

from __future__ import annotations

import numpy as np


def plan(idx: np.ndarray, bound_m: np.ndarray, num_experts: int, expert_padding: int, max_recv_tokens: int):
    """Where every routing entry lands: ``row[s, t, k]`` (-1: ignored or dropped), its receiving
    rank ``dest[s, t, k]``, and per rank the kept counts ``[R, L]`` and used rows."""
    r, t, k = idx.shape
    n_local = num_experts // r
    valid = (np.arange(t)[None, :, None] < np.clip(bound_m, 0, t)[:, None, None]) & (idx >= 0) & (idx < num_experts)
    dest = np.where(valid, idx // n_local, -1)
    row = np.full(idx.shape, -1, np.int64)
    counts = np.zeros((r, n_local), np.int64)
    for d in range(r):
        # Entries for rank d in (source, token, k) order, grouped by local expert (stable).
        s_, t_, k_ = np.nonzero(dest == d)
        e_ = idx[s_, t_, k_] - d * n_local
        order = np.argsort(e_, kind="stable")
        s_, t_, k_, e_ = s_[order], t_[order], k_[order], e_[order]
        total = np.bincount(e_, minlength=n_local)
        padded = (total + expert_padding - 1) // expert_padding * expert_padding
        start = np.minimum(np.cumsum(padded) - padded, max_recv_tokens)
        kept = np.minimum(total, max_recv_tokens - start)
        first = np.cumsum(total) - total  # position of each expert's first entry in the sorted list
        pos = np.arange(len(e_)) - first[e_]
        keep = pos < kept[e_]
        row[s_[keep], t_[keep], k_[keep]] = start[e_[keep]] + pos[keep]
        counts[d] = kept
    return row, dest, counts


def dispatch(row: np.ndarray, dest: np.ndarray, x: np.ndarray, max_recv_tokens: int) -> np.ndarray:
    """expert_x [R, M, H] (zeros where no row landed) from x [R, T, H]."""
    r = x.shape[0]
    out = np.zeros((r, max_recv_tokens) + x.shape[2:], x.dtype)
    s_, t_, k_ = np.nonzero(row >= 0)
    out[dest[s_, t_, k_], row[s_, t_, k_]] = x[s_, t_]
    return out


def combine(row: np.ndarray, dest: np.ndarray, expert_y: np.ndarray, weights: np.ndarray):
    """y [R, T, H] in bf16 (expert_y's dtype): sum_k w * expert_y[dest, row] in f32, k order."""
    r, t, k = row.shape
    acc = np.zeros((r, t, expert_y.shape[-1]), np.float32)
    for kk in range(k):  # k order; float32 products and sums are rounded separately by NumPy
        ok = row[:, :, kk] >= 0
        vals = np.zeros_like(acc)
        s_, t_ = np.nonzero(ok)
        vals[s_, t_] = expert_y[dest[s_, t_, kk], row[s_, t_, kk]].astype(np.float32)
        acc = np.where(ok[..., None], acc + weights[:, :, kk, None].astype(np.float32) * vals, acc)
    return acc.astype(expert_y.dtype)
