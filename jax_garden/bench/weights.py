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
import os
import sys
import time

from jax_garden.bench._harness import write_json
from jax_garden.bench.weights_rig import cpu_rows, format_phases, host_costs, progress, standing_note
from jax_garden.bench.weights_sim import print_simulation, simulate_k2, simulation_headline
from jax_garden.bench.weights_workloads import GiB, K2, MiB


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
        if r.get("phases_ms"):  # median over the timed pushes, ms from the first push call
            print(f"  {r['name']}: phases (ms from push) {format_phases(r['phases_ms'])}{standing_note(r)}")
        if r.get("host_work_ms"):
            print(f"  {r['name']}: publisher host work (ms) {format_phases(r['host_work_ms'])}")
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
        progress("host costs per call")
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
