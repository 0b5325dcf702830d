"""``python -m jax_garden.bench moe``: MoE dispatch/combine on the CUDA NVLink kernels against
``jax.lax.ragged_all_to_all`` (moe.RaggedAllToAll) and a copy-engine peer memcpy, in one run.

Settings (the field's standard for expert parallelism): decode 128 tokens/rank and prefill 4096, hidden 7168, top-8 of 256
experts, bf16 or fp8 e4m3 (+ f32 scales per 128 channels) dispatch, bf16 combine, over all GPUs
of the machine (one process driving them all).

Method (device timers, never host clocks):
  * native: a jitted loop of full round trips (dispatch_send, dispatch_recv, a cast as the expert,
    combine_send, combine_recv) with new routing each step (8 routings cycled); every kernel
    stamps %globaltimer at its first block's start and at its last block's end. Per step and
    rank: each half = its kernel's end - start; dispatch = dispatch_recv end - dispatch_send
    start (launch gap and waits for slower peers included); combine likewise; round trip =
    combine_recv end - dispatch_send start. Samples of all ranks are pooled; p50/p99.
  * ragged_all_to_all: the same loop on moe.RaggedAllToAll, with a timestamp kernel
    (jg_moe_cuda_timestamp, ordered by data dependencies) before dispatch, between dispatch and
    combine, and after combine.
  * peer copy: cudaMemcpyPeerAsync (cupy) timed with CUDA events: one pair (GPU0 -> GPU1) and
    every GPU sending to every other at once (per-GPU egress).
``--ladder`` adds EP as the field now measures it (jax_garden/bench/moe_ladder.py): a token ladder
(1, 8, 32, 128, 512 per rank) for 256 experts top-8 and 384 experts top-6, the back-to-back period
of a chain of dispatch -> combine pairs beside the per-phase device times, the slowest and fastest
rank, the oracle checked at every rung; ``--profile`` the decode kernels' fixed cost at 1 and 128
tokens, every variant of the kernels in the same run (the previous synchronisation, release
arrivals, one fused kernel per phase: the default), each kernel's time split into launch gap,
prologue, wait, work and epilogue, beside the floors of a chain of empty kernels (in a CUDA graph,
and launched one by one); ``--plot PATH`` draws the ladder (matplotlib).
``--nodes N`` runs the rows across N processes instead (jax_garden/bench/moe_nodes.py): on GPUs
node groups through the host proxy (sharing the GPUs when there are fewer than N), against plain
engine writes of the same bytes; on CPU the inter-node host context over tcp, against the
in-process reference and the tcp wire time of the same bytes.

Logical GB/s = selections (tokens * K) * bytes per selection / time, per GPU, counting the
selections whose expert lives on the same rank (local traffic) too, as pplx-garden and DeepEP
do. bytes per selection: H*2 (bf16), H + 4*H/128 (fp8 + scales), H*2 for combine.
"""

from __future__ import annotations

import argparse
import os
import sys

# jax's own variable, read when its GPU client starts: the benchmark shares the GPUs with cupy.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from jax_garden.bench._harness import Progress, percentile, print_table, write_json  # noqa: E402

E, K, H = 256, 8, 7168
MODES = {"decode": 128, "prefill": 4096}
N_ROUTINGS = 8
RAGGED_REFERENCE_US = {"decode": 2689.0, "prefill": 95129.0}  # DEVICE.md, 4xH100, bf16 round trip


def _stats(samples_ns, gb_per_sample=None):
    """p50 / p99 (µs, interpolated as numpy does) of device-timed samples, and GB/s at p50."""
    p50 = percentile(samples_ns, 0.5, interpolate=True) / 1e3
    p99 = percentile(samples_ns, 0.99, interpolate=True) / 1e3
    out = {"p50_us": p50, "p99_us": p99, "n": len(samples_ns)}
    if gb_per_sample is not None and p50 > 0:
        out["gbps_p50"] = gb_per_sample / (p50 * 1e-6)
    return out


def _timestamp(dep):
    """u64 globaltimer (as u32[2]) written when the stream reaches this point, after `dep`."""
    import jax
    import jax.numpy as jnp

    return jax.ffi.ffi_call("jg_moe_cuda_timestamp", jax.ShapeDtypeStruct((2,), jnp.uint32),
                            has_side_effect=True)(dep)


