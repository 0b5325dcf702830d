"""``python -m jax_garden.bench moe --nodes N`` on GPUs: MoE dispatch/combine in node groups of one
rank (the proxy context: the CUDA kernels pack messages, a host proxy thread per process posts them
through a tcp TransferEngine that moves GPU memory by its default path, CUDA IPC on one host), N
processes sharing the GPUs when there are fewer than N (one GPU: N processes on it), in one run
with:

  * the same processes as one node group (the NVLink context over CUDA IPC, no proxy, no engine);
  * plain engine writes of the same bytes between the same processes (GPU buffers, one write with
    an imm per peer and phase, completion by imm count: jax_garden/bench/moe_nodes.py's engine
    wire on GPU memory): what the engine's path costs for these bytes without the MoE protocol.

Method: per process, the chain of back-to-back dispatch -> combine pairs of bench moe --ladder
(jax_garden/bench/moe_ladder.py: device timers, the first pairs dropped, the oracle checked); the
engine writes with host clocks (steady clock), the mean bytes per message the proxy posted. The
proxy's added time per phase = the phase's p50 through the proxy - the engine writes' p50 for the
same bytes (goal: <= 15 us per phase over the ipc path on one host). Processes sharing a GPU are
time-sliced, so these rows check the protocol's costs, not NVLink bandwidth.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from jax_garden.bench._harness import BenchError, Child, Progress, child_env, print_table, write_json


def _worker(args) -> dict:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.nodes,
                               process_id=args.process, local_device_ids=[args.process % args.gpus],
                               initialization_timeout=120)
    import numpy as np
    from jax.sharding import Mesh

    from jax_garden import _compat, _moe_cuda, moe
    from jax_garden.bench import moe_ladder, moe_nodes

    mesh = Mesh(np.array(jax.devices()[: args.nodes]), ("ep",))
    client = _compat.distributed_client()
    ordinal = _moe_cuda.cuda_ordinal(jax.local_devices()[0])
    rows = []
    internode = moe.InternodeConfig(provider="tcp", path=args.path)
    for t in (int(x) for x in args.tokens.split(",")):
        proxied = moe_ladder.measure(mesh, args.shape, t, "bf16", args.iters, args.recv_factor, node_size=1,
                                     internode=internode)
        proxied["impl"] = f"node groups (proxy, path {args.path})"
        rows.append(proxied)
        print(f"PROGRESS {t} tokens: node groups done", flush=True)
        one = moe_ladder.measure(mesh, args.shape, t, "bf16", args.iters, args.recv_factor)
        one["impl"] = "one node (NVLink context, CUDA IPC)"
        rows.append(one)
        print(f"PROGRESS {t} tokens: one node done", flush=True)
        posts = next(iter(proxied["proxy_posts"].values()))
        per_msg = {k: (b / n if n else 0) for k, (n, b) in posts.items()}
        d_bytes, c_bytes = int(per_msg["dispatch"]), int(per_msg["combine"])
        wire = moe_nodes._EngineWire(args.process, args.nodes, client, max(d_bytes, c_bytes, 1) * 2, f"gpu{t}",
                                     gpu_device=ordinal)
        try:
            w = moe_nodes._measure_wire(wire, client, f"gpu{t}", d_bytes, c_bytes, args.iters)
        finally:
            client.wait_at_barrier(f"jg_bench_gpu_ewire_done/{t}", 120_000)  # no engine closes under a peer's writes
            wire.close()
        rows.append({"impl": "engine writes (same bytes)", "shape": args.shape, "tokens": t, "dtype": "bf16",
                     "ranks": args.nodes, "phases": {k: w[k] for k in ("dispatch", "combine", "round_trip")},
                     "bytes_per_message": {"dispatch": d_bytes, "combine": c_bytes}, "oracle_errors": []})
        print(f"PROGRESS {t} tokens: engine writes done", flush=True)
    return {"rows": rows, "device": jax.devices()[0].device_kind}


def summarize(result: dict) -> dict:
    """The proxy's added time per phase over plain engine writes of the same bytes, and over the
    one-node context, per token count; returns the headline."""
    headline = {}
    by = {}
    for row in result["rows"]:
        kind = row["impl"].split(" ")[0]  # node / one / engine
        by[(kind, row["tokens"])] = row
    for t in sorted({r["tokens"] for r in result["rows"]}):
        net, one, eng = by.get(("node", t)), by.get(("one", t)), by.get(("engine", t))
        ratio = {}
        for ph in ("dispatch", "combine"):
            if net and eng:
                added = net["phases"][ph]["p50_us"] - eng["phases"][ph]["p50_us"]
                ratio[f"{ph}_added_over_engine_writes_us"] = added
                ratio[f"goal_{ph}_added_le_15us"] = added <= 15.0
                headline[f"nodes{result['nodes']} {t}tok {ph} added over engine writes us"] = added
            if net and one:
                ratio[f"{ph}_vs_one_node"] = net["phases"][ph]["p50_us"] / one["phases"][ph]["p50_us"]
        if net:
            headline[f"nodes{result['nodes']} {t}tok period us"] = net["phases"]["period"]["p50_us"]
        result["ratios"][str(t)] = ratio
    headline["nodes oracle ok"] = not any(r.get("oracle_errors") for r in result["rows"])
    return headline


TABLE = [("impl", 38, "<"), ("tok", 4, ">"), ("dispatch", 9, ">"), ("combine", 9, ">"), ("period", 8, ">"),
         ("round trip", 10, ">"), ("oracle", 6, "<")]


def print_report(result: dict) -> None:
    print(f"\nMoE in node groups on GPUs: {result['nodes']} processes on {result['gpus']} GPU(s) ({result['device']}), "
          f"{result['shape']} H=7168 bf16; µs p50 (device timers; engine writes: host clocks)")
    cells = []
    for row in result["rows"]:
        p = row["phases"]
        cells.append([row["impl"], row["tokens"], f"{p['dispatch']['p50_us']:.1f}", f"{p['combine']['p50_us']:.1f}",
                      f"{p['period']['p50_us']:.1f}" if "period" in p else "",
                      f"{p['round_trip']['p50_us']:.1f}", "FAIL" if row.get("oracle_errors") else "ok"])
    print_table(TABLE, cells)
    for key, ratio in result["ratios"].items():
        print(f"  {key} tokens: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in ratio.items()))
    for e in result["errors"]:
        print(f"  error: {e}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jax_garden.bench moe --nodes (GPU)", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2, help="processes = node groups of one rank (2..8)")
    ap.add_argument("--tokens", default="1,128", help="tokens per rank, comma-separated")
    ap.add_argument("--shape", default="256x8", help="experts x top-k (hidden 7168)")
    ap.add_argument("--iters", type=int, default=None, help="pairs per chain (default 100, --quick 40)")
    ap.add_argument("--recv-factor", type=float, default=1.5)
    ap.add_argument("--path", default="auto", choices=("auto", "ipc", "staged", "fabric"),
                    help="the engine's path for GPU memory")
    ap.add_argument("--quick", action="store_true", help="128 tokens only, 40 pairs")
    ap.add_argument("--out", "--json", dest="out", default="moe_nodes_gpu_bench.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--process", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--gpus", type=int, default=1, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    ap = _parser()
    args, _unknown = ap.parse_known_args(argv)
    if args.quick and args.tokens == "1,128":
        args.tokens = "128"
    args.iters = args.iters if args.iters is not None else (40 if args.quick else 100)
    if args.worker:
        try:
            out = _worker(args)
        except Exception as e:  # noqa: BLE001 - the parent reports it
            import traceback

            traceback.print_exc()
            out = {"rows": [], "error": f"{type(e).__name__}: {e}"}
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    if not 2 <= args.nodes <= 8:
        ap.error(f"--nodes must be in 2..8, got {args.nodes}")
    if args.iters <= 10:
        ap.error(f"--iters must be > 10 (the first 5 pairs are dropped), got {args.iters}")
    from jax_garden._jax_garden import fabric as native_fabric

    gpus = min(args.nodes, int(native_fabric.gpu_device_count()))
    result = {"benchmark": "moe --nodes (GPU)", "nodes": args.nodes, "gpus": gpus, "shape": args.shape,
              "tokens": args.tokens, "iters": args.iters, "path": args.path, "device": "",
              "method": __doc__.split("Method:", 1)[1].strip(), "rows": [], "ratios": {}, "errors": []}
    progress = Progress(sys.stdout)
    env = child_env()
    env.update({"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1",
                "XLA_FLAGS": "--xla_gpu_shard_autotuning=false"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forward = ["--nodes", str(args.nodes), "--tokens", args.tokens, "--shape", args.shape, "--iters",
               str(args.iters), "--recv-factor", str(args.recv_factor), "--path", args.path, "--gpus", str(gpus)]
    children = [Child([sys.executable, "-m", "jax_garden.bench.moe_nodes_gpu", "--worker", "--process", str(i),
                       "--port", str(port), *forward], f"process {i}", env=env) for i in range(args.nodes)]
    timeout = 300 + args.iters * len(args.tokens.split(","))
    reports = []
    try:
        deadline = time.monotonic() + timeout
        for c in children:
            while True:
                line = c.line(max(1.0, deadline - time.monotonic()))
                if line.startswith("RESULT "):
                    reports.append(json.loads(line[7:]))
                    break
                if line.startswith("PROGRESS "):
                    progress.timed(f"{c.name}: {line[9:].strip()}")
        for c in children:
            c.finish(deadline)
    except BenchError as e:
        result["errors"].append(str(e))
    finally:
        for c in children:
            c.kill()
    for i, rep in enumerate(reports):
        if rep.get("error"):
            result["errors"].append(f"process {i}: {rep['error']}")
        for row in rep.get("rows", []):
            result["errors"] += [f"process {i} {row['impl']} {row['tokens']}: {e}" for e in row.get("oracle_errors", [])]
    if reports:
        result["rows"] = reports[0].get("rows", [])  # rank 0's process; the others are in per_process
        result["per_process"] = reports
    result["device"] = next((rep.get("device", "") for rep in reports if rep.get("device")), "")
    headline = summarize(result)
    print_report(result)
    out = write_json(args.out, result, headline)
    print(f"wrote {out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
