"""NumPy reference of MoE dispatch/combine (the semantics in jax_garden/moe.py's docstring).

Written from the semantics, independently of the native and ragged implementations, so the CPU
and GPU suites can check either against it. Arrays are stacked over ranks: ``xs[R, T, H]``,
``indices[R, T, K]``, ``weights[R, T, K]``, ``bound_m[R]``; results likewise ``[R, ...]``.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

FP8_MAX = np.float32(448.0)


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def worst_case_recv_tokens(r: int, t: int, k: int, l: int, pad: int) -> int:
    return round_up(r * t * k + l * (pad - 1), pad)


def quantize_fp8(x: np.ndarray, scale_block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block of ``scale_block`` channels: amax = max |x| over the block's finite values,
    scale = amax * f32(1/448) (1 if that is zero), x_fp8 = clip(x/scale, ±448) rounded to
    float8_e4m3fn (so ±inf saturate to ±448 and NaN stays NaN). ``x`` is [..., H]."""
    *lead, h = x.shape
    xb = x.astype(np.float32).reshape(*lead, h // scale_block, scale_block)
    amax = np.where(np.isfinite(xb), np.abs(xb), np.float32(0)).max(axis=-1)
    scale = np.where(amax > 0, amax * np.float32(1.0 / 448.0), np.float32(1.0)).astype(np.float32)
    with np.errstate(invalid="ignore"):  # NaN / scale
        q = np.clip(xb / scale[..., None], -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q.reshape(*lead, h), scale


@dataclasses.dataclass
class Plan:
    """Where each (rank s, token t, k) goes: ``dest[s, t, k]`` rank (-1 if ignored) and
    ``row[s, t, k]`` row in that rank's expert_x (-1 if ignored or dropped)."""

    dest: np.ndarray      # [R, T, K]
    row: np.ndarray       # [R, T, K]
    counts: np.ndarray    # [R, L] rows kept per local expert
    dropped: np.ndarray   # [R] rows dropped for lack of space, per receiving rank
    max_recv_tokens: int


def plan(indices: np.ndarray, bound_m, num_experts: int, expert_padding: int = 1,
         max_recv_tokens: int | None = None) -> Plan:
    indices = np.asarray(indices)
    r, t, k = indices.shape
    l = num_experts // r
    m = max_recv_tokens or worst_case_recv_tokens(r, t, k, l, expert_padding)
    bm = np.clip(np.asarray(bound_m).reshape(r), 0, t)
    dest = np.full((r, t, k), -1, np.int64)
    row = np.full((r, t, k), -1, np.int64)
    counts = np.zeros((r, l), np.int64)
    dropped = np.zeros((r,), np.int64)
    for s in range(r):
        for tt in range(bm[s]):
            for kk in range(k):
                e = indices[s, tt, kk]
                if 0 <= e < num_experts:
                    dest[s, tt, kk] = e // l
    for d in range(r):
        # Rows for rank d in (source rank, token, k) order, then grouped by local expert.
        entries = [(s, tt, kk, indices[s, tt, kk] - d * l)
                   for s in range(r) for tt in range(t) for kk in range(k) if dest[s, tt, kk] == d]
        cursor = 0
        for e in range(l):
            seg = [(s, tt, kk) for (s, tt, kk, le) in entries if le == e]
            kept = min(len(seg), m - cursor)
            for i, (s, tt, kk) in enumerate(seg[:kept]):
                row[s, tt, kk] = cursor + i
            counts[d, e] = kept
            dropped[d] += len(seg) - kept
            cursor += round_up(kept, expert_padding)
    return Plan(dest, row, counts, dropped, m)


def dispatch(p: Plan, xs: np.ndarray, x_scales: np.ndarray | None = None):
    """Returns ``(expert_x[R, M, H], expert_scale[R, M, S] or None, counts[R, L])``."""
    r, t, k = p.row.shape
    ex = np.zeros((r, p.max_recv_tokens, xs.shape[-1]), xs.dtype)
    es = None if x_scales is None else np.zeros((r, p.max_recv_tokens, x_scales.shape[-1]),
                                                np.float32)
    for s, tt, kk in zip(*np.nonzero(p.row >= 0)):
        d, rw = p.dest[s, tt, kk], p.row[s, tt, kk]
        ex[d, rw] = xs[s, tt]
        if es is not None:
            es[d, rw] = x_scales[s, tt]
    return ex, es, p.counts.astype(np.int32)


def combine(p: Plan, expert_ys: np.ndarray, weights: np.ndarray, out_dtype=ml_dtypes.bfloat16):
    """``y[s, t] = sum_k w[s, t, k] * expert_y[dest, row]`` in f32, k order, each product and sum
    rounded separately; absent (t, k) add nothing; rounded once to ``out_dtype``."""
    r, t, k = p.row.shape
    acc = np.zeros((r, t, expert_ys.shape[-1]), np.float32)
    for kk in range(k):
        ok = p.row[:, :, kk] >= 0
        v = expert_ys[np.where(ok, p.dest[:, :, kk], 0), np.where(ok, p.row[:, :, kk], 0)]
        prod = weights[:, :, kk, None].astype(np.float32) * v.astype(np.float32)
        acc = np.where(ok[..., None], acc + prod, acc)
    return acc.astype(out_dtype)


def random_routing(rng: np.random.Generator, r: int, t: int, k: int, num_experts: int,
                   distinct: bool = True):
    """indices[R, T, K] int32 (distinct experts per token when ``distinct``) and weights f32."""
    if distinct:
        idx = np.argsort(rng.random((r, t, num_experts)), axis=-1)[..., :k]
    else:
        idx = rng.integers(0, num_experts, size=(r, t, k))
    w = rng.random((r, t, k)).astype(np.float32)
    return idx.astype(np.int32), w


def scaled_expert_layers(idx, bm, w, x, num_experts: int, ranks: int, padding: int, scale, layers: int):
    """Reference of `layers` rounds of dispatch -> expert e multiplies its rows by scale[e] (in f32,
    rounded to bf16) -> combine, each round's output feeding the next (the split-phase scan tests)."""
    plan_ = plan(idx, bm, num_experts, padding)
    local = num_experts // ranks
    want = x
    for _ in range(layers):
        ex, _, cnt = dispatch(plan_, want)
        ey = np.zeros_like(ex)
        for d in range(ranks):
            start = 0
            for le in range(local):
                n = cnt[d, le]
                ey[d, start:start + n] = (ex[d, start:start + n].astype(np.float32)
                                          * scale[d * local + le]).astype(ml_dtypes.bfloat16)
                start += round_up(n, padding)
        want = combine(plan_, ey, w)
    return want


@dataclasses.dataclass
class Case:
    """One test case of the MoE suites (CPU and GPU): sizes, routing pattern, bound_m pattern,
    fp8 mode. ``inputs()`` draws stacked per-rank arrays from ``seed``."""
    r: int
    e: int
    k: int
    t: int = 8
    h: int = 32
    pad: int = 1
    routing: str = "random"      # random | skewed | duplicates | invalid
    bound: str = "full"          # full | zero | mixed
    fp8: str = ""                # "" | "given" | "computed"
    scale_block: int | None = None
    m: int | None = None         # max_recv_tokens (None: worst case)
    seed: int = 0

    def config(self):
        import jax.numpy as jnp
        from jax_garden import moe

        return moe.AllToAllConfig(
            num_experts=self.e, experts_per_token=self.k, hidden=self.h, max_tokens=self.t,
            dispatch_dtype=jnp.float8_e4m3fn if self.fp8 else jnp.bfloat16,
            scale_block=self.scale_block if self.fp8 else None, expert_padding=self.pad,
            max_recv_tokens=self.m)

    def inputs(self):
        rng = np.random.default_rng(self.seed)
        r, t, k, e = self.r, self.t, self.k, self.e
        idx, w = random_routing(rng, r, t, k, e, distinct=self.routing != "duplicates")
        if self.routing == "skewed":  # every token of every rank picks the same experts
            idx[:] = (np.arange(k) * 5 + 3) % e
        if self.routing == "invalid":  # ignored ids: negative, == E, far out
            idx[:, ::3, 0] = -1
            idx[:, 1::3, -1] = e
            idx[:, 2::5, 0] = 1 << 20
        bm = {"full": np.full(r, t), "zero": np.zeros(r),
              "mixed": (np.arange(r) * 5 + t // 2) % (t + 1)}[self.bound].astype(np.int32)
        if self.bound == "mixed" and r > 1:
            bm[-1] = 0              # a rank with no tokens
            bm[0] = t
            if r > 2:
                bm[1] = t + 7       # out of range: clamped to T
        x = rng.normal(size=(r, t, self.h)).astype(np.float32) * 3
        x[:, 1] = 0                 # an all-zero token: fp8 scale of an all-zero block is 1
        return idx, w, bm, x
