"""``bench weights --simulate k2``: the plan for Kimi-K2-like shapes (no engines), the push time the
schedule implies (a max-min-fair fluid model), and one push's host work on the busiest sender."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

from jax_garden.bench.weights_rig import host_costs, progress
from jax_garden.bench.weights_workloads import K2, k2_specs, k2_tensors

PERPLEXITY_K2_SECONDS = 1.3


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
    from jax_garden.weights.plan import stage_groups

    chunks = plan.chunks_of(rank)

    t0 = time.perf_counter()
    scatters = targets = stage_calls = 0
    grants = {r: (0, 1) for r in plan.destinations_of(rank)}
    for c in chunks:
        ranks = [r for r in c.rank_targets if r in grants]
        if c.staged:
            stage_calls += len(stage_groups(c))
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

    progress("building K2 specs (256 trainer ranks FSDP -> 128 inference ranks, 8 x (EP/TP 16))")
    cfg = dict(K2, layers=args.layers)
    src, dst = k2_specs(cfg=cfg)
    t0 = time.perf_counter()
    src_l = weights.Layout.from_pytree(src)
    dst_l = weights.Layout.from_pytree(dst)
    t_layout = time.perf_counter() - t0
    t1 = time.perf_counter()
    plan = weights.Plan(src_l, dst_l, chunk_bytes=args.chunk_bytes, direct_min_bytes=args.direct_min_bytes)
    t_plan = time.perf_counter() - t1
    progress(f"plan built in {t_plan:.2f} s (layouts {t_layout:.2f} s)")
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
        progress("measuring per-call host costs on this machine (tcp engines on 127.0.0.1, jax CPU)")
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
        progress(f"fluid model at {label} ({gpu_bps / 1e9:.2f} GB/s per GPU)")
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


def simulation_headline(r: dict) -> dict[str, float]:
    """Host work per push against its 10 ms goal, and each network's predicted push against the
    busiest receiver's bound and Perplexity's reported time."""
    out = {"host work ms busiest sender": round(r["host_work_busiest_sender"]["estimate_ms"], 3)}
    for n in r["network"]:
        out[f"{n['label']} push / receiver bound"] = round(n["ratio_to_receiver_bound"], 4)
        out[f"{n['label']} push / Perplexity K2"] = round(n["seconds"] / n["perplexity_s"], 4)
    return out
