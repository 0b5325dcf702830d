"""The measured rows of ``bench weights``: publisher and subscriber worker processes driven by the
parent through pipes, one configuration at a time (connect, a warm-up push, timed pushes), the CPU
rows beside their same-run baselines, and the per-call host costs."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import numpy as np

from jax_garden.bench.baselines import jax_transfer_baseline, raw_baseline, recv
from jax_garden.bench.weights_workloads import GiB, MiB, bench_configs, config_specs, gen_tensor, verify


def progress(msg: str) -> None:
    print(f"[weights] {msg}", file=sys.stderr, flush=True)


def format_phases(phases: dict) -> str:
    """``granted 1.23, posted 4.56, ...``: a push's phase ends, ms from the first push call."""
    return ", ".join(f"{k} {ms:.2f}" for k, ms in phases.items())


def standing_note(row: dict) -> str:
    """``; standing grants used 2/2`` (or ``; asked each push``) for a row's phases line."""
    g = row.get("standing_grants")
    if not g:
        return ""
    return f"; standing grants used {g['used']}/{g['of']}" if g["enabled"] else "; asked each push"


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


def _worker(role: str, rank: int, env: dict, conn: Any) -> None:
    """A publisher or subscriber process: builds each configuration's plan when told, then pushes /
    waits on command, reporting times (time.monotonic is one clock for all processes of a host)."""
    os.environ.update(env)
    try:
        import jax  # noqa: F401  (after the environment is set)

        if os.environ.get("JAX_GARDEN_BENCH_GPU"):  # this worker's GPU; every GPU stays visible to CUDA
            jax.config.update("jax_cuda_visible_devices", os.environ["JAX_GARDEN_BENCH_GPU"])
        from jax_garden import weights

        obj = plan = cfg = params = mem0 = None
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
                                            timeout=300, engine_timeout=60,
                                            standing_grants=cfg.get("standing", True))
                    import jax.numpy as jnp

                    mine = {}
                    for i, t in enumerate(plan.src.tensors):
                        box = next(b for r, l, b in t.shards if r == rank)
                        mine[t.path.strip("[]'")] = jnp.asarray(gen_tensor(t, i, 1, box))
                    jax.block_until_ready(mine)
                    params, mem0 = mine, (_rss_hwm(), _gpu_mem())
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
                    mem0 = (_rss_hwm(), _gpu_mem())
                # In RL a training step separates two pushes: the subscribers' offers (standing
                # grants, made as a version goes into service) are in by then. Not timed.
                dests = plan.destinations_of(rank)
                end = time.monotonic() + 0.5
                while obj.offered != dests and time.monotonic() < end:
                    time.sleep(0.001)
                t0 = time.monotonic()
                h = obj.push(params, cmd[1]).wait(600)
                t1 = time.monotonic()
                (rss0, hwm0), gm0 = mem0
                rss1, hwm1 = _rss_hwm()
                conn.send(("pushed", t0, t1, sum(h.bytes_sent.values()), h.stage_seconds,
                           {"hwm_growth": hwm1 - hwm0, "gpu_peak": _gpu_mem().get("peak"), "gpu_in_use0": gm0.get("in_use"),
                            "gpu_peak0": gm0.get("peak")},
                           {"granted": h.granted_after, "posted": h.posted_after, "complete": h.seconds},
                           (len(h.claimed), len(h.ranks)),
                           {"sources": h.sources_seconds, "register": h.register_seconds,
                            "stage": h.stage_seconds, "scatter": h.scatter_seconds}))
            elif cmd[0] == "wait":
                obj.wait(cmd[1], 600)
                t1 = time.monotonic()
                ok = None
                if cmd[2]:  # verify this rank's shards bitwise against the reference
                    ok = verify(plan, obj, rank)
                conn.send(("landed", t1, ok))
            elif cmd[0] == "end":
                obj.close()
                obj = None
                conn.send(("ok",))
    except BaseException as e:  # noqa: BLE001
        import traceback

        conn.send(("error", f"{role} {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


class Workers:
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


def run_config(w: Workers, cfg: dict, verify: bool = True) -> dict:
    """One configuration: connect, one warm-up push (compiles the stager), then timed pushes."""
    pubs, subs = w.pubs[:cfg["src"]], w.subs[:cfg["dst"]]
    addrs = [w.ask(c, ("config", cfg))[1] for c in subs]
    for c in pubs:
        w.ask(c, ("config", cfg))
    for c in subs:
        w.ask(c, ("peers", addrs))
    for c in pubs:
        w.ask(c, ("connect", addrs))
    times, stage, timeline, host_work, ok, mem, claimed = [], [], [], [], True, {}, [0, 0]
    nbytes = 0
    for v in range(cfg["rounds"] + 1):
        for c in subs:
            c.send(("wait", v, verify and v == 0 and cfg["total"] <= 4 * GiB))
        for c in pubs:
            c.send(("push", v))
        pushed = [recv(c) for c in pubs]
        landed = [recv(c) for c in subs]
        start = min(x[1] for x in pushed)
        t = max(x[1] for x in landed) - start
        # Where the time went (ms from the first push call): the slowest publisher's phases, and
        # when the last subscriber returned from wait (the round and the switch into service).
        phases = {k: max((x[6][k] or 0.0) + x[1] - start for x in pushed) * 1e3 for k in ("granted", "posted", "complete")}
        phases["in_service"] = t * 1e3
        # The slowest publisher's host work (ms): what posting spent its time on.
        work = {k: max(x[8][k] for x in pushed) * 1e3 for k in pushed[0][8]}
        ok &= all(x[2] is not False for x in landed)
        if v > 0:  # round 0 compiles the stager and warms the connections
            times.append(t)
            stage.append(max(x[4] for x in pushed))
            timeline.append(phases)
            host_work.append(work)
            for x in pushed:
                claimed[0] += x[7][0]
                claimed[1] += x[7][1]
        nbytes = sum(x[3] for x in pushed)
        mem = {"hwm_growth_max": max(x[5]["hwm_growth"] for x in pushed),
               "gpu_peak": [x[5]["gpu_peak"] for x in pushed], "gpu_in_use_before": [x[5]["gpu_in_use0"] for x in pushed],
               # the peak before the timed pushes (setup, warm-up push): XLA's peak cannot be reset
               "gpu_peak_before": [x[5]["gpu_peak0"] for x in pushed]}
        progress(f"  {cfg['name']}: round {v} {t * 1e3:.1f} ms ({format_phases(phases)} ms; host work "
                 f"{format_phases(work)} ms)" + (" (warm-up)" if v == 0 else ""))
    for c in pubs + subs:
        w.ask(c, ("end",))
    med = float(np.median(times))
    return {"name": cfg["name"], "wire_bytes": nbytes, "param_bytes": cfg["total"], "seconds": med,
            "seconds_all": times, "wire_GBps": nbytes / med / 1e9, "param_GBps": cfg["total"] / med / 1e9,
            "stage_seconds": float(np.median(stage)), "verified": bool(ok), "memory": mem,
            "phases_ms": {k: float(np.median([p[k] for p in timeline])) for k in timeline[0]} if timeline else {},
            "host_work_ms": {k: float(np.median([p[k] for p in host_work])) for k in host_work[0]} if host_work else {},
            "staging_bytes": cfg["staging"], "config": cfg,
            # (ranks written under a standing grant, ranks written) over the timed pushes
            "standing_grants": {"used": claimed[0], "of": claimed[1], "enabled": cfg.get("standing", True)}}


def cpu_rows(args: argparse.Namespace) -> dict:
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    rows, baselines, errors = [], {}, []
    w = Workers(2, 2, [env, env], [env, env])
    try:
        for cfg in bench_configs(args.quick, gpu=False):
            progress(f"{cfg['name']}: {cfg['total'] / MiB:.0f} MiB of params, {cfg['rounds']} timed pushes")
            try:
                rows.append(run_config(w, cfg))
            except Exception as e:  # noqa: BLE001 - reported; the other rows still run
                errors.append(f"{cfg['name']}: {e}")
                progress(f"  FAILED: {e}")
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
            progress(f"raw libfabric baseline: {count} writes of {size / MiB:.1f} MiB, 3 runs")
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
    progress("jax.experimental.transfer baseline (two CPU processes)")
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
            ring = weights.stager.StagingRing(a, jax.devices()[0], 2, 1 << 20)
            srcs = {(0, 0): jnp.ones((64, 4096), jnp.bfloat16)}
            ring.stage(0, chunk, srcs)
            t0 = time.perf_counter()
            for _ in range(50):
                ring.stage(0, chunk, srcs)
            out[f"stage_call_{name}_us"] = (time.perf_counter() - t0) / 50 / len(weights.plan.stage_groups(chunk)) * 1e6
        # The dispatch alone: the device scheme (what GPUs run) on a 16 KiB fp8 group, so that the
        # CPU's own compute of the quantization (on a GPU: a kernel the host does not wait for
        # while dispatching) hardly counts. Prepared calls, as from a publisher's second push on.
        lay = weights.Layout.from_pytree({"w": weights.TensorSpec((64, 128), "bfloat16", None)})
        plan = weights.Plan(lay, weights.Layout.from_pytree({"w": weights.fp8_spec((64, 128), None, None, (64, 128))}),
                            chunk_bytes=1 << 20, direct_min_bytes=1 << 40)
        chunk = plan.chunks_of(0)[0]
        ring = weights.stager.StagingRing(a, jax.devices()[0], 2, 1 << 20, host=False)
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
