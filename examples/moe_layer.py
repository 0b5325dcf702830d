"""An expert-parallel MoE layer: router -> dispatch -> jax.lax.ragged_dot -> combine, inside
``jax.jit(jax.shard_map(...))`` over all devices, checked against a dense single-device computation.

    # CPU, 4 ranks as 4 CPU devices of this process
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/moe_layer.py
    # GPUs: one rank per GPU of this process
    python examples/moe_layer.py --fp8

Each rank holds ``tokens`` token rows of which the first ``tokens - rank`` are real (``bound_m``),
the router weights (replicated) and the weights of its ``experts / R`` experts.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_garden import moe


def router(x, w_router, k):
    """Top-k softmax routing of bf16 tokens: (indices[T, k] int32, weights[T, k] f32)."""
    logits = jnp.dot(x.astype(jnp.float32), w_router, precision=jax.lax.Precision.HIGHEST)
    top, idx = jax.lax.top_k(logits, k)
    return idx.astype(jnp.int32), jax.nn.softmax(top, axis=-1)


def expert_mlp(h, w1, w2, group_sizes):
    """SiLU MLP per expert over grouped rows (silu(0) = 0, so zero padding rows stay zero)."""
    a = jax.lax.ragged_dot(h, w1, group_sizes, preferred_element_type=jnp.float32)
    a = jax.nn.silu(a).astype(jnp.bfloat16)
    return jax.lax.ragged_dot(a, w2, group_sizes, preferred_element_type=jnp.float32)


def moe_layer(a2a: moe.AllToAll, x, bound_m, w_router, w1, w2):
    """One rank's share (inside shard_map): x[T, H] bf16, w1[L, H, F], w2[L, F, H]."""
    cfg = a2a.config
    idx, weights = router(x, w_router, cfg.experts_per_token)
    expert_x, expert_scale, counts = a2a.dispatch(x, idx, weights, bound_m=bound_m)
    if expert_scale is not None:  # fp8 dispatch: dequantise per block of scale_block channels
        expert_x = (expert_x.astype(jnp.float32)
                    * jnp.repeat(expert_scale, cfg.scale_block, axis=1)).astype(jnp.bfloat16)
    # Groups are the padded segments, so each group starts where dispatch put its expert.
    pad = cfg.expert_padding
    group_sizes = (counts + pad - 1) // pad * pad
    expert_y = expert_mlp(expert_x, w1, w2, group_sizes).astype(cfg.combine_dtype)
    return a2a.combine(expert_y, idx, weights, bound_m=bound_m, expert_counts=counts), idx


def dense_reference(x, w_router, w1, w2, k):
    """Every expert on every token on one device, mixed with the same routing."""
    idx, weights = router(x, w_router, k)
    a = jax.nn.silu(jnp.einsum("th,ehf->etf", x, w1, preferred_element_type=jnp.float32))
    out = jnp.einsum("etf,efh->eth", a.astype(jnp.bfloat16), w2,
                     preferred_element_type=jnp.float32)                      # [E, T, H]
    picked = jnp.take_along_axis(out.transpose(1, 0, 2), idx[:, :, None], axis=1)  # [T, k, H]
    return (weights[:, :, None] * picked).sum(axis=1), idx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="token rows per rank (max_tokens)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-padding", type=int, default=8)
    ap.add_argument("--fp8", action="store_true", help="fp8 e4m3 dispatch, 128-channel scales")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    devices = jax.devices()
    r, t, h, f, e, k = (len(devices), args.tokens, args.hidden, args.ffn, args.experts,
                        args.top_k)
    if devices[0].platform == "cpu" and r == 1:
        print("note: one CPU device; set XLA_FLAGS=--xla_force_host_platform_device_count=4")
    mesh = Mesh(np.array(devices), ("ep",))
    cfg = moe.AllToAllConfig(
        num_experts=e, experts_per_token=k, hidden=h, max_tokens=t,
        dispatch_dtype=jnp.float8_e4m3fn if args.fp8 else jnp.bfloat16,
        scale_block=128 if args.fp8 else None, expert_padding=args.expert_padding)

    keys = jax.random.split(jax.random.key(args.seed), 4)
    x = jax.random.normal(keys[0], (r * t, h), jnp.float32).astype(jnp.bfloat16)
    w_router = jax.random.normal(keys[1], (h, e), jnp.float32) / np.sqrt(h)
    w1 = (jax.random.normal(keys[2], (e, h, f), jnp.float32) / np.sqrt(h)).astype(jnp.bfloat16)
    w2 = (jax.random.normal(keys[3], (e, f, h), jnp.float32) / np.sqrt(f)).astype(jnp.bfloat16)
    n_real = np.maximum(t - np.arange(r), 0).astype(np.int32)   # rank i has t - i real tokens

    shard = NamedSharding(mesh, P("ep"))
    x_s, bm_s, w1_s, w2_s = (jax.device_put(a, shard) for a in (x, jnp.asarray(n_real), w1, w2))
    wr_s = jax.device_put(w_router, NamedSharding(mesh, P()))

    with moe.AllToAll(cfg, mesh, "ep") as a2a:
        layer = jax.jit(jax.shard_map(
            lambda x, bm, wr, w1, w2: moe_layer(a2a, x, bm[0], wr, w1, w2), mesh=mesh,
            in_specs=(P("ep"), P("ep"), P(), P("ep"), P("ep")), out_specs=P("ep")))
        y, idx = layer(x_s, bm_s, wr_s, w1_s, w2_s)
        y, idx = np.asarray(y, np.float32), np.asarray(idx)
        dropped = a2a.dropped_rows() if a2a.platform == "cpu" else None

    with jax.default_device(jax.devices()[0]):
        want, want_idx = jax.jit(dense_reference, static_argnums=4)(x, w_router, w1, w2, k)
    want, want_idx = np.asarray(want, np.float32), np.asarray(want_idx)

    real = np.concatenate([np.arange(t) < n for n in n_real])
    same_route = real & (np.sort(idx, -1) == np.sort(want_idx, -1)).all(-1)
    err = np.linalg.norm(y[same_route] - want[same_route]) / np.linalg.norm(want[same_route])
    tol = 0.05 if args.fp8 else 0.01   # bf16 expert outputs (+ fp8 e4m3 inputs)
    print(f"R={r} ({devices[0].platform}) tokens/rank={t} real={n_real.tolist()} H={h} F={f} "
          f"E={e} K={k} pad={args.expert_padding} dispatch={cfg.dispatch_dtype.name} "
          f"M={a2a.max_recv_tokens}")
    print(f"relative error vs dense: {err:.2e} (tolerance {tol}); routing identical for "
          f"{same_route.sum()}/{real.sum()} real tokens; padding rows zero: "
          f"{not y[~real].any()}; dropped rows: {dropped}")
    ok = err < tol and same_route.sum() >= 0.99 * real.sum() and not y[~real].any()
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
