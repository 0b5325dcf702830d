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
  * ``--profile``: the decode kernels' fixed cost at EP1, 1 and 128 tokens, every variant of the
    NVLink kernels in the same run (:data:`VARIANTS`: the first synchronisation, the flags of the
    previous version, release arrivals with two kernels per phase, and the fused kernels, one per
    phase, which are the default), each kernel's time split into launch gap, prologue, wait, work
    and epilogue from its device stamps (:func:`kernel_rows`), beside two floors: a chain of
    empty kernels in a CUDA graph and the same chain launched one by one from the host
    (:func:`kernel_floors`), and whether XLA put the MoE calls into command buffers (CUDA graphs).
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

# --profile: how each variant is made (settings read when the AllToAll is created; "graphs": False
# compiles the chain with XLA command buffers off). The first is the baseline of "old/new".
VARIANTS = {
    "flags": {"sync": "flags", "fused": False},            # the previous version
    "legacy": {"sync": "legacy", "fused": False},          # the first version
    "arrive-split": {"sync": "arrive", "fused": False},
    "arrive-fused": {"sync": "arrive", "fused": True},     # the default
    "fused-plain-launch": {"sync": "arrive", "fused": True, "cooperative": False},
    "fused-no-graphs": {"sync": "arrive", "fused": True, "graphs": False},
}
OLD, NEW = "flags", "arrive-fused"
_VARIANT_ENV = {"sync": "JAX_GARDEN_MOE_SYNC", "fused": "JAX_GARDEN_MOE_FUSED",
                "cooperative": "JAX_GARDEN_MOE_COOPERATIVE"}


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
    """iters dispatch -> combine pairs in one program (``dispatch()``/``combine()``: one kernel each
    when the context fuses them, else two), routing i % 8, the expert a cast, pair i+1 after pair
    i's combine (a data dependency, no host sync)."""
    import jax
    import jax.numpy as jnp

    def body(xin, idx_all, w_all):
        def step(i, carry):
            x, acc = carry
            idx, w = idx_all[i % N_ROUTINGS], w_all[i % N_ROUTINGS]
            ex, _, cnt = a2a.dispatch(x, idx, w, x_scale=xin.get("x_scale"))
            y = a2a.combine(ex.astype(jnp.bfloat16), idx, w, expert_counts=cnt)
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


def _with_settings(variant: dict, make):
    """make() with the variant's settings in the environment (restored afterwards)."""
    saved = {env: os.environ.get(env) for env in (*_VARIANT_ENV.values(), "JAX_GARDEN_MOE_LEGACY_SYNC")}
    if "sync" in variant:  # the variant's synchronisation, not one the environment forces
        os.environ.pop("JAX_GARDEN_MOE_LEGACY_SYNC", None)
    for key, env in _VARIANT_ENV.items():
        if key in variant:
            value = variant[key]
            os.environ[env] = value if isinstance(value, str) else ("1" if value else "0")
    try:
        return make()
    finally:
        for env, value in saved.items():
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value


def command_buffer_report(hlo_text: str, prefix: str = "jg_moe_") -> dict:
    """How XLA runs the custom calls named ``prefix*`` of an optimized HLO module: inside a
    command buffer (a CUDA graph: XLA's command_buffer computations) or launched one by one. (An
    XLA that forms command buffers after HLO shows none here: measure() also counts the handler
    runs of a timed run, which tells replays from launches either way.)"""
    calls = inside = buffers = 0
    current = ""
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and "(" in stripped and "=" not in stripped.split("(")[0]:
            current = stripped.split("(")[0].split()[-1].lstrip("%")
            buffers += "command_buffer" in current
        if f'custom_call_target="{prefix}' in line:
            calls += 1
            inside += "command_buffer" in current
    return {"moe_calls": calls, "in_command_buffers": inside, "command_buffer_computations": buffers}


