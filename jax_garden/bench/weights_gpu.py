"""GPU rows of ``python -m jax_garden.bench weights`` (any GPU count: on one GPU the processes share
it; skipped without a GPU).

Every process sees every GPU and chooses the one its JAX uses (``jax_cuda_visible_devices``), so
the engine maps the other processes' buffers (XLA's, through VMM IPC) and the pushes take the ipc
path. GPU "1" below is GPU 0 again on a one-GPU machine; the floor is then a same-device copy.

* ``gpu 1->1``: a trainer process on GPU0 pushes 1-16 GiB of bf16 params to an inference process on
  GPU1 (same layout: direct writes over CUDA IPC); floor: the driver's copy of the same bytes in
  writes of the same size (``cudaMemcpyPeerAsync`` GPU0 -> GPU1, or ``cudaMemcpyAsync`` on one GPU;
  CUDA events).
* ``gpu 2->2 colocated``: trainer processes on GPU0/GPU1 (FSDP rows) push to inference processes on
  GPU1/GPU0 (tensor-parallel columns): pieces are gathered by the GPU stager into registered
  staging slots and written over IPC (two GPUs: half of each GPU's bytes stay on the GPU, half cross
  NVLink, the floor is the NVLink bytes at the peer-copy rate; one GPU: four processes on it, the
  floor is every byte at the same-device copy rate).
* single-process baselines (one process, no engine): ``jax.device_put`` GPU0 -> GPU1 and FSDP -> TP
  resharding (two GPUs only), ``jax.experimental.transfer`` (server and connection in one process,
  pull onto GPU1, or onto GPU0 with one GPU), and gather-to-one-GPU-then-broadcast (two GPUs).
* extra memory: the publishers' peak GPU memory during pushes minus what they held before, beside
  the staging bound.

Times are wall-clock from the first ``push`` call to the last subscriber seeing the version in
service (``time.monotonic`` is one clock for the processes of a host); baselines are timed with
``block_until_ready`` (jax) or CUDA events (peer copy). GB/s = 1e9 bytes/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import time
from typing import Any

import numpy as np

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _gpu_env(i: int) -> dict:
    """A worker's environment: the GPU its JAX uses (weights_rig applies it with
    jax_cuda_visible_devices; every GPU stays visible to CUDA)."""
    from jax_garden._jax_garden import fabric as native

    return {"JAX_GARDEN_BENCH_GPU": str(i % max(1, native.gpu_device_count())), "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def _single_process_baselines(conn: Any, sizes: list[int], rounds: int) -> None:
    """Both GPUs in this process: device_put, device_put resharding, jax.experimental.transfer,
    gather-then-broadcast, and the copy-engine peer copy."""
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    try:
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
        from jax_garden._jax_garden import fabric as native

        gpus = jax.devices("gpu")
        two = len(gpus) > 1
        g0, g1 = gpus[0], gpus[1 if two else 0]
        if two:
            mesh = Mesh(np.array([g0, g1]), ("x",))
            fsdp, tp, rep = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P(None, "x")), NamedSharding(mesh, P())
        out: dict = {}

        def timed(fn) -> float:
            fn()  # warm-up / compile
            ts = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                ts.append(time.perf_counter() - t0)
            return float(np.median(ts))

        for total in sizes:
            rows = total // (8 * 4096 * 2)
            r: dict = {}
            r["peer_copy_GBps"] = float(native.bench_peer_copy(0, 1 if two else 0, total // 8, max(3, rounds * 2)))
            r["floor_copy"] = "cudaMemcpyPeerAsync GPU0 -> GPU1" if two else "cudaMemcpyAsync on GPU 0"
            if two:  # one GPU: a device_put to the same device moves nothing, and there is no mesh of two
                xs = [jnp.ones((rows, 4096), jnp.bfloat16, device=g0) * (i + 1) for i in range(8)]
                jax.block_until_ready(xs)
                r["device_put_1to1_s"] = timed(lambda: [jax.device_put(x, g1) for x in xs])
                del xs
                fs = [jax.device_put(jnp.ones((rows, 4096), jnp.bfloat16) * (i + 1), fsdp) for i in range(8)]
                jax.block_until_ready(fs)
                r["device_put_reshard_fsdp_to_tp_s"] = timed(lambda: [jax.device_put(x, tp) for x in fs])
                to_tp = jax.jit(lambda x: x, out_shardings=tp)

                def funnel():
                    gathered = [jax.device_put(x, SingleDeviceSharding(g0)) for x in fs]
                    bcast = [jax.device_put(x, rep) for x in gathered]
                    return [to_tp(x) for x in bcast]

                r["gather_then_broadcast_s"] = timed(funnel)
                del fs
            try:
                from jax.experimental import transfer

                srv = transfer.start_transfer_server(g0.client)
                c = srv.connect(srv.address())
                xs = [jnp.ones((rows, 4096), jnp.bfloat16, device=g0) for _ in range(8)]
                spec = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SingleDeviceSharding(g1)) for x in xs]
                uid = [0]

                def pull():
                    uid[0] += 1
                    srv.await_pull(uid[0], xs)
                    return c.pull(uid[0], spec)

                r["jax_transfer_s"] = timed(pull)
                del xs
            except Exception as e:  # noqa: BLE001 - reported plainly
                r["jax_transfer_error"] = f"{type(e).__name__}: {e}"
            out[total] = r
        conn.send(("ok", out))
    except BaseException as e:  # noqa: BLE001
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def gpu_rows(args: argparse.Namespace) -> dict:
    from jax_garden import fabric
    from jax_garden.bench.weights_rig import Workers, progress, run_config
    from jax_garden.bench.weights_workloads import bench_configs

    if not fabric.gpu_available():
        return {"skipped": "no GPU usable by this build (fabric.gpu_available() is false)"}
    from jax_garden._jax_garden import fabric as native

    ngpu = native.gpu_device_count()
    rows, errors = [], []
    configs = bench_configs(args.quick, gpu=True)
    w = Workers(2, 2, [_gpu_env(0), _gpu_env(1)], [_gpu_env(1), _gpu_env(0)])
    try:
        for cfg in configs:
            progress(f"{cfg['name']}: {cfg['rounds']} timed pushes")
            try:
                rows.append(run_config(w, cfg, verify=True))
            except Exception as e:  # noqa: BLE001
                errors.append(f"{cfg['name']}: {e}")
                progress(f"  FAILED: {e}")
    finally:
        w.close()
    sizes = sorted({c["total"] for c in configs})
    progress("single-process baselines (device_put, jax.experimental.transfer, gather+broadcast, peer copy)")
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_single_process_baselines, args=(b, sizes, 2 if args.quick else 3), daemon=True)
    p.start()
    base: dict = {}
    try:
        if a.poll(1800):
            msg = a.recv()
            if msg[0] == "ok":
                base = msg[1]
            else:
                errors.append(f"single-process baselines: {msg[1]}")
        else:
            errors.append("single-process baselines: no answer within 1800 s")
    finally:
        p.join(timeout=10)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
    for r in rows:
        cfg = r["config"]
        bl = base.get(cfg["total"], {})
        total = cfg["total"]
        pc = bl.get("peer_copy_GBps")
        if cfg.get("colocated") and ngpu > 1:
            # Half of every inference shard comes from the other GPU: that half crosses NVLink, in
            # both directions at once; the floor is those bytes at the peer-copy rate.
            floor_s = (r["wire_bytes"] / 2 / 2) / (pc * 1e9) if pc else None
            r["baselines_s"] = {"device_put_reshard": bl.get("device_put_reshard_fsdp_to_tp_s"),
                                "gather_then_broadcast": bl.get("gather_then_broadcast_s")}
        elif cfg.get("colocated"):
            # One GPU shared by all four processes: every byte is a copy within its memory.
            floor_s = r["wire_bytes"] / (pc * 1e9) if pc else None
            r["baselines_s"] = {"device_put_reshard": bl.get("device_put_reshard_fsdp_to_tp_s"),
                                "gather_then_broadcast": bl.get("gather_then_broadcast_s")}
        else:
            floor_s = r["wire_bytes"] / (pc * 1e9) if pc else None
            r["baselines_s"] = {"device_put": bl.get("device_put_1to1_s"), "jax_transfer": bl.get("jax_transfer_s")}
            if bl.get("jax_transfer_error"):
                r["jax_transfer_error"] = bl["jax_transfer_error"]
        r["floor_s"] = floor_s
        r["floor_copy"] = bl.get("floor_copy")
        r["gpus"] = ngpu
        r["ratio_vs_floor"] = floor_s / r["seconds"] if floor_s else None
        r["speedup_vs"] = {k: (v / r["seconds"] if v else None) for k, v in r["baselines_s"].items()}
        gp, g0 = r["memory"].get("gpu_peak") or [], r["memory"].get("gpu_in_use_before") or []
        r["extra_gpu_bytes"] = max((a_ - b_ for a_, b_ in zip(gp, g0) if a_ is not None and b_ is not None), default=None)
        # XLA's peak counts from process start: where no timed push raised it, the figure is the
        # peak of setup and the warm-up push (compiles), an upper bound on what a push needs.
        pb = r["memory"].get("gpu_peak_before") or []
        r["extra_gpu_upper_bound"] = bool(pb) and all(a_ is not None and b_ is not None and a_ <= b_ for a_, b_ in zip(gp, pb))
        r["param_bytes"] = total
    return {"rows": rows, "baselines": base, "errors": errors, "gpus": ngpu,
            "targets": {"vs_peer_copy_floor": ">= 0.8", "vs_jax_transfer": ">= 20x", "extra_memory": "<= staging"}}


def print_gpu(g: dict) -> None:
    from jax_garden.bench.weights_rig import format_phases, standing_note

    if g.get("skipped"):
        print(f"GPU rows skipped: {g['skipped']}")
        return
    head = f"{'row':<44} {'GB/s':>7} {'ms':>8} {'floor ms':>9} {'vs floor':>8}  speed-up vs baselines"
    print(head)
    print("-" * len(head))
    for r in g["rows"]:
        fl = r.get("floor_s")
        sp = ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup_vs"].items() if v)
        print(f"{r['name']:<44} {r['param_GBps']:7.1f} {r['seconds'] * 1e3:8.1f} "
              f"{(f'{fl * 1e3:.1f}' if fl else '-'):>9} {(format(r['ratio_vs_floor'], '.2f') if r.get('ratio_vs_floor') else '-'):>8}  {sp}")
        if r.get("phases_ms"):  # median over the timed pushes, ms from the push call
            print(f"  phases (ms from push): {format_phases(r['phases_ms'])}{standing_note(r)}")
        if r.get("host_work_ms"):  # the slowest publisher's host work, median over the timed pushes
            print(f"  publisher host work (ms): {format_phases(r['host_work_ms'])}")
        if r.get("jax_transfer_error"):
            print(f"  jax.experimental.transfer did not run: {r['jax_transfer_error']}")
        if r.get("extra_gpu_bytes") is not None:
            print(f"  extra GPU memory on the publisher: {r['extra_gpu_bytes'] / MiB:.0f} MiB "
                  f"(staging bound {r['staging_bytes'] / MiB:.0f} MiB)"
                  + (": an upper bound, the peak was reached before the timed pushes" if r.get("extra_gpu_upper_bound") else ""))
    for e in g.get("errors", []):
        print(f"error: {e}")
