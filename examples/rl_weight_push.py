"""RL weight push: a trainer job updates a small model and pushes every new version to an inference
job, which serves it: you see the served model learn, version by version.

    python examples/rl_weight_push.py            # CPU over tcp (default), or GPUs when 2 are present
    python examples/rl_weight_push.py --quick    # tiny model, 2 steps (the test runs this)
    python examples/rl_weight_push.py --device gpu

Two separate JAX jobs, each of 2 processes with its own ``jax.distributed`` coordinator:

* trainer job: the parameters are FSDP-sharded over its 2 processes (dimension 0). It pushes the
  initial parameters as version 0, then every step is an SGD step on a next-token loss (``jax.grad``;
  XLA adds the collectives) over one training sequence, 0 7 14 21 ..., followed by
  ``Publisher.push(params, step)``;
* inference job: tensor parallel over its 2 processes (column-parallel up projection and head,
  row-parallel down projection); the two MLP matrices arrive as fp8 e4m3 with 16x16 block scales
  (quantized by the trainers while they send), the rest as bf16. Each process ``wait``s for the
  version, then, inside ``jax.jit`` with the served weights, computes the loss on the training
  sequence and decodes greedily from token 0. Per version the example prints the trainer's loss and
  the served one (equal up to fp8 rounding) and the greedy tokens, which turn into the training
  sequence as the versions come in.

This launcher is "the caller that moves bytes" between the jobs: each side's ``Layout`` and the
subscribers' engine addresses go through it (pipes); the weights go point to point over the
TransferEngine. After each step it hands the trainer's parameters (gathered, only for this check)
to the inference processes, which verify their shards: bf16 bitwise, fp8 within the e4m3 bound.

On GPUs each process uses one GPU, chosen with ``jax.distributed``'s ``local_device_ids`` while
every GPU stays visible to CUDA (trainer rank r and inference rank r share GPU r: colocated 2 -> 2),
and the engine moves GPU memory over CUDA IPC, into XLA's own buffers. It needs 2 GPUs: the trainer
job's collectives (NCCL) refuse two ranks on one GPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

import numpy as np

SIZES = {"quick": dict(vocab=64, dim=32, ffn=64, steps=2, tokens=6, batch=8, lr=0.2),
         "full": dict(vocab=512, dim=256, ffn=1024, steps=5, tokens=8, batch=32, lr=0.5)}
BLOCK = (16, 16)
TIMEOUT = 120.0


def _setup_jax(device: str, rank: int, port: int) -> None:
    if device == "gpu":
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # two processes per GPU
    else:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if device == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # GPU: this process's JAX uses GPU `rank`; CUDA still sees every GPU (the engine maps peers' memory).
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank, initialization_timeout=60,
                               local_device_ids=[rank] if device == "gpu" else None)


def _shapes(cfg: dict) -> dict:
    V, D, F = cfg["vocab"], cfg["dim"], cfg["ffn"]
    return {"embed": (V, D), "norm": (D,), "w_up": (D, F), "w_down": (F, D), "head": (D, V)}


def _forward(p: dict, tokens, up, down):
    """Per-token MLP language model (a bigram model: enough to show the weights at work)."""
    import jax.numpy as jnp

    h = p["embed"][tokens].astype(jnp.float32)
    h = h * jnp.reciprocal(jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)) * p["norm"].astype(jnp.float32)
    h = h + jnp.maximum(h @ up, 0.0) @ down
    return h @ p["head"].astype(jnp.float32)


def _loss(p: dict, seq, up, down):
    """Mean next-token cross-entropy over ``seq``."""
    import jax
    import jax.numpy as jnp

    logits = _forward(p, seq[:-1], up, down)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), seq[1:, None], 1))


def _training_sequence(cfg: dict) -> np.ndarray:
    return (np.arange(cfg["batch"] + 1) * 7 % cfg["vocab"]).astype(np.int32)


# ------------------------------------------------------------------------------------- trainer


def trainer(rank: int, cfg: dict, device: str, port: int, conn) -> None:
    try:
        _setup_jax(device, rank, port)
        import jax
        import jax.numpy as jnp
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jax_garden import weights

        mesh = Mesh(np.array(jax.devices()), ("fsdp",))
        shard = {k: NamedSharding(mesh, P("fsdp") if k != "norm" else P()) for k in _shapes(cfg)}
        specs = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=shard[k]) for k, s in _shapes(cfg).items()}
        src_layout = weights.Layout.from_pytree(specs)
        conn.send(("layout", src_layout.to_bytes()))
        dst_layout = weights.Layout.from_bytes(conn.recv())
        plan = weights.Plan(src_layout, dst_layout, chunk_bytes=64 << 10)
        pub = weights.Publisher(plan, staging_bytes=1 << 20, timeout=TIMEOUT)
        pub.connect(conn.recv())  # the subscribers' addresses, moved by the launcher

        rng = np.random.default_rng(0)
        init = {k: (np.ones(s) if k == "norm" else rng.standard_normal(s) / np.sqrt(s[0] if k != "embed" else 1))
                .astype(np.float32) for k, s in _shapes(cfg).items()}
        params = {k: jax.make_array_from_callback(v.shape, shard[k], lambda idx, a=v: jnp.asarray(a[idx], jnp.bfloat16))
                  for k, v in init.items()}
        seq = _training_sequence(cfg)
        data = jax.make_array_from_callback(seq.shape, NamedSharding(mesh, P()), lambda idx: seq[idx])

        def loss(p, seq):
            return _loss(p, seq, p["w_up"].astype(jnp.float32), p["w_down"].astype(jnp.float32))

        # out_shardings keep every parameter where the plan says it is (push checks it).
        @jax.jit
        def train_step(p, seq):
            g = jax.grad(loss)(p, seq)
            new = {k: (p[k].astype(jnp.float32) - cfg["lr"] * g[k].astype(jnp.float32)).astype(jnp.bfloat16)
                   for k in p}
            return {k: jax.lax.with_sharding_constraint(v, shard[k]) for k, v in new.items()}

        eval_loss = jax.jit(loss)
        for version in range(cfg["steps"] + 1):  # version 0: the initial parameters
            if version:
                params = train_step(params, data)
            t0 = time.perf_counter()
            h = pub.push(params, version).wait(TIMEOUT)
            push_s = time.perf_counter() - t0
            full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in params.items()}
            trained = float(np.asarray(eval_loss(params, data).addressable_shards[0].data))  # every rank takes part
            if rank == 0:
                conn.send(("pushed", version, trained, push_s, sum(h.bytes_sent.values()), full))
            conn.recv()  # the inference job checked this version
        pub.close()
        conn.send(("done",))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"trainer {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        import jax

        jax.distributed.shutdown()


# ----------------------------------------------------------------------------------- inference


def inference(rank: int, cfg: dict, device: str, port: int, conn) -> None:
    try:
        _setup_jax(device, rank, port)
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jax_garden import weights

        mesh = Mesh(np.array(jax.devices()), ("tp",))
        sh = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
        S = _shapes(cfg)
        specs = {"embed": jax.ShapeDtypeStruct(S["embed"], jnp.bfloat16, sharding=sh()),
                 "norm": jax.ShapeDtypeStruct(S["norm"], jnp.bfloat16, sharding=sh()),
                 "w_up": weights.fp8_spec(S["w_up"], sh(None, "tp"), sh(None, "tp"), BLOCK),
                 "w_down": weights.fp8_spec(S["w_down"], sh("tp", None), sh("tp", None), BLOCK),
                 "head": jax.ShapeDtypeStruct(S["head"], jnp.bfloat16, sharding=sh(None, "tp"))}
        for k in ("w_up", "w_down"):  # fp8_spec makes TensorSpecs; jax.ShapeDtypeStruct works as well
            w, s = specs[k].weight, specs[k].scale
            specs[k] = weights.Fp8(jax.ShapeDtypeStruct(w.shape, jnp.float8_e4m3fn, sharding=w.sharding),
                                   jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=s.sharding), BLOCK)
        dst_layout = weights.Layout.from_pytree(specs)
        conn.send(("layout", dst_layout.to_bytes()))
        src_layout = weights.Layout.from_bytes(conn.recv())
        plan = weights.Plan(src_layout, dst_layout, chunk_bytes=64 << 10)
        sub = weights.Subscriber(plan, specs)
        conn.send(("address", sub.address))
        sub.set_peers(conn.recv())

        def dequant(q):
            s = jnp.repeat(jnp.repeat(q.scale, BLOCK[0], 0), BLOCK[1], 1)
            return q.weight.astype(jnp.float32) * s

        @jax.jit
        def served(p, seq):
            """The served model at work: its loss on the training sequence, and greedy decoding from token 0."""
            up, down = dequant(p["w_up"]), dequant(p["w_down"])

            def step(tok, _):
                nxt = jnp.argmax(_forward(p, tok[None], up, down)[0]).astype(jnp.int32)
                return nxt, nxt

            _, tokens = jax.lax.scan(step, jnp.int32(0), None, length=cfg["tokens"])
            return _loss(p, seq, up, down), tokens

        seq = jnp.asarray(_training_sequence(cfg))
        for version in range(cfg["steps"] + 1):
            ref = conn.recv()
            t0 = time.perf_counter()
            sub.wait(version, TIMEOUT)
            waited = time.perf_counter() - t0
            with sub.hold() as (version, p):
                bad = []
                for k in ("embed", "norm", "head"):
                    for s in p[k].addressable_shards:
                        if not np.array_equal(np.asarray(s.data).view(np.uint16), ref[k][s.index].view(np.uint16)):
                            bad.append(k)
                worst = 0.0
                for k in ("w_up", "w_down"):
                    for ws, ss in zip(p[k].weight.addressable_shards, p[k].scale.addressable_shards):
                        deq = weights.dequantize_fp8(np.asarray(ws.data), np.asarray(ss.data), BLOCK)
                        x = ref[k][ws.index].astype(np.float32)
                        err = np.abs(deq - x)
                        bound = weights.fp8_error_bound(x, np.asarray(ss.data), BLOCK)
                        worst = max(worst, float((err / bound).max()))
                loss, tokens = served(p, seq)
                loss = float(np.asarray(loss.addressable_shards[0].data))
                out = np.asarray(tokens.addressable_shards[0].data).tolist()
            conn.send(("checked", version, not bad, bad, worst, waited, loss, out))
        sub.close()
        conn.send(("done",))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"inference {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        import jax

        jax.distributed.shutdown()


# ------------------------------------------------------------------------------------ launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpus() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _recv(conn, who: str, timeout: float = TIMEOUT):
    if not conn.poll(timeout):
        raise TimeoutError(f"{who}: no message within {timeout} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(msg[1])
    return msg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 steps")
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    args = ap.parse_args(argv)
    cfg = SIZES["quick" if args.quick else "full"]
    device = args.device if args.device != "auto" else ("gpu" if _gpus() >= 2 else "cpu")
    print(f"trainer job (2 processes, FSDP) -> inference job (2 processes, TP), {device}, "
          f"model {_shapes(cfg)}, versions 0..{cfg['steps']}", flush=True)
    print(f"training sequence: {' '.join(map(str, _training_sequence(cfg)))}", flush=True)

    ctx = mp.get_context("spawn")
    tport, iport = _free_port(), _free_port()
    procs, tconn, iconn = [], [], []
    for role, port, conns in ((trainer, tport, tconn), (inference, iport, iconn)):
        for r in range(2):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=role, args=(r, cfg, device, port, child), daemon=True)
            p.start()
            procs.append(p)
            conns.append(parent)
    try:
        src_layout = _recv(tconn[0], "trainer 0")[1]
        _recv(tconn[1], "trainer 1")
        dst_layout = _recv(iconn[0], "inference 0")[1]
        _recv(iconn[1], "inference 1")
        for c in tconn:
            c.send(dst_layout)
        for c in iconn:
            c.send(src_layout)
        addrs = [_recv(c, f"inference {r}")[1] for r, c in enumerate(iconn)]
        for c in iconn + tconn:
            c.send(addrs)
        ok_bf16 = ok_fp8 = True
        seq = _training_sequence(cfg)[1:cfg["tokens"] + 1].tolist()
        header = (f"{'version':>7} {'trainer loss':>12} {'served loss':>11} {'push ms':>8} {'wait ms':>8}   "
                  "greedy tokens from 0 (served weights)")
        for step in range(cfg["steps"] + 1):
            _, version, loss, push_s, nbytes, full = _recv(tconn[0], "trainer 0")
            for c in iconn:
                c.send(full)
            for r, c in enumerate(iconn):
                _, served_version, bitwise, bad, worst, waited, served_loss, tokens = _recv(c, f"inference {r}")
                ok_bf16 &= bitwise
                ok_fp8 &= worst <= 1.0
                if r == 0:
                    follow = sum(a == b for a, b in zip(tokens, seq))
                    if step == 0:  # after the first version: the jobs' start-up chatter is over by then
                        print(header)
                    print(f"{served_version:>7} {loss:>12.4f} {served_loss:>11.4f} {push_s * 1e3:>8.1f} "
                          f"{waited * 1e3:>8.1f}   {' '.join(map(str, tokens))}  ({follow}/{len(seq)} follow the "
                          f"sequence)", flush=True)
                if not bitwise:
                    print(f"  inference {r}: bf16 mismatch in {bad}", flush=True)
                if worst > 1.0:
                    print(f"  inference {r}: fp8 error {worst:.2f}x the bound", flush=True)
            for c in tconn:
                c.send("next")
        for r, c in enumerate(tconn + iconn):
            _recv(c, f"process {r}")
        print("push ms: Publisher.push(...).wait() on trainer 0; wait ms: Subscriber.wait(version) on inference 0 "
              "once the push was known done; served loss: with the fp8 MLP weights as received")
        print(f"bf16 bitwise: {'ok' if ok_bf16 else 'FAILED'}")
        print(f"fp8 within bound: {'ok' if ok_fp8 else 'FAILED'}")
        return 0 if ok_bf16 and ok_fp8 else 1
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)


if __name__ == "__main__":
    sys.exit(main())
