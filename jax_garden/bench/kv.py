"""KV streaming benchmark: layer-wise streaming vs the same engine in bulk mode vs the raw floor vs
``jax.experimental.transfer``, same run, same machine.

``python -m jax_garden.bench kv [--quick] [--prompts 2048,8192] [--iters 5] [--no-gpu] [--json PATH]``

Shapes: Llama-3-8B KV (32 layers, 8 KV heads, head dim 128, bf16, 16-token pages: 128 KiB per
token, 2 MiB per 16-token page over all layers) for 2k- and 8k-token prompts. Two processes on
this host: a prefill process (source cache) and a decode process (destination cache). On GPUs both
processes see every GPU and each chooses the one its JAX uses (``jax_cuda_visible_devices``): the
prefill GPU 0, the decode GPU 1, or GPU 0 too on a one-GPU machine (the two processes share it);
the engine takes the CUDA IPC path either way (the setup record says which path and why).

The prefill is emulated: one jitted program per request that, per layer, spends ``layer_ms`` of
"compute" (CPU: a host callback that sleeps, so the host is free as it would be under a GPU prefill,
and XLA runs on one thread; GPU: a calibrated chain of matmuls on the device), then writes the
layer's K/V pages into the source cache and marks the layer (``kv.mark_layer``). The KV write comes at the end of each layer, so the
last layer's KV exists only when the prefill ends (the conservative case for the tail). By default
``layer_ms`` = one layer's K+V bytes at the raw floor's rate (compute ~ wire time per layer: a real
overlap test).

Systems, per prompt length:
* ``colocated``       the same prefill program with no transfer: TTFT reference (prefill time);
* ``layerwise``       kv.PrefillSide streams each layer when its mark lands (contiguous decode pages:
                      one coalesced write per layer and K/V; ``layerwise scattered``: decode pages every
                      other page, one paged write per layer and K/V, one imm per page). Streams are
                      opened with ``wait=False`` (the prefill starts while OPEN/ACCEPT travel);
                      ``layerwise, open waited``: the same with open_stream waiting for the ACCEPT
                      before the prefill starts (the round trip in series, as before);
* ``bulk``            the same engine and stream, everything posted at ``finish`` (after the prefill);
* ``raw floor``       CPU: the raw libfabric fi_writemsg loop of ``bench fabric`` (same host, same
                      bytes: 2 x layers coalesced writes); GPU: a copy of one layer's K or V by the
                      driver, cudaMemcpyPeerAsync GPU0 -> GPU1 (2+ GPUs) or a same-device
                      cudaMemcpyAsync (one GPU: what the ipc path does there);
* ``first request (warm-up)``  one untimed ``layerwise`` request before every other system, apart
                      from their p50s: the first request of a session pays one-time costs (the
                      ticket channel, mapping the destination's buffers; on one H100 its ticket took
                      14 ms against 0.6 ms for the next);
* ``jax.experimental.transfer``  tpu-inference style: after the prefill, gather the request's pages
                      into arrays, ``await_pull``; the decode side pulls them and scatters them into its
                      cache (donated jit).

Measured: TTFT = ticket sent -> decode side READY (p50 over iterations) and its overhead over the
colocated prefill; transfer tail = READY - the prefill's last layer (both processes read this host's
CLOCK_MONOTONIC; the last layer is done at min(its mark as seen by the watcher, the program's end)); GB/s
= request KV bytes / (prefill end -> READY) in bulk mode; posted/s = page writes (every layer's K
and V pages) handed to the engine per second by bulk mode's ``finish`` (the host's posting rate, not a
transfer rate); cancel -> fence = ``Request.cancel()`` duration with writes in flight (p50 / p99).
Goals, reported never enforced: tcp: tail <= 1.2 x one layer's wire time (layer bytes /
raw GB/s); NVLink: tail <= one layer's peer-copy time + 100 us, TTFT overhead <= 5% at 8k, coalesced
writes >= 85% of peer copy, cancel -> fence <= 1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from jax_garden._interpreter import python_command
from jax_garden.bench import _plot, figures
from jax_garden.bench._harness import BenchError, child_env, description, percentile, write_json
from jax_garden.bench.fabric import (Control, _listen_and_announce, fmt_size, metrics_from_records, parse_pin,
                                     raw_binary, raw_plan_string, run_pair)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LLAMA3_8B = dict(num_layers=32, page_tokens=16, kv_heads=8, head_dim=128, dtype="bfloat16")


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _layout(plan: dict, num_pages: int) -> Any:
    from jax_garden import kv

    return kv.KVLayout(**plan["layout"], num_pages=num_pages)


def _request_bytes(layout: dict, tokens: int) -> int:
    pages = -(-tokens // layout["page_tokens"])
    itemsize = 2 if layout["dtype"] in ("bfloat16", "float16") else 4
    return 2 * layout["num_layers"] * pages * layout["page_tokens"] * layout["kv_heads"] * layout["head_dim"] * itemsize


# --------------------------------------------------------------------------------- the prefill program


def _make_compute(platform: str, layer_s: float) -> Any:
    """A function c -> c' (f32 scalar) that takes ~layer_s and depends on c (one layer's 'compute')."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback

    if platform == "cpu":
        def sleep(x):
            time.sleep(layer_s)
            return np.zeros((), np.float32)

        return lambda c: c + io_callback(sleep, jax.ShapeDtypeStruct((), jnp.float32), c, ordered=True)

    n = 2048
    # the scale is cast back: a NumPy float64 scalar would promote w (and the loop carry) to float32
    w = (jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16) / np.sqrt(n)).astype(jnp.bfloat16)

    def burn(c, iters):
        x = jnp.full((n, n), 0.5, jnp.bfloat16) + c.astype(jnp.bfloat16)
        x = jax.lax.fori_loop(0, iters, lambda i, x: jnp.tanh(x @ w), x)
        return c + x[0, 0].astype(jnp.float32) * 0.0

    # calibrate: iterations for layer_s on this GPU
    f = jax.jit(burn, static_argnums=1)
    f(jnp.float32(0), 64).block_until_ready()
    t0 = time.perf_counter()
    f(jnp.float32(0), 64).block_until_ready()
    per_iter = (time.perf_counter() - t0) / 64
    iters = max(1, int(round(layer_s / per_iter)))
    return lambda c: burn(c, iters)


