"""EP measured as the field now measures it (``bench moe --ladder`` / ``--profile`` / ``--plot``):

  * a token ladder (default 1, 8, 32, 128, 512 tokens per rank) for two shapes: 256 experts top-8
    and 384 experts top-6, hidden 7168;
  * per rung, one jitted chain of back-to-back dispatch -> combine pairs (no host synchronisation
    inside, new routing every pair, the first pairs dropped): the **period** of a pair (start of
    pair i+1's dispatch_send - start of pair i's, device timers) beside the **per-phase** device
    times (dispatch = dispatch_recv end - dispatch_send start, combine likewise, and each kernel);
  * the slowest and the fastest rank (per-rank medians);
  * the oracle checked at every rung: one round trip on fixed inputs, bit for bit against NumPy
    (bench/_moe_oracle.py);
  * ``--profile``: the decode kernels' fixed cost at EP1 as the lead measures it, 1 and 128 tokens,
    with the NVLink kernels' first synchronisation (``JAX_GARDEN_MOE_LEGACY_SYNC=1``: a fence in
    every thread, the full grid for every kernel) and the current one in the same run, beside the
    floor of a chain of empty kernels (the launch-to-launch gap on this GPU).
"""

from __future__ import annotations

import os

import numpy as np

from jax_garden.bench._harness import percentile

SHAPES = {"256x8": (256, 8, 7168), "384x6": (384, 6, 7168)}
LADDER = (1, 8, 32, 128, 512)
N_ROUTINGS = 8
DROP = 5  # first pairs of a chain dropped (clocks, caches, lazy setup)
PHASES = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")


def recv_rows(tokens: int, k: int, recv_factor: float) -> int:
    """max_recv_tokens: recv_factor x the rows a rank receives on average (tokens x K), rounded up
    to 64 (random routing rarely drops a row at 1.5)."""
    return max(64, int(np.ceil(recv_factor * tokens * k / 64)) * 64)


def _stats_us(ns) -> dict:
    v = [float(x) / 1e3 for x in ns]
    return {"p50_us": percentile(v, 0.5, interpolate=True), "p99_us": percentile(v, 0.99, interpolate=True),
            "n": len(v)}


def _inputs(mesh, r: int, t: int, e: int, k: int, h: int, fp8: bool, seed: int):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((r * t, h), np.float32)
    idx = np.empty((r, N_ROUTINGS, t, k), np.int32)
    for i in range(N_ROUTINGS):
        idx[:, i] = np.argsort(rng.random((r, t, e)), axis=-1)[..., :k]
    w = rng.random((r, N_ROUTINGS, t, k)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    sh = NamedSharding(mesh, P("ep"))

    def put(a):
        a = np.ascontiguousarray(a)
        return jax.make_array_from_callback(a.shape, sh, lambda index: a[index])

    if fp8:
        from jax_garden import moe

        xq, xs = moe.quantize_fp8(jnp.asarray(x), 128)
        xin = (np.asarray(xq), np.asarray(xs))
    else:
        xin = (np.asarray(jnp.asarray(x).astype(jnp.bfloat16)), None)
    return ({"x": put(xin[0]), **({"x_scale": put(xin[1])} if fp8 else {})},
            put(idx.reshape(r * N_ROUTINGS, t, k)), put(w.reshape(r * N_ROUTINGS, t, k)),
            {"x": xin[0], "x_scale": xin[1], "idx": idx, "w": w})


def _chain(a2a, iters: int):
    """iters dispatch -> combine pairs in one program, routing i % 8, the expert a cast, pair i+1
    after pair i's combine (a data dependency, no host sync)."""
    import jax
    import jax.numpy as jnp

    def body(xin, idx_all, w_all):
        def step(i, carry):
            x, acc = carry
            idx, w = idx_all[i % N_ROUTINGS], w_all[i % N_ROUTINGS]
            sent = a2a.dispatch_send(x, idx, w, x_scale=xin.get("x_scale"))
            ex, _, cnt = a2a.dispatch_recv(sent)
            back = a2a.combine_send(ex.astype(jnp.bfloat16), cnt)
            y = a2a.combine_recv(back, idx, w)
            x, _ = jax.lax.optimization_barrier((x, y))
            return x, acc + y[0, 0].astype(jnp.float32)

        _, acc = jax.lax.fori_loop(0, iters, step, (xin["x"], jnp.float32(0)))
        return acc[None]

    return body


def _oracle_fn(a2a):
    import jax.numpy as jnp

    def body(xin, idx, w):
        ex, es, cnt = a2a.dispatch(xin["x"], idx, w, x_scale=xin.get("x_scale"))
        y = a2a.combine(ex.astype(jnp.bfloat16), idx, w, expert_counts=cnt)
        return {"ex": ex, "cnt": cnt, "y": y}

    return body


def _spmd(mesh, fn):
    import jax
    from jax.sharding import PartitionSpec as P

    from jax_garden import _compat

    return jax.jit(_compat.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), check_vma=False))


