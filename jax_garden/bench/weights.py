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
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

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
    src, dst = k2_specs()
    t0 = time.perf_counter()
    src_l = weights.Layout.from_pytree(src)
    dst_l = weights.Layout.from_pytree(dst)
    t_layout = time.perf_counter() - t0
    t1 = time.perf_counter()
    plan = weights.Plan(src_l, dst_l, chunk_bytes=args.chunk_bytes, direct_min_bytes=args.direct_min_bytes)
    t_plan = time.perf_counter() - t1
    _progress(f"plan built in {t_plan:.2f} s (layouts {t_layout:.2f} s)")
    blob = plan.to_bytes()
    st = plan.stats()
    params = sum(math.prod(s) for _, s, _ in k2_tensors())
    fp8_params = sum(math.prod(s) for _, s, q in k2_tensors() if q)
    busiest_src = int(np.argmax(st["bytes_per_src"]))
    costs = dict(per_scatter_us=args.per_scatter_us, per_target_us=args.per_target_us,
                 per_stage_call_us=args.per_stage_call_us)
    hw = host_work_estimate(plan, busiest_src, **costs)
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
        "staging_bytes": args.staging_bytes, "plan_build_s": t_plan, "layout_build_s": t_layout,
        "plan_bytes": len(blob), "chunks": st["chunks"], "items": st["items"],
        "bytes_per_sender": {"max": int(st["bytes_per_src"].max()), "mean": float(st["bytes_per_src"].mean())},
        "bytes_per_receiver": {"max": int(st["bytes_per_dst"].max()), "mean": float(st["bytes_per_dst"].mean())},
        "writes_per_sender": {"max": int(st["writes_per_src"].max()), "mean": float(st["writes_per_src"].mean())},
        "stage_calls_per_sender": {"max": int(st["stage_calls_per_src"].max())},
        "scatters_per_sender": {"max": int(st["scatters_per_src"].max())},
        "host_work_busiest_sender": hw, "host_work_most_writes_sender": hw_t, "host_work_costs_us": costs,
        "network": nets, "fingerprint": plan.fingerprint,
        "goals": {"plan_build_s": "<= 5", "host_work_ms": "<= 10", "push_vs_receiver_bound": "<= 1.10"},
    }
    return out


def print_simulation(r: dict) -> None:
    G = 1e9
    print(f"K2-like push plan: {r['params'] / 1e12:.3f} T params ({r['fp8_params'] / 1e12:.3f} T in fp8), "
          f"{r['tensors_src']} -> {r['tensors_dst']} tensors, {r['src_ranks']} -> {r['dst_ranks']} ranks")
    print(f"  plan build      {r['plan_build_s']:.2f} s (goal <= 5 s; layouts {r['layout_build_s']:.2f} s)")
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
    print(f"    (per-call costs: scatter {costs['per_scatter_us']} us, target {costs['per_target_us']} us, stage call "
          f"{costs['per_stage_call_us']} us)")
    for n in r["network"]:
        print(f"  {n['label']:<18} ({n['gpu_GBps']:.2f} GB/s per GPU): predicted push {n['seconds']:.3f} s; busiest "
              f"receiver bound {n['receiver_bound_s']:.3f} s (x{n['ratio_to_receiver_bound']:.3f}, goal <= 1.10); "
              f"sender bound {n['sender_bound_s']:.3f} s; Perplexity K2: {n['perplexity_s']} s")


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
    p.add_argument("--per-scatter-us", type=float, default=10.0,
                   help="host cost of one scatter call, for the simulated host work (measure it with the CPU run)")
    p.add_argument("--per-target-us", type=float, default=1.0, help="host cost per scatter target")
    p.add_argument("--per-stage-call-us", type=float, default=30.0, help="host cost of one batched stage call")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.simulate:
        r = simulate_k2(args)
        print_simulation(r)
        path = Path(args.json or "bench_results/weights_simulate_k2.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmark": "weights-simulate-k2", **r}, indent=1, default=_json) + "\n")
        print(f"wrote {path}", file=sys.stderr)
        return 0
    raise SystemExit("measured rows: not written yet")


def _json(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o).__name__)


if __name__ == "__main__":
    sys.exit(main())