def _make_prefill(layout: Any, marks: Any, n_pages: int, compute: Any) -> Any:
    """jit(ks, vs, pages[n_pages], token, seed) -> (ks, vs): per layer, compute, write the pages
    (value (seed*7 + 2*layer + kind) % 200 + 1, exact in bf16), mark."""
    import jax
    import jax.numpy as jnp

    from jax_garden import kv

    page_shape, dt, L = layout.array_shape[1:], layout.np_dtype, layout.num_layers

    def body(ks, vs, pages, token, seed):
        ks, vs = list(ks), list(vs)
        c = jnp.float32(0)
        for layer in range(L):
            c = compute(c)
            for kind, arrs in ((0, ks), (1, vs)):
                val = ((seed * 7 + 2 * layer + kind) % 200 + 1).astype(jnp.float32) + c
                arrs[layer] = arrs[layer].at[pages].set(jnp.broadcast_to(val.astype(dt), (n_pages, *page_shape)))
            kv.mark_layer(marks, layer, token, ks[layer], vs[layer])
            # the next layer starts after this layer's KV write (else XLA's schedule batches writes)
            c = c + 0.0 * (ks[layer][pages[0]].ravel()[0] + vs[layer][pages[0]].ravel()[0]).astype(jnp.float32)
        return ks, vs

    return jax.jit(body, donate_argnums=(0, 1))


def _expected(seed: int, layer: int, kind: int) -> float:
    return float((seed * 7 + 2 * layer + kind) % 200 + 1)


