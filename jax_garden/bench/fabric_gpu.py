"""GPU rows of the fabric benchmark: the TransferEngine moving GPU memory between two processes on
one host, against same-run baselines.

    python -m jax_garden.bench fabric-gpu [--json out.json] [--quick | --probe]

Both processes see every GPU (nothing is hidden with CUDA_VISIBLE_DEVICES): the sender (this
process) uses GPU 0, the receiver (a spawned process) GPU 1, or GPU 0 too when there is one GPU, and
then the two processes share it. Rows:
  ipc_write_<size>     CUDA IPC single writes, back to back, each with an imm (the receiver's engine
                       counts every one); baseline: the same number of copies of the same size in a
                       loop, cudaMemcpyAsync on one GPU (same device), cudaMemcpyPeerAsync on two.
                       Reported per op: engine us/op, baseline us/op, their ratio of bandwidths, and
                       the per-op overhead above the driver's copy (engine - baseline, us)
  ipc_write_<size>_copy_kernel  the same from an engine with ipc_copy_kernel_bytes=16 MiB (one copy
                       kernel copies and stores the imm record) for sizes up to 16 MiB, interleaved
                       with the default's, best of two each
  ipc_paged_<page>     one paged write of 10,000 pages (copy kernel), imm per page; baseline: a copy
                       of the same total bytes
  ipc_paged_post       host work of posting a paged write of 100,000 pages (the write_paged call,
                       from Python): pages per second (NIXL pays ~2.4 us per descriptor)
  ipc_xla_write_<size> into a jax array of the receiver (XLA's cuMemCreate memory, mapped through its
                       fd broker: VMM IPC), back to back; same baseline
  tcp_staged_gpu_gpu   GPU -> GPU forced through the tcp provider with pinned bounce buffers; baseline
                       the engine's own tcp host -> host write of the same size in this run
  h2d_pinned           cudaMemcpyAsync pinned host -> GPU (the PCIe reference; no engine row)
Engine times are wall-clock from the first submission until every op completed at the sender (an
IPC op completes once the receiver's engine took its imm record, which the copy's stream stored
after the bytes; a staged op once the receiver copied the last chunk to its GPU and counted the
imms). Baselines are timed with CUDA events. GB/s = 1e9 bytes/s. Every imm count at the receiver is
checked exactly.
Targets (one GPU, against same-device cudaMemcpyAsync): 64 KiB >= 0.6x, 1 MiB >= 0.85x,
16 MiB and more >= 0.9x, paged 16 KiB >= 0.5x, per-op overhead <= 3 us, 100,000-page post >= 2 M
pages/s; tcp-staged GPU -> GPU >= 0.8x tcp host -> host. Reported, never enforced. ``--probe``: the
quickest check of the path (64 KiB, 1 MiB, 16 MiB, one paged row, the jax-array row; no staged rows).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time

import numpy as np

from jax_garden.bench._harness import description

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

TARGETS = {64 * KiB: 0.6, MiB: 0.85}  # sizes >= 16 MiB: 0.9
OVERHEAD_TARGET_US = 3.0
KERNEL_BYTES = 16 * MiB  # the copy-kernel engine's ipc_copy_kernel_bytes
POST_TARGET_PAGES_PER_S = 2e6


def _fmt_size(n: int) -> str:
    return f"{n // GiB}GiB" if n >= GiB else f"{n // MiB}MiB" if n >= MiB else f"{n // KiB}KiB"


def _target(size: int) -> float | None:
    return TARGETS.get(size, 0.9 if size >= 16 * MiB else None)


def _receiver(conn, device: int, sizes: dict, provider: str, chunk: int, slots: int, xla_bytes: int) -> None:
    """Owns the destination buffers; answers with their descriptors, then idles until told to stop
    (every path is one-sided or served by its engine's worker), reporting its imm totals."""
    from jax_garden import fabric
    from jax_garden._jax_garden import fabric as native

    eng = fabric.TransferEngine(provider=provider, staging_chunk_bytes=chunk, staging_slots=slots, timeout=60)
    bufs, regs = [], {}
    for name, nbytes in sizes.items():
        if name.startswith("host"):
            arr = np.zeros(nbytes, np.uint8)
            bufs.append(arr)
            regs[name] = eng.register(arr)
        else:
            ptr = native.gpu_alloc(device, nbytes)
            bufs.append(ptr)
            regs[name] = eng.register((ptr, nbytes), memory="cuda")
    if xla_bytes:
        # A jax array on this process's GPU, chosen without hiding the other GPUs from CUDA.
        import os

        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the GPU may be shared
        import jax

        jax.config.update("jax_cuda_visible_devices", str(device))
        import jax.numpy as jnp

        arr = jax.device_put(jnp.zeros(xla_bytes, jnp.uint8), jax.devices("gpu")[0])
        arr.block_until_ready()
        bufs.append(arr)
        regs["xla"] = eng.register(arr)
    conn.send({k: bytes(r.descriptor) for k, r in regs.items()})
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] == "totals":
            conn.send({imm: eng.imm_counter(imm).total for imm in msg[1]})
    conn.send("bye")
    eng.close()