def check_oracle(mesh, a2a, cfg, host: dict, routing: int = 0) -> list[str]:
    """One round trip on routing `routing` against bench/_moe_oracle.py, this process's ranks: the
    counts and expert_x bit for bit, y exactly (by value)."""
    import jax
    import ml_dtypes

    from jax_garden.bench import _moe_oracle as oracle

    r = a2a.num_ranks
    t, k, e = cfg.max_tokens, cfg.experts_per_token, cfg.num_experts
    idx = host["idx"][:, routing]
    w = host["w"][:, routing]
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("ep"))

    def put(a):
        a = np.ascontiguousarray(a)
        return jax.make_array_from_callback(a.shape, sh, lambda index: a[index])

    xin = {"x": put(host["x"])}
    if host["x_scale"] is not None:
        xin["x_scale"] = put(host["x_scale"])
    out = _spmd(mesh, _oracle_fn(a2a))(xin, put(idx.reshape(r * t, k)), put(w.reshape(r * t, k)))
    m = a2a.max_recv_tokens
    row, dest, counts = oracle.plan(idx, np.full(r, t), e, cfg.expert_padding, m)
    x = host["x"].reshape(r, t, -1)
    want_ex = oracle.dispatch(row, dest, x, m)
    want_y = oracle.combine(row, dest, want_ex.astype(ml_dtypes.bfloat16), w)
    errors = []
    for key, want in (("cnt", counts), ("ex", want_ex), ("y", want_y)):
        arr = out[key]
        n = arr.shape[0] // r
        for shard in arr.addressable_shards:
            rank = (shard.index[0].start or 0) // n
            got = np.asarray(shard.data)
            wr = np.asarray(want[rank]).astype(got.dtype)
            same = (np.array_equal(got.astype(np.float32), wr.astype(np.float32)) if key == "y"
                    else np.array_equal(got.view(np.uint8), wr.view(np.uint8)))
            if not same:
                errors.append(f"oracle: rank {rank} {key} differs from the NumPy reference")
    return errors


def stamps_rows(stamps: dict) -> dict:
    """Per-phase, per-kernel and period statistics from the kernels' device stamps
    {rank: [iters, 4, 2] ns}, all ranks pooled, plus the slowest and fastest rank's medians."""
    per_rank = {}
    pooled: dict[str, list] = {}
    for rank, s in stamps.items():
        s = np.asarray(s, np.int64)[DROP:]
        if (s == 0).any():
            raise RuntimeError(f"rank {rank}: missing device timestamps")
        d = {name: s[:, i, 1] - s[:, i, 0] for i, name in enumerate(PHASES)}
        d["dispatch"] = s[:, 1, 1] - s[:, 0, 0]
        d["combine"] = s[:, 3, 1] - s[:, 2, 0]
        d["round_trip"] = s[:, 3, 1] - s[:, 0, 0]
        d["period"] = np.diff(s[:, 0, 0])  # back to back: start of pair i+1 - start of pair i
        per_rank[rank] = {k: float(np.median(v)) / 1e3 for k, v in d.items()}
        for k, v in d.items():
            pooled.setdefault(k, []).extend(v.tolist())
    rows = {k: _stats_us(v) for k, v in pooled.items()}
    for k in ("dispatch", "combine", "period"):
        vals = [p[k] for p in per_rank.values()]
        rows[k]["slowest_rank_us"] = max(vals)
        rows[k]["fastest_rank_us"] = min(vals)
    return rows