def _check_pages(cache: Any, pages: np.ndarray, seed: int) -> None:
    """Sampled check: first and last page of a few layers hold the values the prefill wrote."""
    import jax.numpy as jnp

    L = cache.layout.num_layers
    sample = jnp.asarray(np.unique(pages[[0, -1]]).astype(np.int32))
    for layer in sorted({0, L // 2, L - 1}):
        for kind, arrs in ((0, cache.k), (1, cache.v)):
            got = np.asarray(arrs[layer][sample]).astype(np.float32)
            want = _expected(seed, layer, kind)
            if not (got == want).all():
                raise BenchError(f"layer {layer} {'KV'[kind]}: pages {np.asarray(sample)} hold {np.unique(got)[:4]}, "
                                 f"expected {want}")


# ------------------------------------------------------------------------------------------ workers


def _engine(plan: dict) -> Any:
    from jax_garden import fabric

    return fabric.TransferEngine(provider="tcp", timeout=plan["engine_timeout"], completion=plan["completion"])


def _decode_worker(ctl: Control, plan: dict, timeout: float) -> None:
    import jax
    import jax.numpy as jnp

    from jax_garden import kv

    max_pages = max(-(-t // plan["layout"]["page_tokens"]) for t in plan["prompts"])
    eng = _engine(plan)
    cache = kv.PagedKVCache(eng, _layout(plan, 2 * max_pages + 1))
    dec = kv.DecodeSide(cache, timeout=timeout, max_requests=64)
    ctl.send(bytes(dec.contact))
    prefill = kv.Contact.from_bytes(ctl.recv())
    ctl.send(cache.descriptors()[0])
    conn = None
    scatter = jax.jit(lambda ks, vs, p, gk, gv: ([k.at[p].set(g) for k, g in zip(ks, gk)],
                                                  [v.at[p].set(g) for v, g in zip(vs, gv)]), donate_argnums=(0, 1))
    try:
        while True:
            msg = json.loads(ctl.recv())
            op = msg["op"]
            if op == "stop":
                break
            hold = None
            if msg.get("scattered"):  # every other page taken: no two pages of the request are adjacent
                hold = cache.allocator.alloc(cache.layout.num_pages)
                cache.allocator.free(hold[::2])
                hold = hold[1::2]
            try:
                if op == "request":
                    req = dec.reserve(msg["tokens"])
                    t_sent = time.monotonic()
                    dec.send_ticket(prefill, req, json.dumps({"seed": msg["seed"]}).encode())
                    state = req.wait(timeout)
                    if state is not kv.State.READY:
                        raise BenchError(f"request {state.value}: {req.reason}")
                    _check_pages(cache, req.pages, msg["seed"])
                    ctl.send(json.dumps({"t_sent": t_sent, "t_ready": req.times["ready"], "t_opened": req.times["opened"],
                                         "pages": int(req.pages.size)}).encode())
                    req.release()
                elif op == "cancel":
                    req = dec.reserve(msg["tokens"])
                    dec.send_ticket(prefill, req, b"{}")
                    ctl.recv()  # the prefill side opened the stream and is posting layers
                    t0 = time.monotonic()
                    state = req.cancel()
                    dt = time.monotonic() - t0
                    ctl.send(json.dumps({"cancel_s": dt, "state": state.value, "reason": req.reason,
                                         "arrived": req.progress()["arrived_data"],
                                         "quarantined": req.quarantined}).encode())
                elif op == "xfer_connect":
                    from jax.experimental import transfer

                    server = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"])
                    conn = server.connect(msg["address"])
                    ctl.send(b"ok")
                elif op == "xfer":
                    pages = cache.allocator.alloc(msg["pages"])
                    spec = jax.ShapeDtypeStruct((msg["pages"], *cache.layout.array_shape[1:]), cache.layout.np_dtype,
                                                sharding=cache.sharding)
                    L = cache.layout.num_layers
                    got = conn.pull(msg["uuid"], [spec] * (2 * L))
                    k, v = scatter(cache.k, cache.v, jnp.asarray(pages.astype(np.int32)), got[:L], got[L:])
                    cache.commit(k, v)
                    jax.block_until_ready(cache.k)
                    t_done = time.monotonic()
                    _check_pages(cache, pages, msg["seed"])
                    cache.allocator.free(pages)
                    ctl.send(json.dumps({"t_done": t_done}).encode())
            finally:
                if hold is not None:
                    cache.allocator.free(hold)
        ctl.barrier()
    finally:
        dec.close(timeout=5)
        eng.close()


def _prefill_worker(ctl: Control, plan: dict, timeout: float) -> None:
    import jax
    import jax.numpy as jnp

    from jax_garden import kv

    platform = plan["platform"]
    max_pages = max(-(-t // plan["layout"]["page_tokens"]) for t in plan["prompts"])
    eng = _engine(plan)
    cache = kv.PagedKVCache(eng, _layout(plan, max_pages + 1))
    pf = kv.PrefillSide(cache, timeout=timeout)
    decode = ctl.recv()
    ctl.send(bytes(pf.contact))
    del decode
    dst_desc = ctl.recv()  # one of the decode cache's regions: which path the KV writes take
    path, why = eng.path_for(cache.region(0, 0, 0), dst_desc, why=True)
    L = cache.layout.num_layers
    _emit({"event": "setup", "platform": platform, "devices": [str(d) for d in jax.devices()],
           "provider": eng.provider, "path": path, "path_reason": why})
    xfer_server = None
    gather = jax.jit(lambda ks, vs, p: ([k[p] for k in ks], [v[p] for v in vs]))
    seed = 0
    try:
        for tokens in plan["prompts"]:
            n_pages = -(-tokens // cache.layout.page_tokens)
            layer_s = plan["layer_ms"][str(tokens)] / 1e3
            prog = _make_prefill(cache.layout, pf.marks, n_pages, _make_compute(platform, layer_s))
            src = cache.allocator.alloc(n_pages)
            src_j = jnp.asarray(src.astype(np.int32))
            # compile and warm up (token 0 belongs to no stream)
            k, v = prog(cache.k, cache.v, src_j, jnp.uint32(0), jnp.int32(0))
            cache.commit(k, v)
            jax.block_until_ready(cache.k)

            def run(token: int, s: int) -> tuple[float, float]:
                t0 = time.monotonic()
                k, v = prog(cache.k, cache.v, src_j, jnp.uint32(token), jnp.int32(s))
                cache.commit(k, v)
                jax.block_until_ready(cache.k)
                return t0, time.monotonic()

            def stream_request(case: dict, warmup: bool = False) -> None:
                """One request of a streaming case, ticket to READY, and its record."""
                nonlocal seed
                name = case["name"]
                seed += 1
                ctl.send(json.dumps({"op": "request", "tokens": tokens, "seed": seed,
                                     "scattered": case.get("scattered", False)}).encode())
                ticket, extra = pf.recv_ticket(timeout)
                t_recv = time.monotonic()
                # Opened without waiting for the ACCEPT, as a server would: the prefill
                # starts at once and the round trip to the decode side overlaps it.
                s = pf.open_stream(ticket, src, layerwise=name == "layerwise",
                                   wait=case.get("open_wait", False))
                t_open = time.monotonic()
                t_start, t_end = run(s.token, json.loads(extra)["seed"])
                s.finish(b"")
                t_fin = time.monotonic()
                stats = s.wait(timeout)
                d = json.loads(ctl.recv())
                posted = s.times["posted"]
                # The last layer is done when its mark is stored: the watcher sees it a little
                # later, or after the program ended when the callback thread was busy posting.
                t_last = min(s.times["marks"].get(L - 1, t_end), t_end)
                _emit({"case": name, "warmup": warmup, "scattered": case.get("scattered", False),
                       "open_wait": case.get("open_wait", False), "tokens": tokens,
                       "ttft_s": d["t_ready"] - d["t_sent"], "tail_s": d["t_ready"] - t_last,
                       "tail_end_s": d["t_ready"] - t_end, "after_finish_s": d["t_ready"] - t_fin,
                       "open_s": d["t_opened"] - d["t_sent"], "prefill_s": t_end - t_start,
                       "start_s": t_start - d["t_sent"],  # ticket sent -> prefill starts
                       "post_span_s": max(posted.values()) - min(posted.values()),
                       "finish_s": t_fin - t_end,
                       "pages": stats["pages"], "bytes": stats["bytes"], "writes": stats["writes"],
                       "on_mark": stats["layers_posted_on_mark"], "t_recv_lag_s": t_recv - d["t_sent"],
                       "t_open_s": t_open - t_recv,
                       "marks_ms": [round((s.times["marks"][i] - t_start) * 1e3, 3) if i in s.times["marks"]
                                    else None for i in range(L)],
                       "posted_ms": [round((posted[i] - t_start) * 1e3, 3) for i in range(L)],
                       "ready_ms": round((d["t_ready"] - t_start) * 1e3, 3),
                       "end_ms": round((t_end - t_start) * 1e3, 3)})

            # The first request of a session pays one-time costs (the ticket channel, mapping the
            # destination's buffers): one untimed request first, recorded apart (``warmup``), so that
            # the p50 of a few requests is not the mean of a cold and a warm one.
            streaming = [c for c in plan["cases"] if c["name"] in ("layerwise", "bulk")]
            if streaming:
                _progress(f"  {platform} {tokens} tokens: first request (warm-up)")
                stream_request(streaming[0], warmup=True)
            for case in plan["cases"]:
                name = case["name"]
                _progress(f"  {platform} {tokens} tokens: {name}")
                if name == "colocated":
                    for _ in range(plan["iters"]):
                        seed += 1
                        t0, t1 = run(0, seed)
                        _emit({"case": name, "tokens": tokens, "ttft_s": t1 - t0})
                elif name in ("layerwise", "bulk"):
                    for _ in range(plan["iters"]):
                        stream_request(case)
                elif name == "cancel":
                    for _ in range(plan["cancel_iters"]):
                        ctl.send(json.dumps({"op": "cancel", "tokens": tokens}).encode())
                        ticket, _ = pf.recv_ticket(timeout)
                        s = pf.open_stream(ticket, src)
                        # layer-wise streaming keeps about one layer in flight: cancel while layer 0's
                        # writes are posted and moving
                        pf.marks.slot(0).store(s.token)
                        deadline = time.monotonic() + timeout
                        while s.stats()["posted_data"] == 0 and time.monotonic() < deadline:
                            time.sleep(0.0002)
                        ctl.send(b"go")
                        d = json.loads(ctl.recv())
                        _emit({"case": name, "tokens": tokens, **d, "stream": s.state,
                               "posted": s.stats()["posted_data"], "bytes_posted": s.stats()["bytes"]})
                elif name == "jax_transfer":
                    try:
                        from jax.experimental import transfer

                        if xfer_server is None:
                            xfer_server = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0",
                                                                         ["127.0.0.1:0"])
                            ctl.send(json.dumps({"op": "xfer_connect", "address": xfer_server.address()}).encode())
                            ctl.recv()
                        for it in range(plan["iters"]):
                            seed += 1
                            t_start, t_end = run(0, seed)
                            gk, gv = gather(cache.k, cache.v, src_j)
                            uuid = 1000 + seed
                            xfer_server.await_pull(uuid, [*gk, *gv])
                            ctl.send(json.dumps({"op": "xfer", "uuid": uuid, "pages": n_pages, "seed": seed}).encode())
                            d = json.loads(ctl.recv())
                            _emit({"case": name, "tokens": tokens, "tail_s": d["t_done"] - t_end,
                                   "ttft_s": d["t_done"] - t_start, "prefill_s": t_end - t_start})
                    except Exception as e:  # noqa: BLE001 - reported as "does not run here"
                        _emit({"case": name, "tokens": tokens, "error": f"{type(e).__name__}: {e}"})
            cache.allocator.free(src)
        ctl.send(json.dumps({"op": "stop"}).encode())
        ctl.barrier()
    finally:
        pf.close()
        eng.close()


def _worker_main(args: argparse.Namespace) -> int:
    plan = json.loads(args.worker_plan)
    if plan["platform"] == "gpu":
        # Every GPU stays visible to CUDA (the engine maps the peer's memory); JAX uses one.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the GPU may be shared
        import jax

        jax.config.update("jax_cuda_visible_devices", str(plan["gpus"][args.worker]))
    if plan["platform"] == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        # The CPU rows emulate a device prefill, which leaves the host to the transfer: XLA runs the
        # emulated prefill on one thread instead of taking every core.
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import socket

    if args.worker == "decode":
        sock = _listen_and_announce(args.timeout)
    else:
        sock = socket.create_connection(("127.0.0.1", args.worker_port), timeout=args.timeout)
    ctl = Control(sock, args.timeout)
    try:
        (_decode_worker if args.worker == "decode" else _prefill_worker)(ctl, plan, args.timeout)
    finally:
        sock.close()
    return 0


# ------------------------------------------------------------------------------------------ harness


def _python_cmd() -> list[str]:
    return python_command("-m", "jax_garden.bench", "kv")


def _raw_floor_cpu(plan_layout: dict, prompts: list[int], iters: int, timeout: float,
                   pin: tuple[str, str] | None = None, completion: str = "transmit") -> dict:
    """raw_fabric_bench: per prompt, the request's bytes as 2 x layers coalesced writes (window 64)
    and, for the scattered case, one paged op of the request's pages; with the engines' completion
    semantics (``--delivery-complete`` for delivery)."""
    binary = raw_binary()
    if not binary.exists():
        raise BenchError(f"raw baseline binary not found at {binary} (build the project first)")
    out = {}
    page = plan_layout["page_tokens"] * plan_layout["kv_heads"] * plan_layout["head_dim"] * 2
    for tokens in prompts:
        n_pages = -(-tokens // plan_layout["page_tokens"])
        run = n_pages * page
        raw_plan = [{"kind": "bw", "size": run, "count": 2 * plan_layout["num_layers"] * iters, "window": 64},
                    {"kind": "paged", "page": page, "pages": n_pages, "iters": iters, "window": 64}]
        common = ["--plan", raw_plan_string(raw_plan), "--seed", "7", "--timeout", str(timeout)]
        common += ["--delivery-complete"] if completion == "delivery" else []
        records = run_pair([str(binary), "--role", "server", *common],
                           lambda port: [str(binary), "--role", "client", "--port", str(port), *common],
                           "raw_fabric_bench", timeout, pin=pin)
        m = metrics_from_records(records)
        out[tokens] = {"gbps": m[("write", run)]["gbps"], "paged_gbps": m[("paged", page, n_pages)]["gbps"],
                       "what": f"raw libfabric fi_writemsg: {2 * plan_layout['num_layers']} writes of {fmt_size(run)}"}
    return out


def _gpu_roles() -> dict[str, int]:
    """The GPU of each worker: the prefill on GPU 0, the decode on GPU 1 (GPU 0 when it is alone)."""
    from jax_garden._jax_garden import fabric as native

    return {"prefill": 0, "decode": 1 if native.gpu_device_count() > 1 else 0}


def _raw_floor_gpu(plan_layout: dict, prompts: list[int], timeout: float) -> dict:
    dst = _gpu_roles()["decode"]
    code = ("import json,sys; from jax_garden._jax_garden import fabric as n; a=json.loads(sys.argv[1]); "
            f"print(json.dumps({{str(k): n.bench_peer_copy(0, {dst}, v, 20) for k, v in a.items()}}))")
    sizes = {}
    for tokens in prompts:
        per_layer = _request_bytes(plan_layout, tokens) // plan_layout["num_layers"]
        sizes[f"{tokens}:layer_kind"] = per_layer // 2
        sizes[f"{tokens}:total"] = per_layer * plan_layout["num_layers"]
    r = subprocess.run(python_command("-c", code, json.dumps(sizes)), capture_output=True, text=True,
                       timeout=timeout, env=child_env())
    if r.returncode != 0:
        raise BenchError(f"peer-copy baseline failed: {r.stderr.strip()[-300:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    what = ("cudaMemcpyPeerAsync GPU0 -> GPU1" if dst else "cudaMemcpyAsync on GPU 0 (one GPU, shared by both processes)")
    return {t: {"gbps": got[f"{t}:layer_kind"], "total_gbps": got[f"{t}:total"],
                "what": f"{what} (one layer's K or V per copy)"} for t in prompts}


def _run_engine_pair(plan: dict, args: argparse.Namespace) -> list[dict]:
    common = ["--worker-plan", json.dumps(plan), "--timeout", str(args.timeout)]

    env = child_env()
    return run_pair([*_python_cmd(), "--worker", "decode", *common],
                    lambda port: [*_python_cmd(), "--worker", "prefill", "--worker-port", str(port), *common],
                    f"kv {plan['platform']} workers", args.timeout * 10, env,
                    pin=args.pin_cpus if plan["platform"] == "cpu" else None)


def _gpu_available() -> bool:
    try:
        from jax_garden._jax_garden import fabric as native

        return bool(native.gpu_available()) and native.gpu_device_count() >= 1
    except Exception:  # noqa: BLE001
        return False


def _best(floors: list[dict]) -> dict:
    """Per prompt, the highest GB/s of each floor metric over several runs."""
    out: dict = {}
    for f in floors:
        for tokens, v in f.items():
            cur = out.setdefault(tokens, dict(v))
            for k in ("gbps", "paged_gbps", "total_gbps"):
                if k in v:
                    cur[k] = max(cur.get(k, 0.0), v[k])
    return out


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(platform: str, records: list[dict], floor: dict, layout: dict, prompts: list[int]) -> dict:
    rows, cancel, targets = [], {}, []
    for tokens in prompts:
        recs = [r for r in records if r.get("tokens") == tokens and not r.get("warmup")]
        warm = [r for r in records if r.get("tokens") == tokens and r.get("warmup")]
        total = _request_bytes(layout, tokens)
        layer_bytes = total // layout["num_layers"]
        fl = floor.get(tokens, {})
        floor_gbps = fl.get("gbps")
        layer_wire_s = layer_bytes / (floor_gbps * 1e9) if floor_gbps else None
        colo = _med([r["ttft_s"] for r in recs if r["case"] == "colocated"])

        def row(label: str, sel: list[dict], **extra: Any) -> dict:
            ttft = _med([r["ttft_s"] for r in sel if "ttft_s" in r])
            tail = _med([r["tail_s"] for r in sel if "tail_s" in r])
            layer_wire_s = extra.pop("layer_wire_s", None)
            out = {"platform": platform, "tokens": tokens, "system": label, "kv_bytes": total,
                   "ttft_ms": ttft and ttft * 1e3, "tail_ms": tail and tail * 1e3,
                   "ttft_overhead_pct": (ttft / colo - 1) * 100 if ttft and colo else None,
                   "tail_vs_layer_wire": tail / layer_wire_s if tail and layer_wire_s else None,
                   "iters": len(sel), **extra}
            errs = [r["error"] for r in sel if "error" in r]
            if errs:
                out["error"] = errs[0]
            return out

        rows.append({"platform": platform, "tokens": tokens, "system": "colocated", "kv_bytes": total,
                     "ttft_ms": colo and colo * 1e3, "prefill_ms": colo and colo * 1e3, "tail_ms": None,
                     "ttft_overhead_pct": 0.0, "iters":
                     sum(1 for r in recs if r["case"] == "colocated")})
        for case, scattered, open_wait, label in (("layerwise", False, False, "layerwise"),
                                                  ("layerwise", False, True, "layerwise, open waited"),
                                                  ("layerwise", True, False, "layerwise scattered"),
                                                  ("bulk", False, False, "bulk")):
            sel = [r for r in recs if r["case"] == case and r.get("scattered", False) == scattered
                   and r.get("open_wait", False) == open_wait]
            if not sel:
                continue
            if scattered and fl.get("paged_gbps"):  # compared with the raw paged loop (one write per page)
                floor_gbps, layer_wire_s = fl["paged_gbps"], layer_bytes / (fl["paged_gbps"] * 1e9)
            else:
                floor_gbps = fl.get("gbps")
                layer_wire_s = layer_bytes / (floor_gbps * 1e9) if floor_gbps else None
            after = _med([r["after_finish_s"] for r in sel])
            fin = _med([r["finish_s"] for r in sel if "finish_s" in r])
            gbps = total / after / 1e9 if after and case == "bulk" else None
            extra = {"gbps": gbps, "gbps_vs_floor": gbps / floor_gbps if gbps and floor_gbps else None,
                     "prefill_ms": _med([r["prefill_s"] * 1e3 for r in sel]),
                     # bulk: finish() posts every layer's page writes (and the payload) in one go
                     "posted_per_s": (sel[0]["pages"] / fin if fin and case == "bulk" else None),
                     "writes": sel[0]["writes"], "layers_on_mark": _med([r["on_mark"] for r in sel]),
                     "open_ms": _med([r["open_s"] * 1e3 for r in sel]),
                     "start_ms": _med([r["start_s"] * 1e3 for r in sel])}
            rows.append(row(label, sel, layer_wire_s=layer_wire_s, **extra))
        floor_gbps = fl.get("gbps")
        layer_wire_s = layer_bytes / (floor_gbps * 1e9) if floor_gbps else None
        if warm:  # the untimed first request: what a server's first request pays without a warm-up
            rows.append(row("first request (warm-up)", warm, layer_wire_s=layer_wire_s,
                            prefill_ms=_med([r["prefill_s"] * 1e3 for r in warm]),
                            start_ms=_med([r["start_s"] * 1e3 for r in warm])))
        xs = [r for r in recs if r["case"] == "jax_transfer"]
        if xs:
            rows.append(row("jax.experimental.transfer", xs, layer_wire_s=layer_wire_s,
                            prefill_ms=_med([r["prefill_s"] * 1e3 for r in xs if "prefill_s" in r])))
        if floor_gbps:
            rows.append({"platform": platform, "tokens": tokens, "system": "raw floor", "kv_bytes": total,
                         "gbps": floor_gbps, "layer_wire_ms": layer_wire_s * 1e3, "what": fl.get("what"),
                         "total_gbps": fl.get("total_gbps")})
        if fl.get("paged_gbps"):
            rows.append({"platform": platform, "tokens": tokens, "system": "raw floor paged", "kv_bytes": total,
                         "gbps": fl["paged_gbps"], "layer_wire_ms": layer_bytes / (fl["paged_gbps"] * 1e9) * 1e3,
                         "what": "raw libfabric: one write per page (window 64)"})
        cs = [r for r in recs if r["case"] == "cancel"]
        if cs:
            lat = [r["cancel_s"] * 1e3 for r in cs]
            cancel[tokens] = {"p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99), "n": len(lat),
                              "states": sorted({r["state"] for r in cs}), "quarantined": sum(r["quarantined"] for r in cs),
                              "bytes_in_flight": max(r["bytes_posted"] for r in cs)}
        lw = next((r for r in rows if r["tokens"] == tokens and r["system"] == "layerwise"), None)
        bulk = next((r for r in rows if r["tokens"] == tokens and r["system"] == "bulk"), None)
        if lw and lw.get("tail_ms") is not None and layer_wire_s:
            if platform == "cpu":
                targets.append({"platform": platform, "tokens": tokens, "metric": "tail / one layer's wire time",
                                "value": lw["tail_vs_layer_wire"], "target": "<= 1.2",
                                "met": lw["tail_vs_layer_wire"] <= 1.2})
            else:
                lim = layer_wire_s * 1e3 + 0.1
                targets.append({"platform": platform, "tokens": tokens, "metric": "tail ms vs one layer's copy + 0.1 ms",
                                "value": lw["tail_ms"], "target": f"<= {lim:.3f}", "met": lw["tail_ms"] <= lim})
                if tokens >= 8192 and lw.get("ttft_overhead_pct") is not None:
                    targets.append({"platform": platform, "tokens": tokens, "metric": "TTFT overhead %",
                                    "value": lw["ttft_overhead_pct"], "target": "<= 5", "met": lw["ttft_overhead_pct"] <= 5})
        if platform == "gpu" and bulk and bulk.get("gbps_vs_floor") is not None:
            targets.append({"platform": platform, "tokens": tokens, "metric": "bulk coalesced GB/s / peer copy",
                            "value": bulk["gbps_vs_floor"], "target": ">= 0.85", "met": bulk["gbps_vs_floor"] >= 0.85})
        if platform == "gpu" and tokens in cancel:
            targets.append({"platform": platform, "tokens": tokens, "metric": "cancel -> fence p50 ms",
                            "value": cancel[tokens]["p50_ms"], "target": "<= 1", "met": cancel[tokens]["p50_ms"] <= 1})
    return {"rows": rows, "cancel": cancel, "targets": targets}


def _f(v: Any, w: int, p: int) -> str:
    return f"{'-':>{w}}" if v is None else f"{v:{w}.{p}f}"


def print_table(result: dict) -> None:
    head = (f"{'platform':<8} {'prompt':>6} {'system':<26} {'TTFT ms':>9} {'ovh %':>7} {'prefill':>8} {'tail ms':>8} "
            f"{'tail/layer':>10} {'GB/s':>6} {'/floor':>6} {'posted/s':>9}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        print(f"{r['platform']:<8} {r['tokens']:>6} {r['system']:<26} {_f(r.get('ttft_ms'), 9, 1)} "
              f"{_f(r.get('ttft_overhead_pct'), 7, 1)} {_f(r.get('prefill_ms'), 8, 1)} {_f(r.get('tail_ms'), 8, 2)} "
              f"{_f(r.get('tail_vs_layer_wire'), 10, 2)} {_f(r.get('gbps'), 6, 2)} {_f(r.get('gbps_vs_floor'), 6, 2)} "
              f"{_f(r.get('posted_per_s'), 9, 0)}" + (f"  ERROR {r['error'][:60]}" if r.get("error") else "")
              + (f"  (layer wire {r['layer_wire_ms']:.2f} ms)" if r.get("layer_wire_ms") else ""))
    print("ovh %: TTFT over the colocated prefill; tail: READY - the prefill's last layer; GB/s: KV bytes / "
          "(prefill end -> READY), bulk only; posted/s: page writes handed to the engine per second by bulk's "
          "finish() (host posting rate, not a transfer rate)")
    for plat, setup in result.get("setup", {}).items():
        if setup.get("path"):
            print(f"path {plat}: the KV writes take '{setup['path']}' ({setup.get('path_reason', '')}); "
                  f"prefill devices {setup.get('devices')}")
    for plat, c in result.get("cancel", {}).items():
        for tokens, v in c.items():
            print(f"cancel -> fence {plat} {tokens} tokens: p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms "
                  f"(n={v['n']}, up to {fmt_size(v['bytes_in_flight'])} posted when cancelled, states {v['states']}, "
                  f"quarantined {v['quarantined']})")
    for t in result["targets"]:
        print(f"target {t['platform']} {t['tokens']}: {t['metric']} = {t['value']:.3f} ({t['target']}): "
              f"{'met' if t['met'] else 'MISSED'}")
    for n in result.get("notes", []):
        print(f"note: {n}")
    for e in result.get("errors", []):
        print(f"error: {e}")


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jax_garden.bench kv", description=description(__doc__))
    p.add_argument("--prompts", default=None, help="prompt lengths (default 2048,8192; --quick 2048)")
    p.add_argument("--iters", type=int, default=None, help="requests per system and prompt (default 5, --quick 2)")
    p.add_argument("--cancel-iters", type=int, default=None, help="cancel measurements (default 20, --quick 5)")
    p.add_argument("--layer-ms", type=float, default=None,
                   help="emulated compute per layer (default: one layer's bytes at the raw floor's rate)")
    p.add_argument("--layers", type=int, default=LLAMA3_8B["num_layers"], help="layers (default 32, Llama-3-8B)")
    p.add_argument("--completion", choices=("delivery", "transmit"), default="delivery",
                   help="the engines' completion mode, and the raw floor's (default delivery, the engine's default; "
                        "transmit is as safe for KV streaming: docs/kv.md)")
    p.add_argument("--quick", action="store_true", help="2k prompts, 2 iterations: well under a minute")
    p.add_argument("--no-gpu", action="store_true", help="CPU rows only")
    p.add_argument("--no-cpu", action="store_true", help="GPU rows only")
    p.add_argument("--json", default="bench_results/kv.json", help="JSON output path")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="also draw the TTFT of each system, split into its parts, into PATH (PNG; needs matplotlib)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for any one wait")
    p.add_argument("--pin", default=None, help="CPU rows: pin the decode (server) and prefill (client) processes, "
                   "and the raw floor's pair, to CPU lists SERVER:CLIENT (e.g. 1:0); default: no pinning")
    p.add_argument("--worker", choices=("decode", "prefill"), help=argparse.SUPPRESS)
    p.add_argument("--worker-plan", help=argparse.SUPPRESS)
    p.add_argument("--worker-port", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args.worker:
        return _worker_main(args)
    try:
        _plot.check(args.plot)  # before minutes of measuring
    except _plot.PlotUnavailable as e:
        raise SystemExit(f"kv benchmark: {e}") from None
    try:
        args.pin_cpus = parse_pin(args.pin)
    except ValueError as e:
        raise SystemExit(f"kv benchmark: {e}") from None
    quick = args.quick
    prompts = [int(x) for x in (args.prompts or ("2048" if quick else "2048,8192")).split(",") if x.strip()]
    iters = args.iters or (2 if quick else 5)
    cancel_iters = args.cancel_iters or (5 if quick else 20)
    quick = bool(quick)
    layout = dict(LLAMA3_8B, num_layers=args.layers)
    cases = [{"name": "colocated"}, {"name": "layerwise"}, {"name": "layerwise", "open_wait": True},
             {"name": "layerwise", "scattered": True},
             {"name": "bulk"}, {"name": "jax_transfer"}, {"name": "cancel"}]
    platforms = [] if args.no_cpu else ["cpu"]
    notes, errors = [], []
    if not args.no_gpu:
        if _gpu_available():
            platforms.append("gpu")
        else:
            notes.append("GPU rows skipped: this machine has no GPU or the build has no CUDA")
    if (load := os.getloadavg()[0]) > 0.5 * (os.cpu_count() or 1):
        notes.append(f"machine busy at start: 1-min load {load:.1f} on {os.cpu_count()} CPUs")
    t_start = time.monotonic()
    result: dict[str, Any] = {"benchmark": "kv", "rows": [], "cancel": {}, "targets": [], "floors": {}}
    for platform in platforms:
        def measure_floor() -> dict:
            try:
                return (_raw_floor_cpu(layout, prompts, iters, args.timeout, args.pin_cpus, args.completion)
                        if platform == "cpu"
                        else _raw_floor_gpu(layout, prompts, args.timeout))
            except Exception as e:  # noqa: BLE001 - the engine rows still run
                errors.append(f"{platform} raw floor: {e}")
                return {}

        # Loopback on small VMs flips between a slow and a fast state per process pair: the floor is
        # the best of several runs (the machine's real floor, and the stricter reference for targets).
        floor_runs = 1 if quick or platform == "gpu" else 3
        _progress(f"kv benchmark, {platform}: raw floor (before, {floor_runs} run(s))")
        floor = _best([measure_floor() for _ in range(floor_runs)])
        layer_ms = {}
        for tokens in prompts:
            if args.layer_ms is not None:
                layer_ms[str(tokens)] = args.layer_ms
            elif floor.get(tokens, {}).get("gbps"):
                layer_ms[str(tokens)] = _request_bytes(layout, tokens) / layout["num_layers"] / (floor[tokens]["gbps"] * 1e9) * 1e3
            else:
                layer_ms[str(tokens)] = 5.0
        plan = {"platform": platform, "layout": layout, "prompts": prompts, "iters": iters,
                "cancel_iters": cancel_iters, "cases": cases, "layer_ms": layer_ms, "engine_timeout": 10.0,
                "completion": args.completion, "gpus": _gpu_roles() if platform == "gpu" else {}}
        _progress(f"kv benchmark, {platform}: engine workers, layer compute {layer_ms} ms")
        try:
            records = _run_engine_pair(plan, args)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{platform} engine: {e}")
            records = []
        _progress(f"kv benchmark, {platform}: raw floor (after)")
        after = measure_floor()
        result["floors"][platform] = {"before": floor, "after": after}
        floor = _best([floor, after])
        s = summarize(platform, records, floor, layout, prompts)
        result["rows"] += s["rows"]
        result["cancel"][platform] = s["cancel"]
        result["targets"] += s["targets"]
        result.setdefault("plans", {})[platform] = plan
        result.setdefault("records", {})[platform] = records
        for r in records:
            if r.get("event") == "setup":
                result.setdefault("setup", {})[platform] = r
        xt = [r for r in records if r.get("case") == "jax_transfer" and "error" in r]
        if xt:
            notes.append(f"jax.experimental.transfer does not run on {platform} here: {xt[0]['error'][:200]}")
    result.update(notes=notes, errors=errors, elapsed_s=round(time.monotonic() - t_start, 1), quick=quick, pin=args.pin,
                  loadavg_1min=load,
                  completion=args.completion,
                  method=__doc__.split("Measured:")[1].strip() if "Measured:" in __doc__ else "")
    print_table(result)
    out = write_json(args.json, result, headline(result))
    _progress(f"wrote {out}")
    if args.plot and any(r.get("ttft_ms") for r in result["rows"]):
        note = figures.note("kv", argv, f"{os.uname().nodename}, {os.cpu_count()} CPUs, 1-min load "
                            f"{result['loadavg_1min']:.1f} at start")
        _progress(f"wrote {figures.kv(result, args.plot, note)}")
    return 1 if errors else 0


def headline(result: dict) -> dict[str, Any]:
    """The same-run ratios .ci/gpu_verify.sh prints: each target's value (with its goal and whether
    it was met), and per platform and prompt the layer-wise TTFT against the colocated one."""
    out: dict[str, Any] = {}
    for platform, setup in result.get("setup", {}).items():
        if setup.get("path"):
            out[f"{platform} path"] = f"{setup['path']} ({setup.get('path_reason', '')})"
    for t in result.get("targets", []):
        out[f"{t['platform']} {t['tokens']} {t['metric']}"] = (
            f"{t['value']:.3g} (target {t['target']}: {'met' if t['met'] else 'MISSED'})")
    ttft = {(r.get("platform"), r.get("tokens"), r.get("system")): r.get("ttft_ms") for r in result.get("rows", [])}
    for (platform, tokens, system), ms in ttft.items():
        base = ttft.get((platform, tokens, "colocated"))
        if system == "layerwise" and ms and base:
            out[f"{platform} {tokens} layer-wise TTFT / colocated"] = round(ms / base, 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
