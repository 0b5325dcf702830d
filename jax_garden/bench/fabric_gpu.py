"""GPU rows of the fabric benchmark: the TransferEngine moving GPU memory between two processes on
one host, against same-run baselines.

    python -m jax_garden.bench.fabric_gpu [--json out.json] [--quick]

Rows (sender: this process, GPU 0; receiver: a spawned process, GPU 1, or GPU 0 with one GPU):
  ipc_write_<size>     CUDA IPC single writes (copy engines), back to back, each with an imm;
                       baseline cudaMemcpyPeerAsync GPU0 -> GPU1 of the same size in a loop
  ipc_paged_<page>     one paged write of 10,000 pages (copy kernel), imm per page; baseline peer
                       copy of the same total bytes
  tcp_staged_gpu_gpu   GPU -> GPU forced through the tcp provider with pinned bounce buffers; baseline
                       the engine's own tcp host -> host write of the same size in this run
  h2d_pinned           cudaMemcpyAsync pinned host -> GPU (the PCIe reference; no engine row)
Engine times are wall-clock from the first submission until every op completed at the sender (an
IPC op completes once its copy finished and its imm was handed to libfabric; a staged op once the
receiver copied the last chunk to its GPU and counted the imms). Baselines are timed with CUDA
events. GB/s = 1e9 bytes/s.
Targets: IPC single writes >= 1 MiB at >= 85% of peer copy; 16 KiB paged >= 50%; tcp-staged
GPU -> GPU >= 80% of tcp host -> host.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from jax_garden.bench._harness import description

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _fmt_size(n: int) -> str:
    return f"{n // GiB}GiB" if n >= GiB else f"{n // MiB}MiB" if n >= MiB else f"{n // KiB}KiB"


def _receiver(conn, device: int, sizes: dict, provider: str, chunk: int, slots: int) -> None:
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
    conn.send({k: bytes(r.descriptor) for k, r in regs.items()})
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] == "totals":
            conn.send({imm: eng.imm_counter(imm).total for imm in msg[1]})
    conn.send("bye")
    eng.close()


def _time_ops(submit, count: int) -> float:
    t0 = time.perf_counter()
    ts = [submit() for _ in range(count)]
    for t in ts:
        t.wait(120)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jax_garden.bench fabric-gpu", description=description(__doc__))
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--provider", default="tcp")
    ap.add_argument("--pages", type=int, default=10_000)
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
    sizes = [64 * KiB, 1 * MiB, 16 * MiB, 256 * MiB] if args.quick else \
        [64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB]
    page_sizes = [16 * KiB, 64 * KiB]
    npages = args.pages
    big = max(sizes)
    paged_bytes = npages * max(page_sizes)
    recv_sizes = {"single": big, "paged": paged_bytes, "staged": args.staged_bytes, "host": args.staged_bytes}

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child, dst_dev, recv_sizes, args.provider, args.staging_chunk,
                                               args.staging_slots), daemon=True)
    proc.start()
    rows: list[dict] = []
    try:
        descs = {k: fabric.MemoryDescriptor.from_bytes(v) for k, v in parent.recv().items()}
        eng = fabric.TransferEngine(provider=args.provider, staging_chunk_bytes=args.staging_chunk,
                                    staging_slots=args.staging_slots, timeout=60)
        src_ptr = native.gpu_alloc(src_dev, max(big, paged_bytes, args.staged_bytes))
        src_bytes = np.random.default_rng(0).integers(0, 256, 64 * MiB, dtype=np.uint8)
        native.gpu_memcpy(src_ptr, src_bytes.ctypes.data, src_bytes.nbytes)
        rs = eng.register((src_ptr, max(big, paged_bytes, args.staged_bytes)), memory="cuda")
        path = eng.path_for(rs, descs["single"])
        print(f"# {ngpu} GPU(s), sender GPU {src_dev} -> receiver GPU {dst_dev}, provider {eng.provider}, "
              f"auto path {path}", flush=True)
        imm_counts: dict[int, int] = {}

        def count(imm: int, n: int) -> None:
            imm_counts[imm] = imm_counts.get(imm, 0) + n

        # ---- IPC single writes vs cudaMemcpyPeerAsync ------------------------------------------------
        for i, size in enumerate(sizes):
            reps = int(min(2000, max(3, (4 * GiB if not args.quick else GiB) // size)))
            imm = 100 + i
            eng.write(rs, descs["single"], size, imm=imm).wait(60)  # warm-up (maps the peer allocation)
            count(imm, 1)
            dt = _time_ops(lambda: eng.write(rs, descs["single"], size, imm=imm), reps)
            count(imm, reps)
            gbs = size * reps / dt / 1e9
            base = native.bench_peer_copy(src_dev, dst_dev, size, reps)
            rows.append(dict(name=f"ipc_write_{_fmt_size(size)}", bytes=size, ops=reps, gbps=gbs,
                             baseline="cudaMemcpyPeerAsync", baseline_gbps=base, ratio=gbs / base,
                             target=0.85 if size >= MiB else None))

        # ---- IPC paged writes (copy kernel) vs peer copy of the same bytes ----------------------------
        rng = np.random.default_rng(1)
        for j, page in enumerate(page_sizes):
            sp = rng.permutation(npages).astype(np.uint32)
            dp = rng.permutation(npages).astype(np.uint32)
            imm = 200 + j
            reps = 3 if args.quick else 5
            eng.write_paged(rs, descs["paged"], page, sp, dp, page, page, imm=imm).wait(60)
            count(imm, npages)
            dt = _time_ops(lambda: eng.write_paged(rs, descs["paged"], page, sp, dp, page, page, imm=imm), reps)
            count(imm, npages * reps)
            total = page * npages
            gbs = total * reps / dt / 1e9
            base = native.bench_peer_copy(src_dev, dst_dev, total, reps)
            rows.append(dict(name=f"ipc_paged_{_fmt_size(page)}x{npages}", bytes=total, ops=reps, gbps=gbs,
                             baseline="cudaMemcpyPeerAsync", baseline_gbps=base, ratio=gbs / base,
                             target=0.5 if page == 16 * KiB else None))

        # ---- tcp-staged GPU -> GPU vs tcp host -> host (same engines, same run) ----------------------
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

        # ---- PCIe reference ----------------------------------------------------------------------------
        h2d = native.bench_host_to_device(dst_dev, 256 * MiB, 10)
        rows.append(dict(name="h2d_pinned", bytes=256 * MiB, ops=10, gbps=h2d, baseline=None, baseline_gbps=None,
                         ratio=None, target=None))

        # every imm arrived exactly as counted
        parent.send(("totals", list(imm_counts)))
        deadline = time.monotonic() + 30
        while True:
            totals = parent.recv()
            if totals == imm_counts or time.monotonic() > deadline:
                break
            time.sleep(0.2)
            parent.send(("totals", list(imm_counts)))
        imm_ok = totals == imm_counts
        eng.close()
        native.gpu_free(src_ptr)
    finally:
        try:
            parent.send(("stop",))
            parent.recv()
        except Exception:
            pass
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()

    print(f"{'row':28} {'GB/s':>9} {'baseline':>20} {'base GB/s':>10} {'ratio':>7} {'target':>7}")
    for r in rows:
        base = f"{r['baseline_gbps']:.1f}" if r["baseline_gbps"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        target = f">={r['target']:.2f}" if r["target"] else "-"
        ok = "" if r["target"] is None else ("  ok" if r["ratio"] >= r["target"] else "  MISS")
        print(f"{r['name']:28} {r['gbps']:9.1f} {r['baseline'] or '-':>20} {base:>10} {ratio:>7} {target:>7}{ok}")
    print(f"imm counts at the receiver exact: {imm_ok}")
    out = dict(benchmark="fabric_gpu", gpus=ngpu, src_device=src_dev, dst_device=dst_dev, provider=args.provider,
               path=path, imm_counts_exact=imm_ok, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if imm_ok else 1


if __name__ == "__main__":
    sys.exit(main())