def measure(mesh, shape: str, tokens: int, dtype: str, iters: int, recv_factor: float, *, seed: int = 0,
            legacy_sync: bool = False, oracle: bool = True, node_size: int | None = None,
            internode=None) -> dict:
    """One rung: the chain timed on device, the oracle checked."""
    import jax
    import jax.numpy as jnp

    from jax_garden import moe

    e, k, h = SHAPES[shape]
    r = int(mesh.shape["ep"])
    fp8 = dtype == "fp8"
    cfg = moe.AllToAllConfig(num_experts=e, experts_per_token=k, hidden=h, max_tokens=tokens,
                             dispatch_dtype=jnp.float8_e4m3fn if fp8 else jnp.bfloat16,
                             scale_block=128 if fp8 else None, max_recv_tokens=recv_rows(tokens, k, recv_factor))
    xin, idx, w, host = _inputs(mesh, r, tokens, e, k, h, fp8, seed)
    old = os.environ.get("JAX_GARDEN_MOE_LEGACY_SYNC")
    os.environ["JAX_GARDEN_MOE_LEGACY_SYNC"] = "1" if legacy_sync else "0"
    try:
        a2a = moe.AllToAll(cfg, mesh, "ep", node_size=node_size, internode=internode)
    finally:
        if old is None:
            os.environ.pop("JAX_GARDEN_MOE_LEGACY_SYNC")
        else:
            os.environ["JAX_GARDEN_MOE_LEGACY_SYNC"] = old
    with a2a:
        f = _spmd(mesh, _chain(a2a, iters))
        jax.block_until_ready(f(xin, idx, w))  # compile + warm up
        jax.block_until_ready(f(xin, idx, w))
        a2a.check()
        ctx = a2a._native
        stamps = {rank: ctx.timings(o, iters) for o, rank in ctx.ranks.items()}
        errors = check_oracle(mesh, a2a, cfg, host) if oracle else []
        a2a.check()
        extra = {}
        if hasattr(ctx._ctx, "grids"):
            extra["grids"] = {rank: list(ctx._ctx.grids(o)) for o, rank in ctx.ranks.items()}
        if ctx.proxied:
            extra["proxy_posts"] = {rank: ctx.proxy_posts(o) for o, rank in ctx.ranks.items()}
    return {"shape": shape, "tokens": tokens, "dtype": dtype, "ranks": r, "iters": iters,
            "max_recv_tokens": cfg.max_recv_tokens, "legacy_sync": legacy_sync,
            "node_size": a2a.node_size, "phases": stamps_rows(stamps), "oracle_errors": errors, **extra}


def kernel_floor(device, n: int = 200) -> dict:
    """The launch-to-launch gap of a chain of empty (one-block) kernels on `device`, each ordered
    after the previous one by data: what any kernel of a chain costs before it does anything."""
    import jax

    def body(x):
        def scan_fn(c, _):
            c = jax.ffi.ffi_call("jg_moe_cuda_timestamp", jax.ShapeDtypeStruct((2,), np.uint32),
                                 has_side_effect=True)(c)
            return c, c

        _, ts = jax.lax.scan(scan_fn, x, None, length=n)
        return ts

    f = jax.jit(body)  # runs where its operand lives
    x = jax.device_put(np.zeros(2, np.uint32), device)
    jax.block_until_ready(f(x))
    ts = np.asarray(f(x)).astype(np.uint64)
    ns = (ts[:, 0] | (ts[:, 1] << np.uint64(32))).astype(np.int64)
    gaps = np.diff(ns)[DROP:]
    return _stats_us(gaps)


def plot(result: dict, path: str) -> str | None:
    """The ladder against its baselines and the floor: µs per phase and the period over tokens per
    rank (log scale), one panel per shape. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [x for x in result.get("ladder", []) if "phases" in x]
    shapes = sorted({x["shape"] for x in rows})
    if not shapes:
        return None
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    floor = result.get("kernel_floor", {}).get("p50_us")
    for ax, shape in zip(axes[0], shapes):
        for dtype in sorted({x["dtype"] for x in rows if x["shape"] == shape}):
            sel = sorted((x for x in rows if x["shape"] == shape and x["dtype"] == dtype), key=lambda x: x["tokens"])
            t = [x["tokens"] for x in sel]
            for key, style in (("dispatch", "-o"), ("combine", "-s"), ("period", "-^")):
                ax.plot(t, [x["phases"][key]["p50_us"] for x in sel], style, label=f"{key} {dtype}")
        for base in result.get("baselines", []):
            if base.get("shape") == shape:
                ax.plot([base["tokens"]], [base["round_trip_us"]], "kx", ms=9, label=f"{base['name']} round trip")
        if floor:
            ax.axhline(2 * floor, color="gray", ls="--", label="floor: 2 empty kernels")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("µs (p50, device timers)")
        ax.set_title(f"{shape} (experts x top-k), H=7168, EP{result.get('ranks', '?')}, {result.get('device', '')}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