def measure(mesh, shape: str, tokens: int, dtype: str, iters: int, recv_factor: float, *, seed: int = 0,
            variant: dict | None = None, oracle: bool = True, node_size: int | None = None,
            internode=None) -> dict:
    """One rung: the chain timed on device, the oracle checked. ``variant``: settings of the
    AllToAll (VARIANTS; None: the defaults)."""
    import jax
    import jax.numpy as jnp

    from jax_garden import moe

    variant = dict(variant or {})
    e, k, h = SHAPES[shape]
    r = int(mesh.shape["ep"])
    fp8 = dtype == "fp8"
    cfg = moe.AllToAllConfig(num_experts=e, experts_per_token=k, hidden=h, max_tokens=tokens,
                             dispatch_dtype=jnp.float8_e4m3fn if fp8 else jnp.bfloat16,
                             scale_block=128 if fp8 else None, max_recv_tokens=recv_rows(tokens, k, recv_factor))
    xin, idx, w, host = _inputs(mesh, r, tokens, e, k, h, fp8, seed)
    a2a = _with_settings(variant, lambda: moe.AllToAll(cfg, mesh, "ep", node_size=node_size, internode=internode))
    with a2a:
        lowered = _spmd(mesh, _chain(a2a, iters)).lower(xin, idx, w)
        # "graphs": False: the same program with XLA's command buffers off (every call launched from
        # the host, as without CUDA graphs).
        f = lowered.compile() if variant.get("graphs", True) else \
            lowered.compile(compiler_options={"xla_gpu_enable_command_buffer": ""})
        graphs = command_buffer_report(f.as_text() or "")
        ctx = a2a._native
        jax.block_until_ready(f(xin, idx, w))  # warm up (and capture, where XLA makes CUDA graphs)
        calls0 = ctx.handler_calls()
        jax.block_until_ready(f(xin, idx, w))
        # FFI handler runs per MoE call of the timed run: 1 = every call launched from the host,
        # 0 = replayed from a captured CUDA graph (the handler runs only when XLA records).
        graphs["handler_runs_per_call"] = (ctx.handler_calls() - calls0) / (2 * iters * len(ctx.ranks))
        a2a.check()
        stamps = {rank: ctx.timings(o, iters) for o, rank in ctx.ranks.items()}
        all_stamps = {rank: ctx.stamps(o, iters) for o, rank in ctx.ranks.items()} if hasattr(ctx, "stamps") else {}
        errors = check_oracle(mesh, a2a, cfg, host) if oracle else []
        a2a.check()
        extra = {}
        if hasattr(ctx._ctx, "grids"):
            extra["grids"] = {rank: list(ctx._ctx.grids(o)) for o, rank in ctx.ranks.items()}
            extra["sync"] = ctx._ctx.sync
        if all_stamps and all(v is not None for v in all_stamps.values()):
            extra["kernels"] = kernel_rows(all_stamps)
        if ctx.proxied:
            extra["proxy_posts"] = {rank: ctx.proxy_posts(o) for o, rank in ctx.ranks.items()}
    return {"shape": shape, "tokens": tokens, "dtype": dtype, "ranks": r, "iters": iters,
            "max_recv_tokens": cfg.max_recv_tokens, "variant": variant, "command_buffers": graphs,
            "node_size": a2a.node_size, "phases": stamps_rows(stamps), "oracle_errors": errors, **extra}


# Parts of a kernel's time, each from one stamp to the next (KERNEL_PARTS: name, from, to; "prev
# end"/"prev entry" are the previous kernel's in the chain: dispatch_send follows the previous
# pair's combine_recv).
KERNEL_PARTS = (("gap", "prev end", "entry"), ("launch to launch", "prev entry", "entry"),
                ("prologue", "entry", "start"), ("wait", "start", "waited"), ("work", "waited", "body"),
                ("epilogue", "body", "end"), ("total", "entry", "end"))