def _inputs(mesh, r, t, fp8, seed):
    """Per-rank x, x_scale, N_ROUTINGS routings (random distinct experts), as global arrays."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((r * t, H), np.float32))
    sh = NamedSharding(mesh, P("ep"))
    idx = np.empty((r, N_ROUTINGS, t, K), np.int32)
    for i in range(N_ROUTINGS):
        idx[:, i] = np.argsort(rng.random((r, t, E)), axis=-1)[..., :K]
    w = rng.random((r, N_ROUTINGS, t, K)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    put = lambda a: jax.device_put(a, sh)  # noqa: E731
    if fp8:
        from jax_garden import moe

        xq, xs = jax.jit(lambda v: moe.quantize_fp8(v, 128))(x)
        xin = (put(xq), put(xs))
    else:
        xin = (put(x.astype(jnp.bfloat16)), None)
    return xin, put(idx.reshape(r * N_ROUTINGS, t, K)), put(w.reshape(r * N_ROUTINGS, t, K)), idx


def _native_loop(a2a, iters, fp8):
    import jax
    import jax.numpy as jnp

    def body(x, xs, idx_all, w_all):
        def step(i, carry):
            x, acc = carry
            idx, w = idx_all[i % N_ROUTINGS], w_all[i % N_ROUTINGS]
            sent = a2a.dispatch_send(x, idx, w, x_scale=xs)
            ex, es, cnt = a2a.dispatch_recv(sent)
            ey = ex.astype(jnp.bfloat16)  # the "expert": a cast
            back = a2a.combine_send(ey, cnt)
            y = a2a.combine_recv(back, idx, w)
            x, _ = jax.lax.optimization_barrier((x, y))  # next step after this one's combine
            return x, acc + y[0, 0].astype(jnp.float32)

        _, acc = jax.lax.fori_loop(0, iters, step, (x, jnp.float32(0)))
        return acc[None]

    return body


def _ragged_loop(rag, iters, fp8):
    import jax
    import jax.numpy as jnp

    def body(x, xs, idx_all, w_all):
        def step(i, carry):
            x, ts = carry
            idx, w = idx_all[i % N_ROUTINGS], w_all[i % N_ROUTINGS]
            t0 = _timestamp(x)
            x, xs_, t0 = jax.lax.optimization_barrier((x, xs, t0))
            ex, es, cnt = rag.dispatch(x, idx, w, x_scale=xs_)
            t1 = _timestamp(ex)
            ex, t1 = jax.lax.optimization_barrier((ex, t1))
            y = rag.combine(ex.astype(jnp.bfloat16), idx, w)
            t2 = _timestamp(y)
            x, _, _ = jax.lax.optimization_barrier((x, y, t2))
            return x, ts.at[i].set(jnp.concatenate([t0, t1, t2]))

        _, ts = jax.lax.fori_loop(0, iters, step, (x, jnp.zeros((iters, 6), jnp.uint32)))
        return ts[None]

    return body


def _spmd(mesh, fn, fp8):
    import jax
    from jax.sharding import PartitionSpec as P

    from jax_garden import _compat

    del fp8  # x_scale is None for bf16: an empty pytree under the same spec
    return jax.jit(_compat.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"),
                                     check_vma=False))


def bench_native(mesh, r, mode, t, dtype, iters, recv_factor, seed=0):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_garden import moe

    fp8 = dtype == "fp8"
    m = max(128, int(np.ceil(recv_factor * t * K / 128)) * 128)
    cfg = moe.AllToAllConfig(num_experts=E, experts_per_token=K, hidden=H, max_tokens=t,
                             dispatch_dtype=jnp.float8_e4m3fn if fp8 else jnp.bfloat16,
                             scale_block=128 if fp8 else None, max_recv_tokens=m)
    xin, idx, w, idx_np = _inputs(mesh, r, t, fp8, seed)
    with moe.AllToAll(cfg, mesh, "ep") as a2a:
        f = _spmd(mesh, _native_loop(a2a, iters, fp8), fp8)
        jax.block_until_ready(f(xin[0], xin[1], idx, w))  # compile + warm up
        jax.block_until_ready(f(xin[0], xin[1], idx, w))
        a2a._native.check()
        dropped = a2a.dropped_rows()
        stamps = {o: a2a._native.timings(o, iters) for o in a2a._native.ranks}
        report = a2a._native.kernel_report
    s = np.stack(list(stamps.values())).astype(np.int64)  # [ranks, iters, 4, 2]
    if (s == 0).any():
        raise RuntimeError("missing kernel timestamps")
    dur = lambda k: (s[:, :, k, 1] - s[:, :, k, 0]).ravel()  # noqa: E731
    phases = {
        "dispatch_send": dur(0), "dispatch_recv": dur(1),
        "combine_send": dur(2), "combine_recv": dur(3),
        "dispatch": (s[:, :, 1, 1] - s[:, :, 0, 0]).ravel(),
        "combine": (s[:, :, 3, 1] - s[:, :, 2, 0]).ravel(),
        "round_trip": (s[:, :, 3, 1] - s[:, :, 0, 0]).ravel(),
    }
    sel = t * K
    disp_b = H * (1 if fp8 else 2) + (4 * H // 128 if fp8 else 0)
    comb_b = H * 2
    gb = {"dispatch_send": sel * disp_b, "dispatch_recv": sel * disp_b, "dispatch": sel * disp_b,
          "combine_send": sel * comb_b, "combine_recv": sel * comb_b, "combine": sel * comb_b,
          "round_trip": None}
    rows = {k: _stats(v, None if gb[k] is None else gb[k] / 1e9) for k, v in phases.items()}
    # NVLink bytes actually moved per GPU (mean over routings/ranks): dispatch sends each token
    # once per remote destination rank, combine one row per remote selection.
    l = E // r
    own = np.arange(r)[:, None, None, None]
    dest = idx_np // l
    remote_sel = (dest != own).sum(axis=-1)                       # [r, routings, t]
    remote_tok = np.zeros_like(remote_sel)
    for d in range(r):
        remote_tok += ((dest == d).any(axis=-1) & (d != own[..., 0]))
    rec = -(-H * (1 if fp8 else 2) // 16) * 16 + (-(-4 * H // 128 // 16) * 16 if fp8 else 0)
    nvlink = {"dispatch_bytes_per_gpu": float(remote_tok.sum(-1).mean() * rec),
              "combine_bytes_per_gpu": float(remote_sel.sum(-1).mean() * comb_b)}
    return {"impl": "native", "mode": mode, "dtype": dtype, "ranks": r, "tokens": t,
            "max_recv_tokens": m, "iters": iters, "phases": rows, "nvlink": nvlink,
            "dropped_rows": dropped, "kernels": report}


def bench_ragged(mesh, r, mode, t, dtype, iters, recv_factor, seed=0):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_garden import moe

    fp8 = dtype == "fp8"
    m = max(128, int(np.ceil(recv_factor * t * K / 128)) * 128)
    cfg = moe.AllToAllConfig(num_experts=E, experts_per_token=K, hidden=H, max_tokens=t,
                             dispatch_dtype=jnp.float8_e4m3fn if fp8 else jnp.bfloat16,
                             scale_block=128 if fp8 else None, max_recv_tokens=m)
    xin, idx, w, _ = _inputs(mesh, r, t, fp8, seed)
    rag = moe.RaggedAllToAll(cfg, mesh, "ep")
    f = _spmd(mesh, _ragged_loop(rag, iters, fp8), fp8)
    jax.block_until_ready(f(xin[0], xin[1], idx, w))
    ts = np.asarray(f(xin[0], xin[1], idx, w)).reshape(r, iters, 3, 2).astype(np.uint64)
    ns = (ts[..., 0] | (ts[..., 1] << np.uint64(32))).astype(np.int64)  # [r, iters, 3]
    sel = t * K
    disp_b = H * (1 if fp8 else 2) + (4 * H // 128 if fp8 else 0)
    rows = {
        "dispatch": _stats((ns[:, :, 1] - ns[:, :, 0]).ravel(), sel * disp_b / 1e9),
        "combine": _stats((ns[:, :, 2] - ns[:, :, 1]).ravel(), sel * H * 2 / 1e9),
        "round_trip": _stats((ns[:, :, 2] - ns[:, :, 0]).ravel()),
    }
    return {"impl": "ragged_all_to_all", "mode": mode, "dtype": dtype, "ranks": r, "tokens": t,
            "max_recv_tokens": m, "iters": iters, "phases": rows}


def bench_peer_copy(r, nbytes=256 << 20, iters=20):
    """Copy-engine peer copies (cudaMemcpyPeerAsync through cupy), timed with CUDA events:
    one pair GPU0 -> GPU1, and every GPU sending nbytes/(R-1) to each other GPU at once (one
    stream per pair, so the copies to different peers run concurrently)."""
    import cupy as cp

    for d in range(r):
        with cp.cuda.Device(d):
            for p in range(r):
                if p != d:
                    try:
                        cp.cuda.runtime.deviceEnablePeerAccess(p)
                    except cp.cuda.runtime.CUDARuntimeError:
                        pass  # already enabled
    src, dst, streams = {}, {}, {}
    for d in range(r):
        with cp.cuda.Device(d):
            src[d] = cp.ones(nbytes, cp.uint8)
            dst[d] = cp.empty(nbytes, cp.uint8)
            for p in range(r):
                streams[d, p] = cp.cuda.Stream(non_blocking=True)

    out = {}
    if r >= 2:
        samples = []
        for _ in range(iters + 2):
            with cp.cuda.Device(0):
                s = streams[0, 1]
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record(s)
                cp.cuda.runtime.memcpyPeerAsync(dst[1].data.ptr, 1, src[0].data.ptr, 0, nbytes, s.ptr)
                e1.record(s)
            e1.synchronize()
            samples.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3)
        p50 = percentile(samples[2:], 0.5, interpolate=True)
        out["pair_0_to_1"] = {"bytes": nbytes, "p50_us": p50, "gbps": nbytes / (p50 * 1e-6) / 1e9}

        chunk = nbytes // (r - 1) // 256 * 256
        per_gpu = {d: [] for d in range(r)}
        for _ in range(iters + 2):
            evs = {}
            for d in range(r):
                with cp.cuda.Device(d):
                    # Start event on one stream; every pair's stream waits for it, then copies;
                    # the end event waits for all of them.
                    s0 = streams[d, d]
                    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                    e0.record(s0)
                    done = []
                    for j, p in enumerate(q for q in range(r) if q != d):
                        s = streams[d, p]
                        s.wait_event(e0)
                        slot = d if d < p else d - 1  # d's place among p's R-1 senders
                        cp.cuda.runtime.memcpyPeerAsync(dst[p].data.ptr + slot * chunk, p,
                                                        src[d].data.ptr + j * chunk, d, chunk, s.ptr)
                        ev = cp.cuda.Event()
                        ev.record(s)
                        done.append(ev)
                    for ev in done:
                        s0.wait_event(ev)
                    e1.record(s0)
                    evs[d] = (e0, e1)
            for d, (e0, e1) in evs.items():
                e1.synchronize()
                per_gpu[d].append(cp.cuda.get_elapsed_time(e0, e1) * 1e3)
        gbps = [chunk * (r - 1) / (percentile(v[2:], 0.5, interpolate=True) * 1e-6) / 1e9
                for v in per_gpu.values()]
        out["all_to_all_egress_per_gpu"] = {"bytes_per_gpu": chunk * (r - 1),
                                            "gbps_mean": float(sum(gbps) / len(gbps)),
                                            "gbps_min": float(min(gbps))}
    for d in range(r):
        with cp.cuda.Device(d):
            cp.cuda.Device(d).synchronize()
    del src, dst
    cp.get_default_memory_pool().free_all_blocks()
    return out


def summarize(result: dict) -> dict[str, float]:
    """Fills ``result["ratios"]`` (per "mode dtype": speedups over ragged_all_to_all, bandwidth
    against the peer copy, and whether the targets are met) from the rows of the same run; returns
    the headline (the ratios .ci/gpu_verify.sh prints)."""
    pc = result["peer_copy"]
    ref_bw = max([pc.get("pair_0_to_1", {}).get("gbps", 0.0),
                  pc.get("all_to_all_egress_per_gpu", {}).get("gbps_mean", 0.0)])
    rows = {(x["impl"], x["mode"], x["dtype"]): x for x in result["rows"]}
    headline = {}
    for (impl, mode, dtype), row in rows.items():
        if impl != "native":
            continue
        p = row["phases"]
        rg = rows.get(("ragged_all_to_all", mode, dtype))
        key = f"{mode} {dtype}"
        ratio = {}
        if rg:
            ratio["round_trip_speedup_vs_ragged"] = rg["phases"]["round_trip"]["p50_us"] / p["round_trip"]["p50_us"]
            ratio["dispatch_speedup_vs_ragged"] = rg["phases"]["dispatch"]["p50_us"] / p["dispatch"]["p50_us"]
            ratio["combine_speedup_vs_ragged"] = rg["phases"]["combine"]["p50_us"] / p["combine"]["p50_us"]
        if ref_bw > 0:
            ratio["dispatch_bw_vs_peer_copy"] = p["dispatch"]["gbps_p50"] / ref_bw
            ratio["combine_bw_vs_peer_copy"] = p["combine"]["gbps_p50"] / ref_bw
        if mode == "decode":
            ratio["target_dispatch_le_30us"] = p["dispatch"]["p50_us"] <= 30.0
            ratio["target_combine_le_40us"] = p["combine"]["p50_us"] <= 40.0
            if rg:
                ratio["target_round_trip_30x_ragged"] = ratio["round_trip_speedup_vs_ragged"] >= 30.0
        else:
            if ref_bw > 0:
                ratio["target_dispatch_60pct_peer_copy"] = ratio["dispatch_bw_vs_peer_copy"] >= 0.6
                ratio["target_combine_60pct_peer_copy"] = ratio["combine_bw_vs_peer_copy"] >= 0.6
        result["ratios"][key] = ratio
        for k in ("round_trip_speedup_vs_ragged", "dispatch_bw_vs_peer_copy", "combine_bw_vs_peer_copy"):
            if k in ratio:
                headline[f"{key} {k}"] = ratio[k]
    return headline


TABLE_COLUMNS = [("mode", 8, "<"), ("dtype", 5, "<"), ("impl", 18, "<"), ("phase", 14, "<"),
                 ("p50 us", 10, ">"), ("p99 us", 10, ">"), ("GB/s", 8, ">")]


def print_report(result: dict) -> None:
    print(f"\nMoE dispatch/combine, {result['ranks']} x {result['device']}, E={E} top-{K} H={H}; device "
          f"timers; logical GB/s per GPU incl. local traffic")
    for k, v in result["peer_copy"].items():
        print(f"  peer copy {k}: {v.get('gbps', v.get('gbps_mean')):.1f} GB/s")
    cells = []
    for row in result["rows"]:
        for ph, st in row["phases"].items():
            cells.append([row["mode"], row["dtype"], row["impl"], ph, f"{st['p50_us']:.1f}", f"{st['p99_us']:.1f}",
                          f"{st['gbps_p50']:.1f}" if "gbps_p50" in st else ""])
    print_table(TABLE_COLUMNS, cells)
    for key, ratio in result["ratios"].items():
        print(f"  {key}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in ratio.items()))
    for e in result["errors"]:
        print(f"  error: {e}")


def run_ladder(result: dict, mesh, args, progress) -> None:
    """The ladder rows (and the ragged_all_to_all baseline at 128 tokens) into result."""
    from jax_garden.bench import moe_ladder

    for shape in args.shapes.split(","):
        for dtype in args.ladder_dtypes.split(","):
            for t in (int(x) for x in args.ladder_tokens.split(",")):
                try:
                    row = moe_ladder.measure(mesh, shape, t, dtype, args.ladder_iters, args.recv_factor)
                    result["ladder"].append(row)
                    result["errors"] += [f"ladder {shape} {dtype} {t}: {e}" for e in row["oracle_errors"]]
                except Exception as e:
                    result["errors"].append(f"ladder {shape} {dtype} {t}: {type(e).__name__}: {e}")
                progress.timed(f"ladder {shape} {dtype} {t} tokens done")


def run_profile(result: dict, mesh, args, progress) -> None:
    """The decode kernels' fixed cost at EP1, 1 and 128 tokens, every variant of moe_ladder.VARIANTS
    (the previous version's synchronisation first: the baseline of old/new), and the floors of a
    chain of empty kernels, in one run."""
    import numpy as np
    from jax.sharding import Mesh

    from jax_garden.bench import moe_ladder

    ep1 = Mesh(np.asarray(mesh.devices).reshape(-1)[:1], ("ep",))
    try:
        result["kernel_floor"] = moe_ladder.kernel_floors(ep1.devices.flat[0])
    except Exception as e:
        result["errors"].append(f"kernel floor: {type(e).__name__}: {e}")
    variants = list(moe_ladder.VARIANTS) if args.variants is None else args.variants.split(",")
    for t in (1, 128):
        for name in variants:
            try:
                row = moe_ladder.measure(ep1, "256x8", t, "bf16", args.ladder_iters, args.recv_factor,
                                         variant=moe_ladder.VARIANTS[name])
                row["variant_name"] = name
                result["profile"].append(row)
                result["errors"] += [f"profile {t} {name}: {e}" for e in row["oracle_errors"]]
            except Exception as e:
                result["errors"].append(f"profile {t} {name}: {type(e).__name__}: {e}")
            progress.timed(f"profile {t} tokens {name} done")


def summarize_ladder(result: dict) -> dict:
    """Headline entries of the ladder and the profile (goals at EP1, decode bf16:
    dispatch <= 10 us and combine <= 12 us at 128 tokens, <= 8 us per phase at 1 token)."""
    from jax_garden.bench import moe_ladder

    headline = {}
    for row in result["ladder"]:
        if row["tokens"] in (1, 128):
            key = f"ladder {row['shape']} {row['dtype']} EP{row['ranks']} {row['tokens']}tok"
            headline[f"{key} period_us"] = row["phases"]["period"]["p50_us"]
            headline[f"{key} dispatch_us"] = row["phases"]["dispatch"]["p50_us"]
            headline[f"{key} combine_us"] = row["phases"]["combine"]["p50_us"]
    if result["ladder"]:
        headline["ladder oracle ok"] = not any(r["oracle_errors"] for r in result["ladder"])
    prof = {(r["tokens"], r.get("variant_name")): r["phases"] for r in result["profile"]}
    for t in (1, 128):
        cur, old = prof.get((t, moe_ladder.NEW)), prof.get((t, moe_ladder.OLD))
        if cur is None:
            continue
        for ph in ("dispatch", "combine", "period"):
            headline[f"profile EP1 {t}tok {ph}_us"] = cur[ph]["p50_us"]
            if old is not None:
                headline[f"profile EP1 {t}tok {ph} old/new"] = old[ph]["p50_us"] / cur[ph]["p50_us"]
        if t == 128:
            headline["goal EP1 128tok dispatch <= 10us"] = cur["dispatch"]["p50_us"] <= 10.0
            headline["goal EP1 128tok combine <= 12us"] = cur["combine"]["p50_us"] <= 12.0
        else:
            headline["goal EP1 1tok <= 8us per phase"] = max(cur["dispatch"]["p50_us"], cur["combine"]["p50_us"]) <= 8.0
    floors = result.get("kernel_floor", {})
    for kind in ("graph", "host"):
        if "p50_us" in floors.get(kind, {}):
            headline[f"empty kernel floor {kind}_us"] = floors[kind]["p50_us"]
    return headline


LADDER_COLUMNS = [("rows", 12, "<"), ("shape", 6, "<"), ("dtype", 5, "<"), ("tok", 4, ">"), ("EP", 3, ">"),
                  ("disp p50", 9, ">"), ("comb p50", 9, ">"), ("period", 8, ">"), ("disp slow/fast", 15, ">"),
                  ("comb slow/fast", 15, ">"), ("kernels ds/dr/cs/cr us", 24, ">"), ("oracle", 6, "<")]


def print_ladder(result: dict) -> None:
    rows = [("ladder", r) for r in result["ladder"]] + [(r.get("variant_name", "profile"), r) for r in result["profile"]]
    if not rows:
        return
    print("\nMoE ladder and profile (device timers, µs p50; period = back-to-back pair; slow/fast = per-rank medians)")
    floors = result.get("kernel_floor", {})
    if "p50_us" in floors.get("graph", {}):
        cb = floors["graph"].get("command_buffers", {})
        print(f"  floor: an empty kernel in a chain costs {floors['graph']['p50_us']:.2f} us launch to launch in a "
              f"CUDA graph ({cb.get('in_command_buffers', '?')}/{cb.get('moe_calls', '?')} calls in command buffers), "
              f"{floors.get('host', {}).get('p50_us', float('nan')):.2f} us launched one by one from the host")
    cells = []
    for what, r in rows:
        p = r["phases"]
        kern = "/".join(f"{p[k]['p50_us']:.1f}" for k in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv"))
        cells.append([what, r["shape"], r["dtype"], r["tokens"], r["ranks"], f"{p['dispatch']['p50_us']:.1f}",
                      f"{p['combine']['p50_us']:.1f}", f"{p['period']['p50_us']:.1f}",
                      f"{p['dispatch']['slowest_rank_us']:.1f}/{p['dispatch']['fastest_rank_us']:.1f}",
                      f"{p['combine']['slowest_rank_us']:.1f}/{p['combine']['fastest_rank_us']:.1f}", kern,
                      "ok" if not r["oracle_errors"] else "FAIL"])
    print_table(LADDER_COLUMNS, cells)
    print_kernels(result)


KERNEL_COLUMNS = [("variant", 19, "<"), ("tok", 4, ">"), ("kernel", 14, "<"), ("gap", 6, ">"), ("l2l", 6, ">"),
                  ("l2l-floor", 9, ">"), ("prolog", 6, ">"), ("wait", 6, ">"), ("work", 6, ">"), ("epilog", 6, ">"),
                  ("total", 6, ">"), ("HLO cb", 6, ">"), ("handler/call", 12, ">")]


def print_kernels(result: dict) -> None:
    """Per kernel of each profile row, from its device stamps (µs p50): gap = previous kernel's end
    to this one's first instruction; l2l = launch to launch (first instruction to first
    instruction) and l2l - the graph floor; prologue (state loads), wait (peers' words), work
    (block 0's share), epilogue (block 0's work done to the last block's end); HLO cb = MoE calls
    inside command_buffer computations of the optimized HLO / all; handler/call = FFI handler runs
    per MoE call in the timed run (0: replayed from a CUDA graph, 1: launched from the host)."""
    floor = result.get("kernel_floor", {}).get("graph", {}).get("p50_us")
    cells = []
    for r in result["profile"]:
        cb = r.get("command_buffers", {})
        for kernel, parts in r.get("kernels", {}).items():
            def f(part):
                return f"{parts[part]:.1f}" if part in parts else "-"
            l2l = parts.get("launch to launch")
            cells.append([r.get("variant_name", ""), r["tokens"], kernel, f("gap"), f("launch to launch"),
                          f"{l2l - floor:.1f}" if (l2l is not None and floor is not None) else "-", f("prologue"),
                          f("wait"), f("work"), f("epilogue"), f("total"),
                          f"{cb.get('in_command_buffers', '?')}/{cb.get('moe_calls', '?')}",
                          f"{cb['handler_runs_per_call']:.2f}" if "handler_runs_per_call" in cb else "-"])
    if cells:
        print("\nWhere each kernel's time goes (device stamps, µs p50; a fused kernel's receive half has no launch)")
        print_table(KERNEL_COLUMNS, cells)


def _variant_names() -> list[str]:
    from jax_garden.bench import moe_ladder

    return list(moe_ladder.VARIANTS)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--nodes" or a.startswith("--nodes=") for a in argv):
        # Across processes (node groups, the TransferEngine between them): its own module.
        from jax_garden.bench import moe_nodes

        return moe_nodes.main(argv)
    ap = argparse.ArgumentParser(prog="python -m jax_garden.bench moe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=None, help="decode,prefill (default both; --quick: decode)")
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--iters", type=int, default=None, help="timed round trips (decode; default 200, --quick 50)")
    ap.add_argument("--prefill-iters", type=int, default=20)
    ap.add_argument("--ragged-iters", type=int, default=None, help="default 20, --quick 10")
    ap.add_argument("--ragged-prefill-iters", type=int, default=3)
    ap.add_argument("--recv-factor", type=float, default=1.5,
                    help="max_recv_tokens = factor * tokens * K rounded up to 128 (random routing "
                         "receives tokens*K rows per rank on average)")
    ap.add_argument("--ranks", type=int, default=0, help="GPUs to use (0: all)")
    ap.add_argument("--no-ragged", action="store_true")
    ap.add_argument("--no-peer-copy", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="decode only, fewer iterations, a smaller peer copy: well under a minute")
    ap.add_argument("--ladder", action="store_true", help="the token ladder, two shapes, period and oracle")
    ap.add_argument("--ladder-tokens", default="1,8,32,128,512")
    ap.add_argument("--shapes", default="256x8,384x6", help="experts x top-k, hidden 7168 (ladder)")
    ap.add_argument("--ladder-dtypes", default="bf16")
    ap.add_argument("--ladder-iters", type=int, default=None, help="pairs per chain (default 100, --quick 40)")
    ap.add_argument("--profile", action="store_true",
                    help="EP1 fixed cost at 1 and 128 tokens, every kernel variant (previous synchronisation, "
                         "release arrivals, fused kernels), per-kernel breakdown, and the empty-kernel floors")
    ap.add_argument("--variants", default=None,
                    help="--profile: comma-separated subset of " + ", ".join(repr(v) for v in _variant_names()))
    ap.add_argument("--no-classic", action="store_true", help="skip the decode/prefill rows against ragged")
    ap.add_argument("--plot", default=None, help="PNG path: the ladder against its baselines (matplotlib)")
    ap.add_argument("--out", "--json", dest="out", default="bench_results/moe.json",
                    help="JSON output path (default bench_results/moe.json)")
    args = ap.parse_args(argv)
    modes_arg = args.modes or ("decode" if args.quick else "decode,prefill")
    if args.ladder_iters is None:
        args.ladder_iters = 40 if args.quick else 100
    if args.ladder_iters <= 2 * 5:
        ap.error(f"--ladder-iters must be > 10 (the first 5 pairs are dropped), got {args.ladder_iters}")
    iters = args.iters if args.iters is not None else (50 if args.quick else 200)
    ragged_iters = args.ragged_iters if args.ragged_iters is not None else (10 if args.quick else 20)
    for name, value in (("--iters", iters), ("--prefill-iters", args.prefill_iters),
                        ("--ragged-iters", ragged_iters), ("--ragged-prefill-iters", args.ragged_prefill_iters)):
        if value <= 0:
            ap.error(f"{name} must be > 0, got {value}")
    if not args.recv_factor > 0:
        ap.error(f"--recv-factor must be > 0, got {args.recv_factor}")
    if args.variants is not None:
        unknown = [v for v in args.variants.split(",") if v not in _variant_names()]
        if unknown:
            ap.error(f"--variants: unknown {unknown} (known: {', '.join(_variant_names())})")

    import jax
    import numpy as np
    from jax.sharding import Mesh

    from jax_garden import _moe_cuda

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        print("moe bench: no CUDA GPU", file=sys.stderr)
        return 2
    if not _moe_cuda.available():
        print("moe bench: jax_garden was built without the CUDA MoE kernels", file=sys.stderr)
        return 2
    r = args.ranks or len(gpus)
    mesh = Mesh(np.array(gpus[:r]), ("ep",))
    modes = [m for m in modes_arg.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r} (decode, prefill)")
    for d in dtypes:
        if d not in ("bf16", "fp8"):
            ap.error(f"--dtypes: unknown dtype {d!r} (bf16, fp8)")

    result = {"benchmark": "moe", "device": gpus[0].device_kind, "ranks": r,
              "experts": E, "top_k": K, "hidden": H, "method": __doc__.split("Method", 1)[1].strip(),
              "local_traffic_counted": True, "quick": args.quick, "rows": [], "peer_copy": {},
              "ratios": {}, "errors": [], "ladder": [], "profile": [], "baselines": []}
    progress = Progress(sys.stdout)
    if args.no_classic:
        modes = []
        args.no_peer_copy = True
    if not args.no_peer_copy:
        try:
            result["peer_copy"] = (bench_peer_copy(r, nbytes=64 << 20, iters=5) if args.quick
                                   else bench_peer_copy(r))
        except Exception as e:  # cupy missing: the rest still runs
            result["errors"].append(f"peer copy: {type(e).__name__}: {e}")
        progress.timed("peer copy done")
    for mode in modes:
        t = MODES[mode]
        for dtype in dtypes:
            it = iters if mode == "decode" else args.prefill_iters
            try:
                result["rows"].append(bench_native(mesh, r, mode, t, dtype, it, args.recv_factor))
            except Exception as e:
                result["errors"].append(f"native {mode} {dtype}: {type(e).__name__}: {e}")
            if not args.no_ragged:
                it = ragged_iters if mode == "decode" else args.ragged_prefill_iters
                try:
                    result["rows"].append(bench_ragged(mesh, r, mode, t, dtype, it, args.recv_factor))
                except Exception as e:
                    result["errors"].append(f"ragged {mode} {dtype}: {type(e).__name__}: {e}")
            progress.timed(f"{mode} {dtype} done")

    if args.profile:
        run_profile(result, mesh, args, progress)
    if args.ladder:
        run_ladder(result, mesh, args, progress)
    for row in result["rows"]:  # the classic decode row's ragged round trip: the ladder's baseline at 128
        if row["impl"] == "ragged_all_to_all" and row["mode"] == "decode" and row["dtype"] == "bf16":
            result["baselines"].append({"name": "ragged_all_to_all", "shape": "256x8", "tokens": row["tokens"],
                                        "round_trip_us": row["phases"]["round_trip"]["p50_us"]})
    headline = summarize(result)
    headline.update(summarize_ladder(result))
    print_report(result)
    print_ladder(result)
    if args.plot:
        from jax_garden.bench import moe_ladder

        drawn = moe_ladder.plot(result, args.plot)
        print(f"plot: {drawn}" if drawn else "plot: matplotlib is not installed (pip install matplotlib)")
    out = write_json(args.out, result, headline)
    print(f"wrote {out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