def _recv(conn, proc, timeout: float):
    """The receiver's next answer, or an error naming its exit code (it died) or the wait."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"fabric_gpu: the receiver process exited (code {proc.exitcode}) before it answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"fabric_gpu: the receiver did not answer within {timeout:.0f} s")
    return conn.recv()


def _time_ops(submit, count: int) -> float:
    t0 = time.perf_counter()
    ts = [submit() for _ in range(count)]
    for t in ts:
        t.wait(120)
    return time.perf_counter() - t0


def _copy_row(name: str, size: int, reps: int, dt: float, base_gbs: float, baseline: str, target) -> dict:
    us = dt / reps * 1e6
    base_us = size / (base_gbs * 1e9) * 1e6
    gbs = size * reps / dt / 1e9
    return dict(name=name, bytes=size, ops=reps, gbps=gbs, us_per_op=us, baseline=baseline, baseline_gbps=base_gbs,
                baseline_us_per_op=base_us, ratio=gbs / base_gbs, overhead_us=us - base_us, target=target)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jax_garden.bench fabric-gpu", description=description(__doc__))
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--probe", action="store_true", help="quickest check of the ipc path (a few rows)")
    ap.add_argument("--provider", default="tcp")
    ap.add_argument("--pages", type=int, default=10_000)
    ap.add_argument("--post-pages", type=int, default=100_000)
    ap.add_argument("--staged-bytes", type=int, default=256 * MiB)
    ap.add_argument("--staging-chunk", type=int, default=4 * MiB)
    ap.add_argument("--staging-slots", type=int, default=8)
    args = ap.parse_args(argv)

    from jax_garden import fabric
    from jax_garden._jax_garden import fabric as native

    if not native.gpu_available():
        print(f"fabric_gpu: no GPU ({native.gpu_status()}); nothing to measure")
        return 0
    ngpu = native.gpu_device_count()
    src_dev, dst_dev = 0, 1 if ngpu > 1 else 0
    baseline = "cudaMemcpyAsync" if src_dev == dst_dev else "cudaMemcpyPeerAsync"
    if args.probe:
        sizes = [64 * KiB, MiB, 16 * MiB]
    elif args.quick:
        sizes = [64 * KiB, MiB, 16 * MiB, 256 * MiB]
    else:
        sizes = [64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, GiB]
    page_sizes = [16 * KiB] if args.probe else [16 * KiB, 64 * KiB]
    npages = args.pages
    post_pages, post_page = args.post_pages, 4 * KiB
    big = max(sizes)
    paged_bytes = npages * max(page_sizes)
    xla_size = 16 * MiB
    recv_sizes = {"single": big, "paged": max(paged_bytes, post_pages * post_page)}
    if not args.probe:
        recv_sizes.update(staged=args.staged_bytes, host=args.staged_bytes)
    src_bytes_needed = max(big, paged_bytes, post_pages * post_page, 0 if args.probe else args.staged_bytes)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child, dst_dev, recv_sizes, args.provider, args.staging_chunk,
                                               args.staging_slots, 4 * xla_size), daemon=True)
    proc.start()
    rows: list[dict] = []
    post: dict = {}
    stats: dict = {}
    kernel_stats: dict = {}
    imm_ok = False
    try:
        descs = {k: fabric.MemoryDescriptor.from_bytes(v) for k, v in _recv(parent, proc, 120).items()}
        eng = fabric.TransferEngine(provider=args.provider, staging_chunk_bytes=args.staging_chunk,
                                    staging_slots=args.staging_slots, timeout=60)
        src_ptr = native.gpu_alloc(src_dev, src_bytes_needed)
        src_bytes = np.random.default_rng(0).integers(0, 256, 64 * MiB, dtype=np.uint8)
        native.gpu_memcpy(src_ptr, src_bytes.ctypes.data, src_bytes.nbytes)
        rs = eng.register((src_ptr, src_bytes_needed), memory="cuda")
        path, why = eng.path_for(rs, descs["single"], why=True)
        xla_path, xla_why = eng.path_for(rs, descs["xla"], why=True)
        print(f"# {ngpu} GPU(s), sender GPU {src_dev} -> receiver GPU {dst_dev} ({'shared' if src_dev == dst_dev else 'peer'}),"
              f" provider {eng.provider}; cudaMalloc destination: {path} ({why}); jax-array destination: {xla_path}"
              f" ({xla_why})", flush=True)
        imm_counts: dict[int, int] = {}

        def count(imm: int, n: int) -> None:
            imm_counts[imm] = imm_counts.get(imm, 0) + n

        budget = GiB if (args.quick or args.probe) else 4 * GiB
        # ---- IPC single writes vs the driver's copy ----------------------------------------------------
        # Writes up to KERNEL_BYTES are timed twice, interleaved, best of two each: from this engine
        # (the driver's copy, then a stream write of the imm record: the default) and from a second
        # engine with the opt-in copy kernel (one launch copies and stores the record).
        kernel_eng = fabric.TransferEngine(provider=args.provider, timeout=60, ipc_copy_kernel_bytes=KERNEL_BYTES)
        kernel_rs = kernel_eng.register((src_ptr, src_bytes_needed), memory="cuda")
        for i, size in enumerate(sizes):
            reps = int(min(2000, max(3, budget // size)))
            imm = 100 + i
            senders = [(eng, rs)] + ([(kernel_eng, kernel_rs)] if size <= KERNEL_BYTES else [])
            for e, r in senders:
                e.write(r, descs["single"], size, imm=imm).wait(60)  # warm-up (maps the peer allocation)
                count(imm, 1)
            best = [float("inf")] * len(senders)
            for _ in range(2 if len(senders) > 1 else 1):
                for k, (e, r) in enumerate(senders):
                    best[k] = min(best[k], _time_ops(lambda: e.write(r, descs["single"], size, imm=imm), reps))
                    count(imm, reps)
            base = native.bench_peer_copy(src_dev, dst_dev, size, reps)
            row = _copy_row(f"ipc_write_{_fmt_size(size)}", size, reps, best[0], base, baseline, _target(size))
            rows.append(row)
            if len(senders) > 1:
                kr = _copy_row(f"ipc_write_{_fmt_size(size)}_copy_kernel", size, reps, best[1], base, baseline,
                               _target(size))
                kr["speedup_vs_driver_copy"] = best[0] / best[1]
                rows.append(kr)
        kernel_stats = kernel_eng.staging_stats()
        kernel_eng.close()

        # ---- IPC paged writes (copy kernel) vs a copy of the same bytes ---------------------------------
        rng = np.random.default_rng(1)
        for j, page in enumerate(page_sizes):
            sp = rng.permutation(npages).astype(np.uint32)
            dp = rng.permutation(npages).astype(np.uint32)
            imm = 200 + j
            reps = 3 if (args.quick or args.probe) else 5
            eng.write_paged(rs, descs["paged"], page, sp, dp, page, page, imm=imm).wait(60)
            count(imm, npages)
            dt = _time_ops(lambda: eng.write_paged(rs, descs["paged"], page, sp, dp, page, page, imm=imm), reps)
            count(imm, npages * reps)
            total = page * npages
            base = native.bench_peer_copy(src_dev, dst_dev, total, reps)
            rows.append(_copy_row(f"ipc_paged_{_fmt_size(page)}x{npages}", total, reps, dt, base, baseline,
                                  0.5 if page == 16 * KiB else None))

        # ---- host work of posting 100,000 pages -----------------------------------------------------
        sp = rng.permutation(post_pages).astype(np.uint32)
        dp = rng.permutation(post_pages).astype(np.uint32)
        eng.write_paged(rs, descs["paged"], post_page, sp, dp, post_page, post_page, imm=250).wait(60)
        count(250, post_pages)
        posts = []
        for _ in range(3):
            t0 = time.perf_counter()
            t = eng.write_paged(rs, descs["paged"], post_page, sp, dp, post_page, post_page, imm=250)
            t1 = time.perf_counter()
            t.wait(60)
            t2 = time.perf_counter()
            count(250, post_pages)
            posts.append((t1 - t0, t2 - t0))
        post_s, done_s = min(posts)
        post = dict(name=f"ipc_paged_post_{post_pages}", pages=post_pages, page_bytes=post_page, post_s=post_s,
                    pages_per_s=post_pages / post_s, done_s=done_s, target_pages_per_s=POST_TARGET_PAGES_PER_S)

        # ---- into a jax array of the receiver (VMM IPC) ----------------------------------------------
        reps = int(budget // xla_size)
        eng.write(rs, descs["xla"], xla_size, imm=260).wait(60)
        count(260, 1)
        dt = _time_ops(lambda: eng.write(rs, descs["xla"], xla_size, imm=260), reps)
        count(260, reps)
        base = native.bench_peer_copy(src_dev, dst_dev, xla_size, reps)
        row = _copy_row(f"ipc_xla_write_{_fmt_size(xla_size)}", xla_size, reps, dt, base, baseline, 0.9)
        row["path"] = xla_path
        rows.append(row)

        if not args.probe:
            # ---- tcp-staged GPU -> GPU vs tcp host -> host (same engines, same run) ------------------
            n = args.staged_bytes
            host_src = np.ones(n, np.uint8)
            rh = eng.register(host_src)
            reps = 2 if args.quick else 4
            eng.write(rh, descs["host"], n, imm=300).wait(120)  # warm-up both (connections, pools, first touch)
            eng.write(rs, descs["staged"], n, imm=301, path="staged").wait(120)
            eng_imms = fabric.imm_writes("write", domains=eng.num_domains, length=n)
            count(300, eng_imms)
            count(301, eng_imms)
            host_dt = min(_time_ops(lambda: eng.write(rh, descs["host"], n, imm=300), 1) for _ in range(reps))
            staged_dt = min(_time_ops(lambda: eng.write(rs, descs["staged"], n, imm=301, path="staged"), 1)
                            for _ in range(reps))
            count(300, eng_imms * reps)
            count(301, eng_imms * reps)
            host_gbs, staged_gbs = n / host_dt / 1e9, n / staged_dt / 1e9
            rows.append(dict(name="tcp_host_host", bytes=n, ops=1, gbps=host_gbs, baseline=None, baseline_gbps=None,
                             ratio=None, target=None))
            rows.append(dict(name="tcp_staged_gpu_gpu", bytes=n, ops=1, gbps=staged_gbs, baseline="tcp_host_host",
                             baseline_gbps=host_gbs, ratio=staged_gbs / host_gbs, target=0.8))
            # ---- PCIe reference --------------------------------------------------------------------------
            h2d = native.bench_host_to_device(dst_dev, 256 * MiB, 10)
            rows.append(dict(name="h2d_pinned", bytes=256 * MiB, ops=10, gbps=h2d, baseline=None, baseline_gbps=None,
                             ratio=None, target=None))

        # every imm arrived exactly as counted
        parent.send(("totals", list(imm_counts)))
        deadline = time.monotonic() + 30
        while True:
            totals = _recv(parent, proc, 30)
            if totals == imm_counts or time.monotonic() > deadline:
                break
            time.sleep(0.2)
            parent.send(("totals", list(imm_counts)))
        imm_ok = totals == imm_counts
        stats = eng.staging_stats()
        eng.close()
        native.gpu_free(src_ptr)
    finally:
        try:
            parent.send(("stop",))
            _recv(parent, proc, 10)
        except Exception:
            pass
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()

    print(f"{'row':28} {'GB/s':>9} {'us/op':>9} {'baseline':>20} {'base GB/s':>10} {'base us':>9} {'ratio':>7} "
          f"{'+us/op':>7} {'target':>7}")
    for r in rows:
        base = f"{r['baseline_gbps']:.1f}" if r["baseline_gbps"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        target = f">={r['target']:.2f}" if r["target"] else "-"
        ok = "" if r["target"] is None else ("  ok" if r["ratio"] >= r["target"] else "  MISS")
        us = f"{r['us_per_op']:.1f}" if "us_per_op" in r else "-"
        bus = f"{r['baseline_us_per_op']:.1f}" if "baseline_us_per_op" in r else "-"
        over = f"{r['overhead_us']:.1f}" if "overhead_us" in r else "-"
        print(f"{r['name']:28} {r['gbps']:9.1f} {us:>9} {r['baseline'] or '-':>20} {base:>10} {bus:>9} {ratio:>7} "
              f"{over:>7} {target:>7}{ok}")
    if post:
        print(f"{post['name']:28} post {post['post_s'] * 1e3:.2f} ms = {post['pages_per_s'] / 1e6:.2f} M pages/s "
              f"(target >= {POST_TARGET_PAGES_PER_S / 1e6:.0f} M), done after {post['done_s'] * 1e3:.2f} ms")
    print(f"imm counts at the receiver exact: {imm_ok}; imm records stored by the GPU stream: "
          f"{stats.get('ipc_stream_records', 0)} (by a copy kernel: {stats.get('ipc_kernel_records', 0)}), "
          f"after an event: {stats.get('ipc_event_records', 0)}; the copy-kernel engine's: "
          f"{kernel_stats.get('ipc_stream_records', 0)} (by its copy kernel: {kernel_stats.get('ipc_kernel_records', 0)})")
    for r in rows:
        if "speedup_vs_driver_copy" in r:
            print(f"{r['name']}: {r['us_per_op']:.1f} us/op against the default's (cudaMemcpyAsync + "
                  f"cuStreamWriteValue64) {r['us_per_op'] * r['speedup_vs_driver_copy']:.1f} us/op: "
                  f"{r['speedup_vs_driver_copy']:.2f}x")
    headline: dict[str, float] = {}
    for r in rows:
        if r.get("ratio") is not None:
            headline[f"{r['name']} / {r['baseline']}"] = r["ratio"]
        if r.get("overhead_us") is not None and r["name"].startswith("ipc_write"):
            headline[f"{r['name']} overhead us/op"] = r["overhead_us"]
        if "speedup_vs_driver_copy" in r:
            headline[f"{r['name']} speed / the default's"] = r["speedup_vs_driver_copy"]
    if post:
        headline[f"{post['name']} M pages/s posted"] = post["pages_per_s"] / 1e6
    out = dict(benchmark="fabric_gpu", gpus=ngpu, src_device=src_dev, dst_device=dst_dev, shared_gpu=src_dev == dst_dev,
               provider=args.provider, path=path, path_reason=why, xla_path=xla_path, xla_path_reason=xla_why,
               imm_counts_exact=imm_ok, ipc_records=dict((k, v) for k, v in stats.items() if k.startswith("ipc_")),
               copy_kernel_bytes=KERNEL_BYTES, copy_kernel_records=kernel_stats.get("ipc_kernel_records", 0),
               rows=rows, paged_post=post, headline=headline)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if imm_ok else 1


if __name__ == "__main__":
    sys.exit(main())