def kernel_rows(stamps: dict) -> dict:
    """Where each kernel's time goes, from every stamp of every call ({rank: {stamp name: [iters,
    4] ns}}, as CudaContext.stamps returns), the first DROP calls dropped, all ranks pooled: per
    kernel and part of KERNEL_PARTS the p50 in µs. A fused kernel's receive half has no launch:
    its "gap" is 0 and its "launch to launch" is the send half."""
    pooled: dict = {}
    for s in stamps.values():
        st = {name: np.asarray(v, np.int64)[DROP:] for name, v in s.items()}
        if any((v == 0).any() for name, v in st.items() if name in ("start", "end", "entry")):
            raise RuntimeError("missing device timestamps")
        n = st["entry"].shape[0]
        for k, kernel in enumerate(PHASES):
            # The previous kernel of the chain: the kernel before in this pair, or the previous
            # pair's last one (its first call has none).
            if k > 0:
                prev = {name: v[:, k - 1] for name, v in st.items()}
                rows = slice(None)
            else:
                prev = {name: v[:-1, 3] for name, v in st.items()}
                rows = slice(1, n)
            cur = {name: v[rows, k] for name, v in st.items()}
            ref = {"prev end": prev["end"], "prev entry": prev["entry"]}
            for part, a, b in KERNEL_PARTS:
                av = ref[a] if a in ref else cur[a]
                bv = ref[b] if b in ref else cur[b]
                if (av == 0).any() or (bv == 0).any():
                    continue  # a stamp this kernel does not write
                pooled.setdefault(kernel, {}).setdefault(part, []).extend((bv - av).tolist())
    return {kernel: {part: percentile([x / 1e3 for x in v], 0.5, interpolate=True) for part, v in parts.items()}
            for kernel, parts in pooled.items()}


def kernel_floors(device, n: int = 200) -> dict:
    """What any kernel of a chain costs before it does anything, on `device`, two ways:

    * ``graph``: four empty (one-thread) kernels per iteration of a jitted loop, each ordered after
      the previous one by data, as the MoE calls of a chain are: the launch-to-launch gap between
      kernels of one iteration (XLA puts such a body into a command buffer, i.e. a CUDA graph;
      ``command_buffers`` says whether it did);
    * ``host``: one empty kernel per loop iteration (too few calls for a command buffer): every
      kernel launched from the host, the loop's own work between them.
    """
    import jax

    def stamp(c):
        return jax.ffi.ffi_call("jg_moe_cuda_timestamp", jax.ShapeDtypeStruct((2,), np.uint32),
                                has_side_effect=True)(c)

    def graph_body(x):
        def step(i, carry):
            c, ts = carry
            row = []
            for _ in range(4):
                c = stamp(c)
                row.append(c)
            return c, jax.lax.dynamic_update_slice(ts, jax.numpy.stack(row)[None], (i, 0, 0))

        _, ts = jax.lax.fori_loop(0, n, step, (x, jax.numpy.zeros((n, 4, 2), np.uint32)))
        return ts

    def host_body(x):
        def scan_fn(c, _):
            c = stamp(c)
            return c, c

        _, ts = jax.lax.scan(scan_fn, x, None, length=n)
        return ts

    def ns(ts):
        ts = np.asarray(ts).astype(np.uint64)
        return (ts[..., 0] | (ts[..., 1] << np.uint64(32))).astype(np.int64)

    x = jax.device_put(np.zeros(2, np.uint32), device)
    out = {}
    g = jax.jit(graph_body).lower(x).compile()  # runs where its operand lives
    jax.block_until_ready(g(x))
    t = ns(g(x))[DROP:]  # [n, 4]
    out["graph"] = {**_stats_us(np.diff(t, axis=1).ravel()),
                    "command_buffers": command_buffer_report(g.as_text() or "", "jg_moe_cuda_timestamp")}
    h = jax.jit(host_body)
    jax.block_until_ready(h(x))
    out["host"] = _stats_us(np.diff(ns(h(x)))[DROP:])
    return out


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
    floor = result.get("kernel_floor", {}).get("graph", {}).get("p50_us")
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
