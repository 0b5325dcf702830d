"""``python -m jax_garden.bench moe --nodes N``: MoE dispatch/combine across processes on CPU (the
inter-node host context: node groups of ``--ranks-per-node`` CPU devices, one process per group,
rows between groups through the TransferEngine over tcp on 127.0.0.1), in one run with:

  * the in-process CPU reference (all N x G ranks as CPU devices of one process) and the
    inter-node context on those same devices as one node group (node_size = R: no engine), which
    separate the engine's cost from the implementation's own work;
  * the tcp wire time of the same bytes: plain sockets between the same N processes, each
    sending every other process, per step, the bytes its ranks wrote through the engine (dispatch,
    then combine), split evenly over the peer processes, and receiving as much;
  * the same exchange as plain TransferEngine writes (one write with an imm per peer and
    direction, completion by imm count; no MoE protocol): the floor the libfabric tcp provider
    sets for these bytes.

Method (host clocks; every process of one host reads the same monotonic clock):
  * inter-node: a jitted loop of full round trips (dispatch_send, dispatch_recv, a cast as the
    expert, combine_send, combine_recv), 8 routings cycled; the native context stamps each call's
    start and end. Per step and rank: each phase = its call's end - start; dispatch =
    dispatch_recv end - dispatch_send start; combine likewise; round trip = combine_recv end -
    dispatch_send start. Samples of all ranks pooled; p50/p99. Per phase also the mean time spent
    posting to the engine and waiting (for peers, transfers, acks); the rest is the phase's own
    work (packing, placing rows, summing).
  * in-process reference: wall time of the same loop / steps (its context keeps no timestamps).
  * wire: per step, all-to-all of the dispatch bytes, then of the combine bytes, over one TCP
    connection per pair of processes (non-blocking sockets, one thread); p50/p99 of the step.
Ratios: round trip / wire round trip; "added by nodes" = inter-node round trip - the same
implementation's round trip as one node (what crossing nodes costs), against the wire round trip;
wall time per step against the in-process reference.
Everything runs on this machine's CPUs: on a 2-core machine N processes share 2 cores, so these
numbers are the protocol's cost on a busy host, not a NIC's.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import time

from jax_garden._interpreter import python_command
from jax_garden.bench._harness import (BenchError, Child, Progress, child_env, percentile, print_table,
                                       write_json)

N_ROUTINGS = 8
PHASES = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")


def _stats(samples_ns) -> dict:
    vals = [float(v) / 1e3 for v in samples_ns]
    return {"p50_us": percentile(vals, 0.5, interpolate=True), "p99_us": percentile(vals, 0.99, interpolate=True),
            "n": len(vals)}


# ---------------------------------------------------------------------------------------------
# Worker side (one process per node group, or the single reference process)


def _config(args, dtype: str):
    import jax.numpy as jnp

    from jax_garden import moe

    fp8 = dtype == "fp8"
    # As the GPU benchmark: random routing receives tokens*K rows per rank on average.
    m = max(128, -(-int(args.recv_factor * args.tokens * args.top_k) // 128) * 128)
    return moe.AllToAllConfig(num_experts=args.experts, experts_per_token=args.top_k, hidden=args.hidden,
                              max_tokens=args.tokens, dispatch_dtype=jnp.float8_e4m3fn if fp8 else jnp.bfloat16,
                              scale_block=128 if fp8 else None, max_recv_tokens=m)


def _inputs(mesh, r: int, args, fp8: bool, seed: int = 0):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_garden import moe

    t, k, e, h = args.tokens, args.top_k, args.experts, args.hidden
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
        xq, xs = moe.quantize_fp8(jnp.asarray(x), 128)
        xin = (put(np.asarray(xq)), put(np.asarray(xs)))
    else:
        xin = (put(x.astype(jnp.bfloat16)), None)
    return xin, put(idx.reshape(r * N_ROUTINGS, t, k)), put(w.reshape(r * N_ROUTINGS, t, k))


def _loop(a2a, iters: int):
    import jax
    import jax.numpy as jnp

    def body(x, xs, idx_all, w_all):
        def step(i, carry):
            x, acc = carry
            idx, w = idx_all[i % N_ROUTINGS], w_all[i % N_ROUTINGS]
            sent = a2a.dispatch_send(x, idx, w, x_scale=xs)
            ex, _, cnt = a2a.dispatch_recv(sent)
            back = a2a.combine_send(ex.astype(jnp.bfloat16), cnt)  # the "expert": a cast
            y = a2a.combine_recv(back, idx, w)
            x, _ = jax.lax.optimization_barrier((x, y))  # next step after this one's combine
            return x, acc + y[0, 0].astype(jnp.float32)

        _, acc = jax.lax.fori_loop(0, iters, step, (x, jnp.float32(0)))
        return acc[None]

    return body


def _run_loop(mesh, a2a, args, fp8: bool, iters: int, after_warmup=None) -> float:
    """Compiles and warms the loop, calls `after_warmup`, then times one run of `iters` steps;
    returns wall s/step."""
    import jax
    from jax.sharding import PartitionSpec as P

    from jax_garden import _compat

    xin, idx, w = _inputs(mesh, a2a.num_ranks, args, fp8)
    f = jax.jit(_compat.shard_map(_loop(a2a, iters), mesh=mesh, in_specs=P("ep"), out_specs=P("ep"),
                                  check_vma=False))
    jax.block_until_ready(f(xin[0], xin[1], idx, w))  # compile + warm up
    if after_warmup is not None:
        after_warmup()
    t0 = time.perf_counter()
    jax.block_until_ready(f(xin[0], xin[1], idx, w))
    wall = (time.perf_counter() - t0) / iters
    a2a.check()
    return wall


def _phase_rows(ctx, local_ranks, iters: int, before: dict) -> dict:
    """Per-phase stats from the native timestamps of the last `iters` calls of every local rank,
    and the mean posting / waiting / engine bytes per step (deltas since `before`)."""
    import numpy as np

    samples = {k: [] for k in (*PHASES, "dispatch", "combine", "round_trip")}
    post = np.zeros(4)
    wait = np.zeros(4)
    nbytes = np.zeros(4)
    ops = np.zeros(4)
    for r in local_ranks:
        s = ctx.timings(r, iters).astype(np.int64)  # [iters, 4, 2]
        if (s == 0).any():
            raise RuntimeError("missing host timestamps")
        for p, name in enumerate(PHASES):
            samples[name] += list(s[:, p, 1] - s[:, p, 0])
        samples["dispatch"] += list(s[:, 1, 1] - s[:, 0, 0])
        samples["combine"] += list(s[:, 3, 1] - s[:, 2, 0])
        samples["round_trip"] += list(s[:, 3, 1] - s[:, 0, 0])
        costs = np.asarray(ctx._ctx.phase_costs(r), np.float64).reshape(4, 2) - before[r]["costs"]
        post += costs[:, 0]
        wait += costs[:, 1]
        nbytes += np.asarray(ctx.engine_bytes(r), np.float64) - before[r]["bytes"]
        ops += np.asarray(ctx.engine_ops(r), np.float64) - before[r]["ops"]
    n = iters * len(local_ranks)
    rows = {k: _stats(v) for k, v in samples.items()}
    for p, name in enumerate(PHASES):
        rows[name]["post_us_mean"] = post[p] / n / 1e3
        rows[name]["wait_us_mean"] = wait[p] / n / 1e3
        rows[name]["engine_bytes_per_step"] = nbytes[p] / n
        rows[name]["engine_ops_per_step"] = ops[p] / n
    return rows


def _snapshot(ctx, local_ranks) -> dict:
    import numpy as np

    return {r: {"costs": np.asarray(ctx._ctx.phase_costs(r), np.float64).reshape(4, 2),
                "bytes": np.asarray(ctx.engine_bytes(r), np.float64),
                "ops": np.asarray(ctx.engine_ops(r), np.float64)} for r in local_ranks}


def _measure_internode(mesh, args, dtype: str, iters: int, node_size: int | None) -> dict:
    from jax_garden import moe

    cfg = _config(args, dtype)
    internode = moe.InternodeConfig(provider="tcp", completion=args.completion)
    with moe.AllToAll(cfg, mesh, "ep", node_size=node_size, internode=internode) as a2a:
        ctx = a2a._native
        before = {}
        wall = _run_loop(mesh, a2a, args, dtype == "fp8", iters,
                         after_warmup=lambda: before.update(_snapshot(ctx, ctx.local_ranks)))
        rows = _phase_rows(ctx, ctx.local_ranks, iters, before)
        nodes = a2a.num_nodes
    return {"phases": rows, "wall_us_per_step": wall * 1e6, "nodes": nodes, "node_size": a2a.node_size}


class _Wire:
    """One TCP connection per pair of processes (127.0.0.1), addresses through the KV store."""

    def __init__(self, me: int, n: int, client):
        self.me, self.n = me, n
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(n)
        client.key_value_set(f"jg_bench_wire/{me}", str(srv.getsockname()[1]))
        self.conns = {}
        for p in range(me + 1, n):  # connect to higher ranks, accept from lower
            port = int(client.blocking_key_value_get(f"jg_bench_wire/{p}", 60_000))
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(me.to_bytes(4, "little"))
            self.conns[p] = c
        for _ in range(me):
            c, _ = srv.accept()
            p = int.from_bytes(self._recv_exact(c, 4), "little")
            self.conns[p] = c
        srv.close()
        for c in self.conns.values():
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.setblocking(False)
        self.buf = bytearray(1)
        self.sel = selectors.DefaultSelector()

    @staticmethod
    def _recv_exact(c, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = c.recv(n - len(out))
            if not chunk:
                raise ConnectionError("peer closed")
            out += chunk
        return out

    def exchange(self, nbytes: int, expect: dict[int, int]) -> None:
        """Sends nbytes to every peer and receives expect[p] bytes from each peer p."""
        nbytes = max(1, nbytes)
        expect = {p: max(1, n) for p, n in expect.items()}
        if len(self.buf) < nbytes:
            self.buf = bytearray(nbytes)
        view = memoryview(self.buf)
        sink = bytearray(1 << 20)
        sent = {p: 0 for p in self.conns}
        got = {p: 0 for p in self.conns}
        for p, c in self.conns.items():
            self.sel.register(c, selectors.EVENT_READ | selectors.EVENT_WRITE, p)
        try:
            while any(v < nbytes for v in sent.values()) or any(got[p] < expect[p] for p in got):
                for key, events in self.sel.select(timeout=10):
                    p, c = key.data, key.fileobj
                    if events & selectors.EVENT_WRITE and sent[p] < nbytes:
                        try:
                            sent[p] += c.send(view[sent[p]:nbytes])
                        except BlockingIOError:
                            pass
                    if events & selectors.EVENT_READ and got[p] < expect[p]:
                        try:
                            k = c.recv_into(sink, min(len(sink), expect[p] - got[p]))
                            if k == 0:
                                raise ConnectionError(f"wire: process {p} closed its connection")
                            got[p] += k
                        except BlockingIOError:
                            pass
                    want = (selectors.EVENT_READ if got[p] < expect[p] else 0) | \
                           (selectors.EVENT_WRITE if sent[p] < nbytes else 0)
                    if want:
                        self.sel.modify(c, want, p)
                    else:
                        self.sel.unregister(c)
        finally:
            for c in self.conns.values():
                try:
                    self.sel.unregister(c)
                except (KeyError, ValueError):
                    pass

    def close(self):
        for c in self.conns.values():
            c.close()


class _EngineWire:
    """The same exchange through a TransferEngine (tcp provider, 127.0.0.1): one plain write with
    an imm per peer and direction, completion by counting the peers' imms. No MoE protocol: the
    floor the libfabric provider sets for these bytes (its tcp path moves bulk data slower than a
    plain socket)."""

    IMM = 0x4A47_0001

    def __init__(self, me: int, n: int, client, max_bytes: int, tag: str, gpu_device: int | None = None):
        """`gpu_device`: the buffers are GPU memory (cudaMalloc) of that CUDA device, so the engine
        moves them by its GPU path (CUDA IPC on one host); else host memory."""
        import base64

        import numpy as np

        from jax_garden import fabric
        from jax_garden._jax_garden import fabric as native_fabric

        self.me, self.n, self.peers = me, n, [p for p in range(n) if p != me]
        self.engine = fabric.TransferEngine(provider="tcp")
        self._gpu_ptrs = []
        size = max(1, max_bytes)
        if gpu_device is None:
            self.send = np.ones(size, np.uint8)
            self.recv = {p: np.zeros(size, np.uint8) for p in self.peers}  # one landing area per sender
            self.send_region = self.engine.register(self.send)
            self.recv_regions = {p: self.engine.register(b) for p, b in self.recv.items()}
        else:
            def gpu_region():
                ptr = native_fabric.gpu_alloc(gpu_device, size)
                self._gpu_ptrs.append(ptr)
                return self.engine.register((ptr, size), memory="cuda")

            self.send_region = gpu_region()
            self.recv_regions = {p: gpu_region() for p in self.peers}
        for p in self.peers:
            client.key_value_set(f"jg_bench_ewire/{tag}/{me}->{p}",
                                 base64.b64encode(bytes(self.recv_regions[p].descriptor)).decode())
        self.dst = {p: fabric.MemoryDescriptor.from_bytes(base64.b64decode(
            client.blocking_key_value_get(f"jg_bench_ewire/{tag}/{p}->{me}", 60_000))) for p in self.peers}
        self.counter = self.engine.imm_counter(self.IMM)
        self.domains = self.engine.num_domains  # every process uses the same default

    def exchange(self, nbytes: int, expect: dict[int, int]) -> None:
        from jax_garden import fabric

        nbytes = max(1, nbytes)
        ts = [self.engine.write(self.send_region, self.dst[p], nbytes, imm=self.IMM) for p in self.peers]
        self.counter.wait(sum(fabric.imm_writes("write", domains=self.domains, length=max(1, expect[p]))
                              for p in self.peers), 30)
        for t in ts:
            t.wait(30)

    def close(self) -> None:
        self.engine.close()
        self.send_region = self.recv_regions = None
        if self._gpu_ptrs:
            from jax_garden._jax_garden import fabric as native_fabric

            for ptr in self._gpu_ptrs:
                native_fabric.gpu_free(ptr)
            self._gpu_ptrs = []


def _measure_wire(wire: _Wire, client, tag: str, dispatch_bytes: int, combine_bytes: int, iters: int) -> dict:
    """Each process sends its own byte counts and receives the counts its peers published."""
    client.key_value_set(f"jg_bench_wire_bytes/{tag}/{wire.me}", f"{dispatch_bytes} {combine_bytes}")
    peers = [p for p in range(wire.n) if p != wire.me]
    theirs = {p: tuple(map(int, client.blocking_key_value_get(f"jg_bench_wire_bytes/{tag}/{p}", 60_000).split()))
              for p in peers}
    d_in = {p: v[0] for p, v in theirs.items()}
    c_in = {p: v[1] for p, v in theirs.items()}
    for _ in range(3):
        wire.exchange(dispatch_bytes, d_in)
        wire.exchange(combine_bytes, c_in)
    steps, disp, comb = [], [], []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        wire.exchange(dispatch_bytes, d_in)
        t1 = time.perf_counter_ns()
        wire.exchange(combine_bytes, c_in)
        t2 = time.perf_counter_ns()
        disp.append(t1 - t0)
        comb.append(t2 - t1)
        steps.append(t2 - t0)
    return {"dispatch": _stats(disp), "combine": _stats(comb), "round_trip": _stats(steps),
            "dispatch_bytes_per_peer": dispatch_bytes, "combine_bytes_per_peer": combine_bytes}


def _worker_nodes(args) -> dict:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.nodes,
                               process_id=args.process, initialization_timeout=120)
    from jax.sharding import Mesh
    import numpy as np

    from jax_garden import _compat

    mesh = Mesh(np.array(jax.devices()), ("ep",))
    out = {"rows": []}
    client = _compat.distributed_client()
    wire = _Wire(args.process, args.nodes, client)
    try:
        for dtype in args.dtypes.split(","):
            row = _measure_internode(mesh, args, dtype, args.iters, None)
            row.update({"impl": "internode", "dtype": dtype})
            ph = row["phases"]
            # Bytes this process's ranks wrote to each peer process per step (even split).
            per_rank_d = ph["dispatch_send"]["engine_bytes_per_step"]
            per_rank_c = ph["combine_send"]["engine_bytes_per_step"]
            g = len(jax.local_devices())
            d_bytes = int(per_rank_d * g / max(1, args.nodes - 1))
            c_bytes = int(per_rank_c * g / max(1, args.nodes - 1))
            out["rows"].append(row)
            wrow = _measure_wire(wire, client, dtype, d_bytes, c_bytes, args.iters)
            out["rows"].append({"impl": "tcp wire", "dtype": dtype, "phases": {
                k: wrow[k] for k in ("dispatch", "combine", "round_trip")},
                "bytes_per_peer": {"dispatch": d_bytes, "combine": c_bytes}})
            ewire = _EngineWire(args.process, args.nodes, client, max(d_bytes, c_bytes) * 2, dtype)
            try:
                erow = _measure_wire(ewire, client, f"{dtype}/engine", d_bytes, c_bytes, args.iters)
            finally:
                client.wait_at_barrier(f"jg_bench_ewire_done/{dtype}", 120_000)  # no engine closes under a peer's writes
                ewire.close()
            out["rows"].append({"impl": "engine wire", "dtype": dtype, "phases": {
                k: erow[k] for k in ("dispatch", "combine", "round_trip")},
                "bytes_per_peer": {"dispatch": d_bytes, "combine": c_bytes}})
            print(f"PROGRESS internode {dtype} done", flush=True)
    finally:
        wire.close()
    return out


def _worker_reference(args) -> dict:
    import jax
    from jax.sharding import Mesh
    import numpy as np

    from jax_garden import moe

    mesh = Mesh(np.array(jax.devices()[: args.ranks]), ("ep",))
    out = {"rows": []}
    for dtype in args.dtypes.split(","):
        cfg = _config(args, dtype)
        with moe.AllToAll(cfg, mesh, "ep") as a2a:
            wall = _run_loop(mesh, a2a, args, dtype == "fp8", args.iters)
        out["rows"].append({"impl": "in-process reference", "dtype": dtype, "wall_us_per_step": wall * 1e6})
        row = _measure_internode(mesh, args, dtype, args.iters, args.ranks)
        row.update({"impl": "internode, one node", "dtype": dtype})
        out["rows"].append(row)
        print(f"PROGRESS reference {dtype} done", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# Parent side


def _spawn(role: str, args, process: int, devices: int, port: int) -> Child:
    env = child_env()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    cmd = python_command("-m", "jax_garden.bench.moe_nodes", "--worker", role, "--process", str(process),
                         "--port", str(port), *args.forward)
    return Child(cmd, f"{role} {process}", env=env)


def _collect(children: list[Child], progress: Progress, timeout: float) -> list[dict]:
    results = []
    deadline = time.monotonic() + timeout
    for c in children:
        while True:
            line = c.line(max(1.0, deadline - time.monotonic()))
            if line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
                break
            if line.startswith("PROGRESS "):
                progress.timed(f"{c.name}: {line[9:].strip()}")
    for c in children:
        c.finish(deadline)
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(result: dict) -> dict:
    """Ratios per dtype from the rows of the same run; returns the headline."""
    headline = {}
    by = {(r["impl"], r["dtype"]): r for r in result["rows"]}
    for dtype in result["dtypes"]:
        net, wire = by.get(("internode", dtype)), by.get(("tcp wire", dtype))
        ref, one = by.get(("in-process reference", dtype)), by.get(("internode, one node", dtype))
        ewire = by.get(("engine wire", dtype))
        ratio = {}
        if net and ewire:
            # Against the same bytes moved by plain engine writes: what the MoE protocol adds over
            # the provider's own floor.
            ratio["round_trip_vs_engine_wire"] = (net["phases"]["round_trip"]["p50_us"]
                                                  / ewire["phases"]["round_trip"]["p50_us"])
        if wire and ewire:
            ratio["engine_wire_vs_tcp_wire"] = (ewire["phases"]["round_trip"]["p50_us"]
                                                / wire["phases"]["round_trip"]["p50_us"])
        if net and wire:
            ratio["round_trip_vs_tcp_wire"] = net["phases"]["round_trip"]["p50_us"] / wire["phases"]["round_trip"]["p50_us"]
            ratio["dispatch_vs_tcp_wire"] = net["phases"]["dispatch"]["p50_us"] / wire["phases"]["dispatch"]["p50_us"]
            ratio["combine_vs_tcp_wire"] = net["phases"]["combine"]["p50_us"] / wire["phases"]["combine"]["p50_us"]
            ratio["target_round_trip_le_1_5x_wire"] = ratio["round_trip_vs_tcp_wire"] <= 1.5
        if net and ref:
            ratio["step_vs_in_process_reference"] = net["wall_us_per_step"] / ref["wall_us_per_step"]
        if net and one:
            ratio["round_trip_vs_one_node"] = net["phases"]["round_trip"]["p50_us"] / one["phases"]["round_trip"]["p50_us"]
        if net and one and wire:
            # What crossing nodes adds to the same implementation's round trip, against the time
            # plain sockets need for the same bytes.
            added = net["phases"]["round_trip"]["p50_us"] - one["phases"]["round_trip"]["p50_us"]
            ratio["added_by_nodes_us"] = added
            ratio["added_by_nodes_vs_tcp_wire"] = added / wire["phases"]["round_trip"]["p50_us"]
        result["ratios"][dtype] = ratio
        for k in ("round_trip_vs_tcp_wire", "round_trip_vs_engine_wire", "engine_wire_vs_tcp_wire",
                  "added_by_nodes_vs_tcp_wire", "step_vs_in_process_reference"):
            if k in ratio:
                headline[f"{dtype} {k}"] = ratio[k]
    return headline


TABLE = [("dtype", 5, "<"), ("impl", 21, "<"), ("phase", 13, "<"), ("p50 us", 9, ">"), ("p99 us", 9, ">"),
         ("post us", 8, ">"), ("wait us", 8, ">"), ("MB/step", 8, ">")]


def print_report(result: dict) -> None:
    print(f"\nMoE across {result['nodes']} processes x {result['ranks_per_node']} CPU ranks (node groups), "
          f"tcp on 127.0.0.1; T={result['tokens']} H={result['hidden']} E={result['experts']} "
          f"top-{result['top_k']}; host clocks, {result['iters']} steps")
    cells = []
    for row in result["rows"]:
        if "phases" in row:
            for ph, st in row["phases"].items():
                mb = st.get("engine_bytes_per_step")
                cells.append([row["dtype"], row["impl"], ph, f"{st['p50_us']:.0f}", f"{st['p99_us']:.0f}",
                              f"{st['post_us_mean']:.0f}" if "post_us_mean" in st else "",
                              f"{st['wait_us_mean']:.0f}" if "wait_us_mean" in st else "",
                              f"{mb / 1e6:.2f}" if mb else ""])
        if "wall_us_per_step" in row:
            cells.append([row["dtype"], row["impl"], "wall/step", f"{row['wall_us_per_step']:.0f}", "", "", "", ""])
    print_table(TABLE, cells)
    for key, ratio in result["ratios"].items():
        print(f"  {key}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in ratio.items()))
    for e in result["errors"]:
        print(f"  error: {e}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jax_garden.bench moe --nodes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2, help="node groups = processes (2..8)")
    ap.add_argument("--ranks-per-node", type=int, default=1, help="CPU devices (ranks) per process")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per rank (128: decode)")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default 200, --quick 30)")
    ap.add_argument("--recv-factor", type=float, default=1.5,
                    help="max_recv_tokens = factor * tokens * K rounded up to 128")
    ap.add_argument("--completion", default="delivery", choices=("delivery", "transmit"))
    ap.add_argument("--no-reference", action="store_true", help="skip the in-process reference rows")
    ap.add_argument("--cpu", action="store_true", help="the CPU rows even on a machine with GPUs")
    ap.add_argument("--quick", action="store_true", help="bf16 only, 30 steps: well under a minute")
    ap.add_argument("--out", "--json", dest="out", default="bench_results/moe_nodes.json",
                    help="JSON output path (default bench_results/moe_nodes.json)")
    # worker-only
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--process", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, default=0, help=argparse.SUPPRESS)
    return ap


def _gpu_rows() -> bool:
    """True when this machine has a GPU and the CUDA MoE kernels (then --nodes runs GPU rows)."""
    try:
        from jax_garden import _moe_cuda
        from jax_garden._jax_garden import fabric as native_fabric

        return _moe_cuda.available() and int(native_fabric.gpu_device_count()) > 0
    except Exception:  # noqa: BLE001 - no GPU runtime: the CPU rows
        return False


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" not in argv and "--cpu" not in argv and _gpu_rows():
        from jax_garden.bench import moe_nodes_gpu

        return moe_nodes_gpu.main(argv)
    ap = _parser()
    args = ap.parse_args([a for a in argv if a != "--cpu"])
    if args.quick:
        args.dtypes = "bf16" if args.dtypes == "bf16,fp8" else args.dtypes
    args.iters = args.iters if args.iters is not None else (30 if args.quick else 200)
    if args.worker:
        args.ranks = args.ranks or args.nodes * args.ranks_per_node
        out = _worker_nodes(args) if args.worker == "nodes" else _worker_reference(args)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    if not 2 <= args.nodes <= 8:
        ap.error(f"--nodes must be in 2..8, got {args.nodes}")
    if not args.recv_factor > 0:
        ap.error(f"--recv-factor must be > 0, got {args.recv_factor}")
    for name in ("ranks_per_node", "tokens", "hidden", "experts", "top_k", "iters"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    r = args.nodes * args.ranks_per_node
    if args.experts % r:
        ap.error(f"--experts={args.experts} is not divisible by the {r} ranks")
    for d in args.dtypes.split(","):
        if d not in ("bf16", "fp8"):
            ap.error(f"--dtypes: unknown dtype {d!r} (bf16, fp8)")
    args.forward = ["--nodes", str(args.nodes), "--ranks-per-node", str(args.ranks_per_node), "--tokens",
                    str(args.tokens), "--hidden", str(args.hidden), "--experts", str(args.experts), "--top-k",
                    str(args.top_k), "--dtypes", args.dtypes, "--iters", str(args.iters), "--completion",
                    args.completion, "--recv-factor", str(args.recv_factor), "--ranks", str(r)]

    result = {"benchmark": "moe --nodes", "nodes": args.nodes, "ranks_per_node": args.ranks_per_node,
              "tokens": args.tokens, "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k,
              "recv_factor": args.recv_factor,
              "dtypes": args.dtypes.split(","), "iters": args.iters, "completion": args.completion,
              "cpus": os.cpu_count(), "quick": args.quick,
              "method": __doc__.split("Method", 1)[1].strip(), "rows": [], "ratios": {}, "errors": []}
    progress = Progress(sys.stdout)
    timeout = 240 + args.iters * 0.5 * len(result["dtypes"])
    port = _free_port()
    children = [_spawn("nodes", args, i, args.ranks_per_node, port) for i in range(args.nodes)]
    try:
        progress.timed(f"{args.nodes} processes x {args.ranks_per_node} ranks started")
        reports = _collect(children, progress, timeout)
        # Every process measured its own ranks; rank 0's process is reported (the others agree
        # within noise; their rows are in the JSON).
        result["rows"] += reports[0]["rows"]
        result["per_process"] = reports
    except BenchError as e:
        result["errors"].append(f"internode: {e}")
    finally:
        for c in children:
            c.kill()
    if not args.no_reference:
        child = _spawn("reference", args, 0, r, 0)
        try:
            result["rows"] += _collect([child], progress, timeout)[0]["rows"]
        except BenchError as e:
            result["errors"].append(f"reference: {e}")
        finally:
            child.kill()
    headline = summarize(result)
    print_report(result)
    out = write_json(args.out, result, headline)
    print(f"wrote {out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
