"""fp8 e4m3 with per-block scales: the NumPy reference (the stager computes the same bits in jax),
the error bound, and what the stager puts on the wire for one piece."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jax_garden.weights.layout import check_block, slices
from jax_garden.weights.plan import KIND_COPY, KIND_SCALE

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INV_FP8_MAX = np.float32(1.0 / 448.0)


def interleave(shape: tuple, block: tuple) -> tuple[tuple, tuple]:
    """Padded shape split into (blocks, block) pairs: (n0, b0, n1, b1, ...), and the padding."""
    nb = tuple(-(-s // b) for s, b in zip(shape, block))
    split = tuple(v for n, b in zip(nb, block) for v in (n, b))
    pad = tuple((0, n * b - s) for n, b, s in zip(nb, block, shape))
    return split, pad


def _np_block_amax(x: np.ndarray, block: tuple) -> np.ndarray:
    split, pad = interleave(x.shape, block)
    a = np.abs(np.pad(x.astype(np.float32), pad)).reshape(split)
    return a.max(axis=tuple(range(1, 2 * x.ndim, 2))) if x.ndim else a


def quantize_fp8(x: Any, block: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference: ``(weight float8_e4m3fn, scale float32)`` of ``x`` in blocks (see :class:`Fp8`)."""
    import ml_dtypes

    x = np.asarray(x)
    block = check_block(block)
    if len(block) != x.ndim:
        raise ValueError(f"block {block} must have one entry per dimension of shape {x.shape}")
    amax = _np_block_amax(x, block)
    scale = np.where(amax > 0, amax * INV_FP8_MAX, np.float32(1.0)).astype(np.float32)
    split, pad = interleave(x.shape, block)
    xs = np.pad(x.astype(np.float32), pad).reshape(split)
    inv = (np.float32(1.0) / scale).astype(np.float32)
    sb = inv.reshape(tuple(v for n in scale.shape for v in (n, 1)))
    q = np.clip(xs * sb, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    q = q.reshape(tuple(n * b for n, b in zip(scale.shape, block)))
    return q[tuple(slice(0, s) for s in x.shape)], scale


def dequantize_fp8(weight: Any, scale: Any, block: Sequence[int]) -> np.ndarray:
    """``weight * scale`` (float32), each scale broadcast over its block."""
    block = check_block(block)
    w = np.asarray(weight).astype(np.float32)
    s = np.asarray(scale, np.float32)
    for d, b in enumerate(block):
        s = np.repeat(s, b, axis=d)
    return w * s[tuple(slice(0, n) for n in w.shape)]


def fp8_error_bound(x: Any, scale: Any, block: Sequence[int]) -> np.ndarray:
    """Per-element bound on ``|dequantize(quantize(x)) - x|``: half a float8_e4m3fn step at the
    value's binade (2^-4 relative for normal values) and half the subnormal step (2^-10 of the
    scale) below that, plus float32 rounding."""
    block = check_block(block)
    x = np.abs(np.asarray(x).astype(np.float32))
    s = np.asarray(scale, np.float32)
    for d, b in enumerate(block):
        s = np.repeat(s, b, axis=d)
    s = s[tuple(slice(0, n) for n in x.shape)]
    return np.maximum(x * 2.0 ** -4, s * 2.0 ** -10) * (1 + 2.0 ** -20) + 1e-30


def slices(lo: Sequence[int], ext: Sequence[int]) -> tuple:
    return tuple(slice(a, a + e) for a, e in zip(lo, ext))


def stage_item_numpy(item: Any, src_shard: np.ndarray, plan: Any) -> np.ndarray:
    """Reference for what the stager puts on the wire for one item: its bytes (uint8, 1-D) in the
    destination's row-major order. ``src_shard`` is the holder's shard of the source tensor."""
    block = plan.dst.tensors[item.dst_tensor].block
    if item.kind == KIND_COPY:
        piece = np.ascontiguousarray(src_shard[slices(item.src_lo, item.ext)])
    else:
        region_ext = item.key[6]
        region = src_shard[slices(item.region_lo, region_ext)]
        q, sc = quantize_fp8(region, block)
        piece = sc if item.kind == KIND_SCALE else np.ascontiguousarray(q[slices(item.key[7], item.ext)])
    return piece.reshape(-1).view(np.uint8)
