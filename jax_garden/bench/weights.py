"""Weight-push benchmark: ``python -m jax_garden.bench weights [--quick] [--simulate k2] [--json PATH]``.

``--simulate k2`` (CPU only, no engines): builds the plan for Kimi-K2-like shapes (~1.03T
parameters, 61 layers, 384 experts, fp8 e4m3 with 128x128 block scales on the wire) from 256
trainer ranks (FSDP, block-aligned so each trainer quantizes alone) to 128 inference ranks
(8 replicas x 16: experts split 24 per rank, attention/dense tensor parallel over the 16), and
reports plan build time, plan size, bytes per sender and receiver (max/mean), writes and host
calls per push, the host work of one push's schedule walk, and the push time the schedule implies
(a max-min-fair fluid model of every sender's chunk sequence) for 400 Gb/s and 3.2 Tb/s per
8-GPU node, beside the bandwidth bound of the busiest receiver and Perplexity's published 1.3 s.

Without ``--simulate``: the measured rows, each beside its same-run baseline:

* CPU/tcp, host memory: a trainer process pushes bf16 params (FSDP 2 -> 1 replicated receiver
  and 2 -> 2 TP) to inference processes through the engine on 127.0.0.1, vs the raw libfabric
  ``fi_writemsg`` loop (``jax_garden.bench.fabric``'s raw_fabric_bench moving the same bytes in
  the same number of writes); also the fp8 push.
* GPU rows (2 GPUs; skipped without them): trainer process on GPU0 -> inference process on GPU1,
  and colocated 2 -> 2, 1-16 GB of bf16, vs the copy-engine peer copy (cudaMemcpyPeerAsync), vs
  ``jax.device_put`` resharding inside one process, vs ``jax.experimental.transfer``, vs
  gather-to-one-rank-then-broadcast; extra GPU memory vs the staging bound.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import numpy as np

from jax_garden.bench._harness import write_json

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PERPLEXITY_K2_SECONDS = 1.3


def _progress(msg: str) -> None:
    print(f"[weights] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Kimi-K2-like shapes


K2 = dict(hidden=7168, layers=61, dense_layers=1, experts=384, moe_inter=2048, shared_inter=2048,
          dense_inter=18432, vocab=163840, heads=64, q_lora=1536, kv_lora=512, qk_nope=128, qk_rope=64,
          v_head=128)


def k2_tensors(cfg: dict = K2) -> list[tuple[str, tuple, bool]]:
    """[(path, shape, fp8 on the wire)] for one model."""
    H, E = cfg["hidden"], cfg["experts"]
    qk = cfg["qk_nope"] + cfg["qk_rope"]
    out: list[tuple[str, tuple, bool]] = [("embed", (cfg["vocab"], H), False)]
    for layer in range(cfg["layers"]):
        p = f"layers.{layer}."
        out += [(p + "input_norm", (H,), False), (p + "post_norm", (H,), False),
                (p + "q_a", (H, cfg["q_lora"]), True), (p + "q_a_norm", (cfg["q_lora"],), False),
                (p + "q_b", (cfg["q_lora"], cfg["heads"] * qk), True),
                (p + "kv_a", (H, cfg["kv_lora"] + cfg["qk_rope"]), True), (p + "kv_a_norm", (cfg["kv_lora"],), False),
                (p + "kv_b", (cfg["kv_lora"], cfg["heads"] * (cfg["qk_nope"] + cfg["v_head"])), True),
                (p + "o", (cfg["heads"] * cfg["v_head"], H), True)]
        if layer < cfg["dense_layers"]:
            F = cfg["dense_inter"]
            out += [(p + "mlp_w1", (H, F), True), (p + "mlp_w3", (H, F), True), (p + "mlp_w2", (F, H), True)]
        else:
            F, S = cfg["moe_inter"], cfg["shared_inter"]
            out += [(p + "router", (E, H), False), (p + "router_bias", (E,), False),
                    (p + "experts_w1", (E, H, F), True), (p + "experts_w3", (E, H, F), True),
                    (p + "experts_w2", (E, F, H), True),
                    (p + "shared_w1", (H, S), True), (p + "shared_w3", (H, S), True), (p + "shared_w2", (S, H), True)]
    out += [("final_norm", (H,), False), ("lm_head", (cfg["vocab"], H), False)]
    return out


def _block(shape: tuple, fp8: bool) -> tuple:
    if not fp8:
        return (1,) * len(shape)
    return (1,) * (len(shape) - 2) + (128, 128)


def fsdp_sharding(shape: tuple, block: tuple, ranks: int, dst_factors: tuple | None = None, itemsize: int = 2,
                  min_shard_bytes: int = 256 * KiB):
    """FSDP over ``ranks`` (a power of two), as a trainer would lay parameters out for this push:
    dimension 0 is split by the largest power of two that keeps whole (fp8) blocks per shard and
    shards of at least ``min_shard_bytes``; another dimension d is split further only up to the
    destination's split of d (``dst_factors``), so a trainer shard never cuts a destination row
    into pieces (the pieces stay contiguous writes). Ranks left over hold replicas (HSDP); replicas
    split the push between them. Returns a MeshSharding (one device per rank)."""
    from jax_garden.weights import MeshSharding

    dst_factors = dst_factors or (1,) * len(shape)
    factors = [1] * len(shape)
    total = 1
    nbytes = math.prod(shape) * itemsize
    for d in range(len(shape)):
        limit = ranks if d == 0 else dst_factors[d]
        blocks = -(-shape[d] // block[d])
        while (total * 2 <= ranks and factors[d] * 2 <= limit and blocks % (factors[d] * 2) == 0
               and shape[d] % (factors[d] * 2) == 0 and nbytes // (total * 2) >= min_shard_bytes):
            factors[d] *= 2
            total *= 2
    axes = [(f"f{d}", f) for d, f in enumerate(factors) if f > 1] + [("rep", ranks // total)]
    spec = tuple(f"f{d}" if f > 1 else None for d, f in enumerate(factors))
    return MeshSharding(axes, spec)


def k2_specs(train_ranks: int = 256, replicas: int = 8, tp: int = 16, cfg: dict = K2) -> tuple[dict, dict]:
    """(trainer specs, inference specs) as flat dicts of TensorSpec / Fp8."""
    from jax_garden.weights import MeshSharding, TensorSpec, fp8_spec

    mesh = [("dp", replicas), ("tp", tp)]
    src: dict[str, Any] = {}
    dst: dict[str, Any] = {}
    for path, shape, fp8 in k2_tensors(cfg):
        blk = _block(shape, fp8)
        name = path.rsplit(".", 1)[-1]
        if name.startswith("experts_") or name in ("o", "shared_w2", "mlp_w2", "embed", "lm_head"):
            spec: tuple = ("tp",) + (None,) * (len(shape) - 1)  # experts / row parallel / vocab parallel
        elif name in ("q_b", "kv_b", "shared_w1", "shared_w3", "mlp_w1", "mlp_w3"):
            spec = (None, "tp")  # column parallel
        else:
            spec = ()  # replicated: norms, router, q_a, kv_a
        factors = tuple(tp if (d < len(spec) and spec[d] == "tp") else 1 for d in range(len(shape)))
        src[path] = TensorSpec(shape, "bfloat16", fsdp_sharding(shape, blk, train_ranks, factors))
        sh = MeshSharding(mesh, spec)
        dst[path] = fp8_spec(shape, sh, sh, blk) if fp8 else TensorSpec(shape, "bfloat16", sh)
    return src, dst


# ---------------------------------------------------------------------------------------------
# Fluid model of one push


def fluid_push_time(plan: Any, gpu_bps: float, window: int, gpus_per_node: int = 8,
                    node_bps: float | None = None, steps: int = 2000) -> dict:
    """Push time implied by the schedule: every sender posts its chunks in order with at most
    ``window`` chunks in flight (its staging slots); a chunk sends its bytes to each of its
    receivers; all (sender, receiver) flows share each GPU's NIC and each node's links max-min
    fairly (progressive filling). Time advances to the next chunk completion, at least
    ``bound / steps`` at a time (completions inside one step are taken together). Returns the
    time and the busiest receiver's and sender's bandwidth bounds."""
    node_bps = node_bps if node_bps is not None else gpu_bps * gpus_per_node
    S, R = plan.num_src_ranks, plan.num_dst_ranks
    st = plan.stats(chunks=False)
    recv_bound = float(st["bytes_per_dst"].max()) / gpu_bps
    send_bound = float(st["bytes_per_src"].max()) / gpu_bps
    min_dt = max(recv_bound, send_bound) / steps
    seqs = [[{d: float(t[2]) for d, t in c.rank_targets.items() if t[2] > 0} for c in plan.chunks_of(r)]
            for r in range(S)]
    n_sn = (S + gpus_per_node - 1) // gpus_per_node
    n_rn = (R + gpus_per_node - 1) // gpus_per_node
    caps = np.concatenate([np.full(S + R, gpu_bps), np.full(n_sn + n_rn, node_bps)])
    nxt = [0] * S
    inflight: list[list[dict]] = [[] for _ in range(S)]

    def refill(s: int) -> None:
        while len(inflight[s]) < window and nxt[s] < len(seqs[s]):
            c = dict(seqs[s][nxt[s]])
            nxt[s] += 1
            if c:
                inflight[s].append(c)

    for s in range(S):
        refill(s)
    t, steps_taken = 0.0, 0
    while any(inflight):
        # (sender, receiver) pairs with bytes left, and how many in-flight chunks share each
        pairs: dict[tuple[int, int], int] = {}
        for s in range(S):
            for c in inflight[s]:
                for d in c:
                    pairs[(s, d)] = pairs.get((s, d), 0) + 1
        keys = list(pairs)
        ps = np.array([k[0] for k in keys], np.int64)
        pd = np.array([k[1] for k in keys], np.int64)
        res = np.stack([ps, S + pd, S + R + ps // gpus_per_node, S + R + n_sn + pd // gpus_per_node], 1)
        rate = _max_min_rates(res, caps)
        share = {k: rate[i] / pairs[k] for i, k in enumerate(keys)}  # per chunk on that pair
        dt = min(left / share[(s, d)] for s in range(S) for c in inflight[s] for d, left in c.items())
        dt = max(dt, min_dt)
        t += dt
        steps_taken += 1
        for s in range(S):
            keep = []
            for c in inflight[s]:
                for d in list(c):
                    c[d] -= share[(s, d)] * dt
                    if c[d] <= 1.0:
                        del c[d]
                if c:
                    keep.append(c)
            inflight[s] = keep
            refill(s)
    return {"seconds": t, "receiver_bound_s": recv_bound, "sender_bound_s": send_bound,
            "ratio_to_receiver_bound": t / recv_bound if recv_bound else None, "steps": steps_taken}


def _max_min_rates(res: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Progressive filling: every flow uses 4 resources; raise all unfrozen rates together until
    a resource saturates, freeze its flows, repeat."""
    F = res.shape[0]
    rate = np.zeros(F)
    frozen = np.zeros(F, bool)
    cap_left = caps.astype(float).copy()
    for _ in range(len(caps)):
        active = ~frozen
        if not active.any():
            break
        users = np.bincount(res[active].ravel(), minlength=len(caps)).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(users > 0, cap_left / users, np.inf)
        inc = share.min()
        rate[active] += inc
        cap_left -= inc * users
        sat = (cap_left <= 1e-9 * caps) & (users > 0)
        hit = sat[res].any(axis=1) & active
        frozen |= hit
    return rate


def host_work_estimate(plan: Any, rank: int, per_scatter_us: float, per_target_us: float,
                       per_stage_call_us: float) -> dict:
    """One push's host work on ``rank``: the schedule walk measured (what Publisher._pipeline does
    per chunk besides engine and stager calls), plus the call counts times per-call costs."""
    chunks = plan.chunks_of(rank)
    from jax_garden.weights import _stage_groups

    t0 = time.perf_counter()
    scatters = targets = stage_calls = 0
    grants = {r: (0, 1) for r in plan.destinations_of(rank)}
    for c in chunks:
        ranks = [r for r in c.rank_targets if r in grants]
        if c.staged:
            stage_calls += len(_stage_groups(c))
        for r in ranks:
            small, big, _ = c.rank_targets[r]
            scatters += (small > 0) + (big > 0)
            targets += small + big
    walk_s = time.perf_counter() - t0
    est = walk_s + (scatters * per_scatter_us + targets * per_target_us + stage_calls * per_stage_call_us) * 1e-6
    return {"walk_ms": walk_s * 1e3, "scatters": scatters, "targets": targets, "stage_calls": stage_calls,
            "estimate_ms": est * 1e3}


def simulate_k2(args: argparse.Namespace) -> dict:
    from jax_garden import weights

    _progress("building K2 specs (256 trainer ranks FSDP -> 128 inference ranks, 8 x (EP/TP 16))")
    cfg = dict(K2, layers=args.layers)
    src, dst = k2_specs(cfg=cfg)
    t0 = time.perf_counter()
    src_l = weights.Layout.from_pytree(src)
    dst_l = weights.Layout.from_pytree(dst)
    t_layout = time.perf_counter() - t0
    t1 = time.perf_counter()
    plan = weights.Plan(src_l, dst_l, chunk_bytes=args.chunk_bytes, direct_min_bytes=args.direct_min_bytes)
    t_plan = time.perf_counter() - t1
    _progress(f"plan built in {t_plan:.2f} s (layouts {t_layout:.2f} s)")
    blob = plan.to_bytes()
    t3 = time.perf_counter()
    st = plan.stats()
    t_pack = time.perf_counter() - t3
    params = sum(math.prod(s) for _, s, _ in k2_tensors(cfg))
    fp8_params = sum(math.prod(s) for _, s, q in k2_tensors(cfg) if q)
    busiest_src = int(np.argmax(st["bytes_per_src"]))
    costs = dict(per_scatter_us=args.per_scatter_us, per_target_us=args.per_target_us,
                 per_stage_call_us=args.per_stage_call_us)
    measured = {}
    if None in costs.values():
        _progress("measuring per-call host costs on this machine (tcp engines on 127.0.0.1, jax CPU)")
        measured = host_costs()
        costs = {k: round(measured[k], 3) if v is None else v for k, v in costs.items()}
    hw = host_work_estimate(plan, busiest_src, **costs)
    if measured:  # the same schedule posted as plain lists (converted and checked per call)
        hw["estimate_plain_lists_ms"] = host_work_estimate(
            plan, busiest_src, per_scatter_us=measured["per_scatter_list_us"],
            per_target_us=measured["per_target_list_us"], per_stage_call_us=costs["per_stage_call_us"])["estimate_ms"]
    most_targets = int(np.argmax(st["writes_per_src"]))
    hw_t = host_work_estimate(plan, most_targets, **costs)
    window = max(2, args.staging_bytes // args.chunk_bytes)
    nets = []
    for label, node_gbps in (("400 Gb/s per node", 400), ("3.2 Tb/s per node", 3200)):
        gpu_bps = node_gbps * 1e9 / 8 / 8
        _progress(f"fluid model at {label} ({gpu_bps / 1e9:.2f} GB/s per GPU)")
        t2 = time.perf_counter()
        f = fluid_push_time(plan, gpu_bps, window)
        f.update(label=label, node_gbps=node_gbps, gpu_GBps=gpu_bps / 1e9, model_seconds=time.perf_counter() - t2,
                 perplexity_s=PERPLEXITY_K2_SECONDS)
        nets.append(f)
    out = {
        "params": params, "fp8_params": fp8_params, "tensors_src": len(src_l.tensors), "tensors_dst": len(dst_l.tensors),
        "src_ranks": plan.num_src_ranks, "dst_ranks": plan.num_dst_ranks, "chunk_bytes": args.chunk_bytes,
        "staging_bytes": args.staging_bytes, "plan_build_s": t_plan, "layout_build_s": t_layout, "pack_all_s": t_pack,
        "layers": args.layers,
        "plan_bytes": len(blob), "chunks": st["chunks"], "items": st["items"],
        "bytes_per_sender": {"max": int(st["bytes_per_src"].max()), "mean": float(st["bytes_per_src"].mean())},
        "bytes_per_receiver": {"max": int(st["bytes_per_dst"].max()), "mean": float(st["bytes_per_dst"].mean())},
        "writes_per_sender": {"max": int(st["writes_per_src"].max()), "mean": float(st["writes_per_src"].mean())},
        "stage_calls_per_sender": {"max": int(st["stage_calls_per_src"].max())},
        "scatters_per_sender": {"max": int(st["scatters_per_src"].max())},
        "host_work_busiest_sender": hw, "host_work_most_writes_sender": hw_t, "host_work_costs_us": costs,
        "host_costs_measured": measured,
        "network": nets, "fingerprint": plan.fingerprint,
        "goals": {"plan_build_s": "<= 5", "host_work_ms": "<= 10", "push_vs_receiver_bound": "<= 1.10"},
    }
    return out


def print_simulation(r: dict) -> None:
    G = 1e9
    print(f"K2-like push plan: {r['params'] / 1e12:.3f} T params ({r['fp8_params'] / 1e12:.3f} T in fp8), "
          f"{r['tensors_src']} -> {r['tensors_dst']} tensors, {r['src_ranks']} -> {r['dst_ranks']} ranks")
    print(f"  plan build      {r['layout_build_s'] + r['plan_build_s']:.2f} s (goal <= 5 s): layouts "
          f"{r['layout_build_s']:.2f} s + pieces and imm counts {r['plan_build_s']:.2f} s; packing all 256 senders' "
          f"chunks (a publisher packs only its own) {r['pack_all_s']:.2f} s")
    print(f"  plan size       {r['plan_bytes'] / 1e3:.1f} kB serialised; {r['chunks']} chunks, {r['items']} pieces")
    b, c = r["bytes_per_sender"], r["bytes_per_receiver"]
    print(f"  bytes/sender    max {b['max'] / G:.2f} GB, mean {b['mean'] / G:.2f} GB")
    print(f"  bytes/receiver  max {c['max'] / G:.2f} GB, mean {c['mean'] / G:.2f} GB")
    w = r["writes_per_sender"]
    print(f"  writes/sender   max {w['max']}, mean {w['mean']:.0f}; stage calls max "
          f"{r['stage_calls_per_sender']['max']}; scatter calls max {r['scatters_per_sender']['max']}")
    for key, what in (("host_work_busiest_sender", "busiest sender"), ("host_work_most_writes_sender", "most writes")):
        h = r[key]
        print(f"  host work/push  ({what}) {h['estimate_ms']:.1f} ms = walk {h['walk_ms']:.2f} ms + {h['scatters']} "
              f"scatter calls + {h['targets']} targets + {h['stage_calls']} stage calls (goal <= 10 ms)")
    costs = r["host_work_costs_us"]
    src = "measured in this run" if r.get("host_costs_measured") else "given"
    print(f"    (per-call costs, {src}: scatter {costs['per_scatter_us']} us, prepared target {costs['per_target_us']} us, "
          f"stage call dispatch {costs['per_stage_call_us']} us; the staging kernels themselves run on the device, "
          f"overlapped with the network, and are not host work)")
    m = r.get("host_costs_measured")
    if m and "estimate_plain_lists_ms" in r["host_work_busiest_sender"]:
        print(f"    (busiest sender with plain target lists instead of fabric.ScatterTargets: "
              f"{r['host_work_busiest_sender']['estimate_plain_lists_ms']:.1f} ms)")
    if m:
        print(f"    (same run, for comparison: plain-list targets {m['per_target_list_us']:.2f} us each; a stage call "
              f"dispatched and waited for on CPU {m['stage_call_fp8_us']:.1f} us)")
    for n in r["network"]:
        print(f"  {n['label']:<18} ({n['gpu_GBps']:.2f} GB/s per GPU): predicted push {n['seconds']:.3f} s; busiest "
              f"receiver bound {n['receiver_bound_s']:.3f} s (x{n['ratio_to_receiver_bound']:.3f}, goal <= 1.10); "
              f"sender bound {n['sender_bound_s']:.3f} s; Perplexity K2: {n['perplexity_s']} s")


# ---------------------------------------------------------------------------------------------
# Measured rows: worker processes (publishers and subscribers) driven by the parent through pipes


def _gen_tensor(t: Any, i: int, seed: int, box: tuple | None = None) -> np.ndarray:
    """Deterministic values of tensor ``t`` (index ``i`` in its layout), or of its ``box``: a cheap
    hash of the global element index (finite, normal bf16 values; fast enough for 16 GB)."""
    import ml_dtypes

    box = box or tuple((0, n) for n in t.shape)
    strides = [1] * len(t.shape)
    for d in range(len(t.shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * t.shape[d + 1]
    idx = np.zeros([b - a for a, b in box], np.uint32)
    for d, (a, b) in enumerate(box):
        shape = [1] * len(box)
        shape[d] = b - a
        idx = idx + (np.arange(a, b, dtype=np.uint64) * strides[d]).astype(np.uint32).reshape(shape)
    h = (idx * np.uint32(2654435761) + np.uint32((seed * 7919 + i * 104729) & 0xFFFFFFFF)) >> np.uint32(11)
    if t.dtype == "bfloat16":
        bits = (h.astype(np.uint16) & np.uint16(0x83FF)) | np.uint16(0x3C00)  # sign, mantissa; exponent ~1
        return bits.view(ml_dtypes.bfloat16)
    return ((h & np.uint32(0xFFFF)).astype(np.float32) / 65536.0 - 0.5).astype(t.dtype)


def _gen_params(layout: Any, seed: int) -> dict:
    return {t.path: _gen_tensor(t, i, seed) for i, t in enumerate(layout.tensors)}


def _rss_hwm() -> tuple[int, int]:
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) * 1024
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def _reset_hwm() -> None:
    try:  # Linux: "5" resets the peak RSS (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _gpu_mem() -> dict:
    import jax

    try:
        st = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        st = {}
    return {"in_use": st.get("bytes_in_use"), "peak": st.get("peak_bytes_in_use")}


def bench_configs(quick: bool, gpu: bool) -> list[dict]:
    """The measured configurations: specs are built in the workers from these descriptions."""
    if gpu:
        sizes = [1 * GiB] if quick else [1 * GiB, 4 * GiB, 16 * GiB]
        out = []
        for total in sizes:
            out.append(dict(name=f"gpu 1->1 bf16 {total // GiB} GiB", src=1, dst=1, total=total, layout="same",
                            fp8=False, chunk=64 * MiB, staging=512 * MiB, direct=4 * MiB, rounds=2 if quick else 3))
            out.append(dict(name=f"gpu 2->2 colocated FSDP->TP bf16 {total // GiB} GiB", src=2, dst=2, total=total,
                            layout="fsdp_tp", fp8=False, chunk=64 * MiB, staging=512 * MiB, direct=4 * MiB,
                            rounds=2 if quick else 3, colocated=True))
        out.append(dict(name="gpu 1->1 bf16->fp8 1 GiB", src=1, dst=1, total=GiB, layout="same", fp8=True,
                        chunk=64 * MiB, staging=512 * MiB, direct=4 * MiB, rounds=2 if quick else 3))
        return out
    total = 64 * MiB if quick else 1 * GiB
    rounds = 2 if quick else 3
    chunk = 8 * MiB if quick else 32 * MiB
    return [
        dict(name="tcp 1->1 bf16 direct", src=1, dst=1, total=total, layout="same", fp8=False, chunk=chunk,
             staging=4 * chunk, direct=1 * MiB, rounds=rounds),
        dict(name="tcp 1->1 bf16 staged", src=1, dst=1, total=total, layout="same", fp8=False, chunk=chunk,
             staging=4 * chunk, direct=1 << 40, rounds=rounds),
        dict(name="tcp 1->1 bf16->fp8", src=1, dst=1, total=total, layout="same", fp8=True, chunk=chunk,
             staging=4 * chunk, direct=1 << 40, rounds=rounds),
        dict(name="tcp 2->2 FSDP->TP bf16", src=2, dst=2, total=total, layout="fsdp_tp", fp8=False, chunk=chunk,
             staging=4 * chunk, direct=1 * MiB, rounds=rounds),
    ]


def config_specs(cfg: dict) -> tuple[dict, dict]:
    """(trainer specs, inference specs) of a measured configuration: 8 tensors [rows, 4096] bf16."""
    from jax_garden.weights import MeshSharding as M, TensorSpec as T, fp8_spec

    n, cols = 8, 4096
    rows = max(256, cfg["total"] // (n * cols * 2) // 256 * 256)
    src, dst = {}, {}
    for i in range(n):
        shape = (rows, cols)
        if cfg["layout"] == "same":
            s_sh, d_sh = M({"f": cfg["src"]}, ("f",)), M({"t": cfg["dst"]}, ("t",))
        else:  # FSDP rows -> tensor parallel columns
            s_sh, d_sh = M({"f": cfg["src"]}, ("f", None)), M({"t": cfg["dst"]}, (None, "t"))
        src[f"w{i}"] = T(shape, "bfloat16", s_sh)
        dst[f"w{i}"] = fp8_spec(shape, d_sh, d_sh, (128, 128)) if cfg["fp8"] else T(shape, "bfloat16", d_sh)
    return src, dst


def _worker(role: str, rank: int, env: dict, conn: Any) -> None:
    """A publisher or subscriber process: builds each configuration's plan when told, then pushes /
    waits on command, reporting times (time.monotonic is one clock for all processes of a host)."""
    os.environ.update(env)
    try:
        import jax  # noqa: F401  (after the environment is set)
        from jax_garden import weights

        obj = plan = cfg = None
        while True:
            cmd = conn.recv()
            if cmd[0] == "quit":
                return
            if cmd[0] == "config":
                cfg = cmd[1]
                src, dst = config_specs(cfg)
                plan = weights.Plan(weights.Layout.from_pytree(src), weights.Layout.from_pytree(dst),
                                    chunk_bytes=cfg["chunk"], direct_min_bytes=cfg["direct"])
                if role == "sub":
                    obj = weights.Subscriber(plan, dst, rank=rank, provider="tcp", engine_timeout=60)
                    conn.send(("address", obj.address))
                else:
                    before = _rss_hwm()
                    obj = weights.Publisher(plan, rank=rank, provider="tcp", staging_bytes=cfg["staging"],
                                            timeout=300, engine_timeout=60)
                    import jax.numpy as jnp

                    mine = {}
                    for i, t in enumerate(plan.src.tensors):
                        box = next(b for r, l, b in t.shards if r == rank)
                        mine[t.path.strip("[]'")] = jnp.asarray(_gen_tensor(t, i, 1, box))
                    jax.block_until_ready(mine)
                    obj._bench_params = mine
                    obj._bench_mem0 = (_rss_hwm(), _gpu_mem())
                    conn.send(("ready", before))
            elif cmd[0] == "peers":
                obj.set_peers(cmd[1])
                conn.send(("ok",))
            elif cmd[0] == "connect":
                obj.connect(cmd[1])
                conn.send(("ok",))
            elif cmd[0] == "push":
                if cmd[1] == 1:  # after the warm-up push (compiles): peak RSS from here on
                    _reset_hwm()
                    obj._bench_mem0 = (_rss_hwm(), _gpu_mem())
                t0 = time.monotonic()
                h = obj.push(obj._bench_params, cmd[1]).wait(600)
                t1 = time.monotonic()
                (rss0, hwm0), gm0 = obj._bench_mem0
                rss1, hwm1 = _rss_hwm()
                conn.send(("pushed", t0, t1, sum(h.bytes_sent.values()), h.stage_seconds,
                           {"hwm_growth": hwm1 - hwm0, "gpu_peak": _gpu_mem().get("peak"), "gpu_in_use0": gm0.get("in_use")}))
            elif cmd[0] == "wait":
                obj.wait(cmd[1], 600)
                t1 = time.monotonic()
                ok = None
                if cmd[2]:  # verify this rank's shards bitwise against the reference
                    from jax_garden.bench.weights import _verify
                    ok = _verify(plan, obj, rank)
                conn.send(("landed", t1, ok))
            elif cmd[0] == "end":
                obj.close()
                obj = None
                conn.send(("ok",))
    except BaseException as e:  # noqa: BLE001
        import traceback

        conn.send(("error", f"{role} {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _verify(plan: Any, sub: Any, rank: int) -> bool:
    """This subscriber rank's shards against the reference: bf16 bitwise; fp8 weights bitwise or,
    where a GPU rounds differently, within the e4m3 bound; scales to 1e-6."""
    import jax
    from jax_garden import weights

    p = sub.params()
    flat, _ = jax.tree_util.tree_flatten_with_path(p)
    got = {jax.tree_util.keystr(kp): leaf for kp, leaf in flat}
    src_index = {t.path: i for i, t in enumerate(plan.src.tensors)}
    for di, d in enumerate(plan.dst.tensors):
        base = d.path[:-len(".scale")] if d.kind == "scale" else d.path
        si = src_index[base]
        for r, l, box in d.shards:
            if r != rank:
                continue
            key = d.path + ".weight" if d.kind == "fp8" else d.path
            arr = np.asarray(got[key])
            if d.kind == "array":
                want = _gen_tensor(plan.src.tensors[si], si, 1, box)
                if not np.array_equal(arr.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)):
                    return False
                continue
            # quantize whole blocks around the box, then crop
            blo = tuple((a // b) * b for (a, _), b in zip(box, d.block)) if d.kind == "fp8" else \
                tuple(a * b for (a, _), b in zip(box, d.block))
            bhi = tuple(min(-(-e // b) * b, n) for (_, e), b, n in zip(box, d.block, plan.src.tensors[si].shape)) \
                if d.kind == "fp8" else tuple(min(e * b, n) for (_, e), b, n in zip(box, d.block, plan.src.tensors[si].shape))
            x = _gen_tensor(plan.src.tensors[si], si, 1, tuple(zip(blo, bhi)))
            q, sc = weights.quantize_fp8(x, d.block)
            if d.kind == "scale":
                if not np.allclose(arr, sc, rtol=1e-6):
                    return False
                continue
            crop = tuple(slice(a - o, e - o) for (a, e), o in zip(box, blo))
            q, xc = q[crop], x.astype(np.float32)[crop]
            if np.array_equal(arr.view(np.uint8), np.ascontiguousarray(q).view(np.uint8)):
                continue
            s_full = sc
            for dd, b in enumerate(d.block):
                s_full = np.repeat(s_full, b, axis=dd)
            s_full = s_full[tuple(slice(0, n) for n in x.shape)][crop]
            err = np.abs(arr.astype(np.float32) * s_full - xc)
            if not (err <= np.maximum(np.abs(xc) * 2.0 ** -4, s_full * 2.0 ** -10) * 1.0001 + 1e-30).all():
                return False
    return True


class _Workers:
    def __init__(self, n_pub: int, n_sub: int, envs_pub: list[dict], envs_sub: list[dict]):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.procs, self.pubs, self.subs = [], [], []
        for role, n, envs, lst in (("pub", n_pub, envs_pub, self.pubs), ("sub", n_sub, envs_sub, self.subs)):
            for r in range(n):
                a, b = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(role, r, envs[r], b), daemon=True)
                p.start()
                self.procs.append(p)
                lst.append(a)

    @staticmethod
    def ask(conn: Any, msg: tuple, timeout: float = 900.0) -> tuple:
        conn.send(msg)
        if not conn.poll(timeout):
            raise TimeoutError(f"worker: no answer to {msg[0]} within {timeout} s")
        out = conn.recv()
        if out[0] == "error":
            raise RuntimeError(out[1])
        return out

    def close(self) -> None:
        import signal

        for c in self.pubs + self.subs:
            try:
                c.send(("quit",))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)


def run_config(w: _Workers, cfg: dict, verify: bool = True) -> dict:
    """One configuration: connect, one warm-up push (compiles the stager), then timed pushes."""
    pubs, subs = w.pubs[:cfg["src"]], w.subs[:cfg["dst"]]
    addrs = [w.ask(c, ("config", cfg))[1] for c in subs]
    for c in pubs:
        w.ask(c, ("config", cfg))
    for c in subs:
        w.ask(c, ("peers", addrs))
    for c in pubs:
        w.ask(c, ("connect", addrs))
    times, stage, ok, mem = [], [], True, {}
    nbytes = 0
    for v in range(cfg["rounds"] + 1):
        for c in subs:
            c.send(("wait", v, verify and v == 0 and cfg["total"] <= 4 * GiB))
        for c in pubs:
            c.send(("push", v))
        pushed = [_recv(c) for c in pubs]
        landed = [_recv(c) for c in subs]
        t = max(x[1] for x in landed) - min(x[1] for x in pushed)
        ok &= all(x[2] is not False for x in landed)
        if v > 0:  # round 0 compiles the stager and warms the connections
            times.append(t)
            stage.append(max(x[4] for x in pushed))
        nbytes = sum(x[3] for x in pushed)
        mem = {"hwm_growth_max": max(x[5]["hwm_growth"] for x in pushed),
               "gpu_peak": [x[5]["gpu_peak"] for x in pushed], "gpu_in_use_before": [x[5]["gpu_in_use0"] for x in pushed]}
        _progress(f"  {cfg['name']}: round {v} {t * 1e3:.1f} ms" + (" (warm-up)" if v == 0 else ""))
    for c in pubs + subs:
        w.ask(c, ("end",))
    med = float(np.median(times))
    return {"name": cfg["name"], "wire_bytes": nbytes, "param_bytes": cfg["total"], "seconds": med,
            "seconds_all": times, "wire_GBps": nbytes / med / 1e9, "param_GBps": cfg["total"] / med / 1e9,
            "stage_seconds": float(np.median(stage)), "verified": bool(ok), "memory": mem,
            "staging_bytes": cfg["staging"], "config": cfg}


def _recv(conn: Any, timeout: float = 900.0) -> tuple:
    if not conn.poll(timeout):
        raise TimeoutError(f"worker: no answer within {timeout} s")
    out = conn.recv()
    if out[0] == "error":
        raise RuntimeError(out[1])
    return out


def raw_baseline(size: int, count: int, rounds: int = 3, timeout: float = 300.0) -> dict:
    """GB/s of the raw libfabric fi_writemsg loop (bench.fabric's raw_fabric_bench) moving ``count``
    writes of ``size`` bytes, 64 in flight: median and best of ``rounds`` runs (loopback on these
    VMs flips between a fast and a slow state per process pair; see bench.fabric)."""
    from jax_garden.bench import fabric as fb

    plan = [{"kind": "bw", "size": int(size), "count": int(count), "window": 64}]
    ns = argparse.Namespace(timeout=timeout, seed=1234, pin_cpus=None)
    vals = []
    for _ in range(rounds):
        m = fb.metrics_from_records(fb.run_system("raw", plan, ns))
        g = m.get(("write", int(size)), {}).get("gbps")
        if g:
            vals.append(g)
    return {"median": float(np.median(vals)) if vals else None, "best": max(vals, default=None), "runs": vals}


def _xfer_server(conn: Any, nbytes: int, rounds: int) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        import jax
        import jax.numpy as jnp
        from jax.experimental import transfer

        srv = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"])
        arrays = [jnp.ones((nbytes // 8 // 2,), jnp.bfloat16) for _ in range(8)]
        jax.block_until_ready(arrays)
        conn.send(("address", srv.address()))
        for v in range(rounds + 1):
            conn.recv()
            srv.await_pull(v, arrays)
            conn.send(("armed",))
        conn.recv()
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _xfer_client(conn: Any, nbytes: int, rounds: int, address: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        import jax
        import jax.numpy as jnp
        from jax.experimental import transfer

        srv = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"])
        c = srv.connect(address)
        spec = jax.ShapeDtypeStruct((nbytes // 8 // 2,), jnp.bfloat16,
                                    sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        times = []
        for v in range(rounds + 1):
            conn.send(("go", v))
            conn.recv()
            t0 = time.perf_counter()
            out = c.pull(v, [spec] * 8)
            jax.block_until_ready(out)
            if v:
                times.append(time.perf_counter() - t0)
        conn.send(("times", times))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))


def jax_transfer_baseline(nbytes: int, rounds: int) -> dict:
    """jax.experimental.transfer between two CPU processes on 127.0.0.1: the receiver pulls 8 arrays
    of nbytes/8 that the sender armed with await_pull."""
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    srv = ctx.Process(target=_xfer_server, args=(b, nbytes, rounds), daemon=True)
    srv.start()
    cli = None
    try:
        addr = _recv(a, 120)[1]
        c1, c2 = ctx.Pipe()
        cli = ctx.Process(target=_xfer_client, args=(c2, nbytes, rounds, addr), daemon=True)
        cli.start()
        while True:
            msg = _recv(c1, 300)
            if msg[0] == "times":
                break
            a.send(("arm",))
            _recv(a, 120)
            c1.send(("armed",))
        a.send(("done",))
        t = float(np.median(msg[1]))
        return {"seconds": t, "GBps": nbytes / t / 1e9}
    finally:
        for p in (srv, cli):
            if p is not None:
                p.join(timeout=5)
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)


def cpu_rows(args: argparse.Namespace) -> dict:
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    rows, baselines, errors = [], {}, []
    w = _Workers(2, 2, [env, env], [env, env])
    try:
        for cfg in bench_configs(args.quick, gpu=False):
            _progress(f"{cfg['name']}: {cfg['total'] / MiB:.0f} MiB of params, {cfg['rounds']} timed pushes")
            try:
                rows.append(run_config(w, cfg))
            except Exception as e:  # noqa: BLE001 - reported; the other rows still run
                errors.append(f"{cfg['name']}: {e}")
                _progress(f"  FAILED: {e}")
    finally:
        w.close()
    # Same-run baselines: raw libfabric moving the same bytes in writes of the same size.
    for row in rows:
        cfg = row["config"]
        if cfg["direct"] < (1 << 40) and cfg["layout"] == "same":
            size = cfg["total"] // 8  # one direct write per tensor
        else:
            size = cfg["chunk"] if not cfg["fp8"] else cfg["chunk"]
        count = max(16, (128 * MiB if args.quick else 512 * MiB) // size)  # enough bytes for a stable rate
        key = (size, count)
        if key not in baselines:
            _progress(f"raw libfabric baseline: {count} writes of {size / MiB:.1f} MiB, 3 runs")
            try:
                baselines[key] = raw_baseline(size, count)
            except Exception as e:  # noqa: BLE001
                errors.append(f"raw baseline {size}: {e}")
                baselines[key] = {"median": None, "best": None}
        raw = baselines[key]
        row["raw_GBps"] = raw["median"]
        row["raw_best_GBps"] = raw["best"]
        row["raw_write_bytes"] = size
        row["ratio_vs_raw"] = row["wire_GBps"] / raw["median"] if raw["median"] else None
        best_engine = row["wire_bytes"] / min(row["seconds_all"]) / 1e9
        row["ratio_best_vs_raw_best"] = best_engine / raw["best"] if raw["best"] else None
    _progress("jax.experimental.transfer baseline (two CPU processes)")
    try:
        xfer = jax_transfer_baseline(64 * MiB if args.quick else 256 * MiB, 2 if args.quick else 3)
    except Exception as e:  # noqa: BLE001
        xfer = None
        errors.append(f"jax.experimental.transfer: {e}")
    for row in rows:
        row["ratio_vs_jax_transfer"] = row["param_GBps"] / xfer["GBps"] if xfer else None
    return {"rows": rows, "jax_transfer": xfer, "errors": errors}


def host_costs() -> dict:
    """Per-call host costs that the K2 host-work estimate multiplies: one scatter call and one target
    of it (engine on tcp, 127.0.0.1), one batched stage call (jax on CPU)."""
    import jax
    import jax.numpy as jnp
    from jax_garden import fabric, weights

    a = fabric.TransferEngine(provider="tcp")
    b = fabric.TransferEngine(provider="tcp")
    try:
        src = np.ones(16 << 20, np.uint8)
        dst = np.zeros(16 << 20, np.uint8)
        rs, rd = a.register(src), b.register(dst)
        d = rd.descriptor
        out = {}
        posted = 0
        # Publisher posts prepared lists (fabric.ScatterTargets, built at connect); a plain list is
        # converted and checked per call. Best of 5 rounds of 50 calls each.
        for name, prepare in (("", fabric.ScatterTargets), ("_list", list)):
            res = {}
            for n in (1, 256):
                tl = prepare([(d, 4096, i * 4096, i * 4096) for i in range(n)])
                best = math.inf
                for _ in range(5):
                    ts, t0 = [], time.perf_counter()
                    for _ in range(50):
                        ts.append(a.scatter(rs, tl, imm=1))
                    best = min(best, (time.perf_counter() - t0) / 50)
                    for t in ts:
                        t.wait(60)
                    posted += 50 * n
                res[n] = best
            per_target = (res[256] - res[1]) / 255
            out[f"per_scatter{name}_us"] = max(0.0, res[1] - per_target) * 1e6
            out[f"per_target{name}_us"] = per_target * 1e6
        b.imm_counter(1).wait(posted, 60)
        # stage calls: a plain copy (NumPy slots on CPU) and a jitted fp8 group (what GPUs and every
        # transform dispatch), one 512 KiB chunk each, compiled beforehand
        for name, dst in (("copy", weights.TensorSpec((64, 4096), "bfloat16", None)),
                          ("fp8", weights.fp8_spec((64, 4096), None, None, (64, 128)))):
            lay = weights.Layout.from_pytree({"w": weights.TensorSpec((64, 4096), "bfloat16", None)})
            plan = weights.Plan(lay, weights.Layout.from_pytree({"w": dst}), chunk_bytes=1 << 20,
                                direct_min_bytes=1 << 40)
            chunk = plan.chunks_of(0)[0]
            ring = weights._StagingRing(a, jax.devices()[0], 2, 1 << 20)
            srcs = {(0, 0): jnp.ones((64, 4096), jnp.bfloat16)}
            ring.stage(0, chunk, srcs)
            t0 = time.perf_counter()
            for _ in range(50):
                ring.stage(0, chunk, srcs)
            out[f"stage_call_{name}_us"] = (time.perf_counter() - t0) / 50 / len(weights._stage_groups(chunk)) * 1e6
        # The dispatch alone: the device scheme (what GPUs run) on a 16 KiB fp8 group, so that the
        # CPU's own compute of the quantization (on a GPU: a kernel the host does not wait for
        # while dispatching) hardly counts. Prepared calls, as from a publisher's second push on.
        lay = weights.Layout.from_pytree({"w": weights.TensorSpec((64, 128), "bfloat16", None)})
        plan = weights.Plan(lay, weights.Layout.from_pytree({"w": weights.fp8_spec((64, 128), None, None, (64, 128))}),
                            chunk_bytes=1 << 20, direct_min_bytes=1 << 40)
        chunk = plan.chunks_of(0)[0]
        ring = weights._StagingRing(a, jax.devices()[0], 2, 1 << 20, host=False)
        srcs = {(0, 0): jnp.ones((64, 128), jnp.bfloat16)}
        best = math.inf
        for _ in range(5):
            ring.dispatch_seconds, ring.dispatch_calls = 0.0, 0
            for _ in range(50):
                ring.stage(0, chunk, srcs)
            best = min(best, ring.dispatch_seconds / ring.dispatch_calls)
        out["stage_dispatch_fp8_us"] = best * 1e6
        out["per_stage_call_us"] = out["stage_dispatch_fp8_us"]
        return out
    finally:
        a.close()
        b.close()


def print_rows(result: dict) -> None:
    head = (f"{'row':<36} {'param GB/s':>10} {'wire GB/s':>9} {'ms':>8} {'raw GB/s':>9} {'ratio':>6} "
            f"{'best/best':>9} {'ok':>3}")
    print(head)
    print("-" * len(head))
    for r in result.get("rows", []):
        base = r.get("raw_GBps") or r.get("baseline_GBps")
        ratio = r.get("ratio_vs_raw") or r.get("ratio")
        bb = r.get("ratio_best_vs_raw_best")
        print(f"{r['name']:<36} {r['param_GBps']:10.2f} {r['wire_GBps']:9.2f} {r['seconds'] * 1e3:8.1f} "
              f"{(f'{base:.2f}' if base else '-'):>9} {(f'{ratio:.2f}x' if ratio else '-'):>6} "
              f"{(f'{bb:.2f}x' if bb else '-'):>9} {'yes' if r['verified'] else 'NO':>3}")
    print("param GB/s: bf16 parameter bytes / push time (first push call -> last subscriber has the version in "
          "service); wire GB/s: bytes written / push time; raw: bench.fabric's raw libfabric loop, same write size; "
          "ratio: wire / raw (medians), best/best: best rounds; ok: contents checked bitwise")
    x = result.get("jax_transfer")
    if x:
        print(f"{'jax.experimental.transfer 1->1 (pull)':<36} {x['GBps']:10.2f} {x['GBps']:9.2f} {x['seconds'] * 1e3:8.1f}")
        for r in result.get("rows", []):
            if r.get("ratio_vs_jax_transfer"):
                print(f"  {r['name']}: {r['ratio_vs_jax_transfer']:.2f}x jax.experimental.transfer")
    for r in result.get("rows", []):
        m = r.get("memory", {})
        if m.get("hwm_growth_max") is not None:
            print(f"  {r['name']}: publisher peak RSS grew {m['hwm_growth_max'] / MiB:.1f} MiB during pushes "
                  f"(staging bound {r['staging_bytes'] / MiB:.0f} MiB)")
    c = result.get("host_costs")
    if c:
        print(f"host costs: scatter call {c['per_scatter_us']:.1f} us + {c['per_target_us']:.2f} us per prepared target "
              f"(plain list: {c['per_scatter_list_us']:.1f} us + {c['per_target_list_us']:.2f} us per target); "
              f"stage call: NumPy copy {c['stage_call_copy_us']:.1f} us, jitted fp8 group {c['stage_call_fp8_us']:.1f} us "
              f"(dispatch + wait, 512 KiB); dispatch of a prepared 16 KiB fp8 group {c['stage_dispatch_fp8_us']:.1f} us")
    for e in result.get("errors", []):
        print(f"error: {e}")
    for n in result.get("notes", []):
        print(f"note: {n}")


# ---------------------------------------------------------------------------------------------
# main


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jax_garden.bench weights", description=__doc__.split("\n")[0])
    p.add_argument("--simulate", choices=("k2",), help="plan-only simulation at scale (CPU, no engines)")
    p.add_argument("--quick", action="store_true", help="small sizes, finishes in well under a minute")
    p.add_argument("--json", default=None, help="write results here (default bench_results/weights*.json)")
    p.add_argument("--chunk-bytes", type=int, default=256 * MiB, help="plan chunk size for --simulate")
    p.add_argument("--staging-bytes", type=int, default=2 * GiB, help="staging per sender for --simulate")
    p.add_argument("--direct-min-bytes", type=int, default=4 * MiB)
    # Default (None): measured in the same run on this machine (host_costs: engines on 127.0.0.1).
    p.add_argument("--per-scatter-us", type=float, default=None,
                   help="host cost of one scatter call for the simulated host work (default: measured here)")
    p.add_argument("--per-target-us", type=float, default=None,
                   help="host cost per prepared scatter target (default: measured here)")
    p.add_argument("--per-stage-call-us", type=float, default=None,
                   help="host cost of dispatching one batched stage call (default: measured here, jax on CPU)")
    p.add_argument("--layers", type=int, default=K2["layers"], help="transformer layers for --simulate (K2: 61)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU rows")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU/tcp rows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.simulate:
        r = simulate_k2(args)
        print_simulation(r)
        path = write_json(args.json or "bench_results/weights_simulate_k2.json", {"benchmark": "weights-simulate-k2", **r},
                          simulation_headline(r))
        print(f"wrote {path}", file=sys.stderr)
        return 0
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    t0 = time.monotonic()
    result: dict = {"benchmark": "weights", "quick": args.quick, "notes": []}
    if not args.no_cpu:
        result.update(cpu_rows(args))
        _progress("host costs per call")
        result["host_costs"] = host_costs()
    if not args.no_gpu:
        from jax_garden.bench import weights_gpu

        result["gpu"] = weights_gpu.gpu_rows(args)
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    print_rows(result)
    if result.get("gpu"):
        weights_gpu.print_gpu(result["gpu"])
    path = write_json(args.json or "bench_results/weights.json", result, headline(result))
    print(f"wrote {path}", file=sys.stderr)
    return 1 if result.get("errors") else 0


def simulation_headline(r: dict) -> dict[str, float]:
    """Host work per push against its 10 ms goal, and each network's predicted push against the
    busiest receiver's bound and Perplexity's reported time."""
    out = {"host work ms busiest sender": round(r["host_work_busiest_sender"]["estimate_ms"], 3)}
    for n in r["network"]:
        out[f"{n['label']} push / receiver bound"] = round(n["ratio_to_receiver_bound"], 4)
        out[f"{n['label']} push / Perplexity K2"] = round(n["seconds"] / n["perplexity_s"], 4)
    return out


def headline(result: dict) -> dict[str, float]:
    """The same-run ratios .ci/gpu_verify.sh prints: per CPU row the engine against the raw
    libfabric loop and jax.experimental.transfer; per GPU row against the peer-copy floor and each
    single-process baseline."""
    out: dict[str, float] = {}
    for r in result.get("rows", []):
        for k in ("ratio_vs_raw", "ratio_vs_jax_transfer"):
            if r.get(k):
                out[f"{r['name']} {k}"] = round(r[k], 3)
    for r in (result.get("gpu") or {}).get("rows", []):
        if r.get("ratio_vs_floor"):
            out[f"{r['name']} vs peer-copy floor"] = round(r["ratio_vs_floor"], 4)
        for k, v in (r.get("speedup_vs") or {}).items():
            if v:
                out[f"{r['name']} speed-up vs {k}"] = round(v, 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
