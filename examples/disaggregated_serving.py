"""Disaggregated serving: a prefill process streams each request's KV cache, layer by layer while its
prefill runs, into the paged cache of a decode process (jax_garden.kv on the TransferEngine); the
decode process generates greedily and checks every token against the same model run colocated.

    python examples/disaggregated_serving.py            # CPU over tcp (or 2 GPUs, one per process)
    python examples/disaggregated_serving.py --quick    # a short configuration (the test suite runs it)

A small Llama-style decoder in plain JAX (RMSNorm, RoPE, grouped-query attention, SwiGLU; random
weights from a fixed seed, so both processes build the same model). The launcher starts two
processes:

* **prefill**: receives (ticket, prompt) pairs, opens a stream per request, runs the jitted prefill
  (which writes each layer's K/V into its own paged cache and marks the layer with
  ``kv.mark_layer``), commits, and ``finish``es with a payload = first sampled token + timestamps;
* **decode**: reserves pages per request, sends the tickets with the prompts, polls the requests,
  and runs a batched greedy decode step over the READY ones (paged attention over its cache).

Afterwards the decode process runs the same prefill and decode programs colocated (no transfer)
and compares every generated token; the exit status is non-zero on any difference or error.
Per request it prints TTFT = ticket sent -> first decode step done, split into queue (ticket
sent -> prefill started), prefill compute, transfer tail (READY - the prefill's last layer mark;
both processes read CLOCK_MONOTONIC of this host) and the first decode step.

On a machine with GPUs (and a CUDA build) each process uses one GPU, chosen with
``jax_cuda_visible_devices`` while every GPU stays visible to CUDA (the prefill GPU 0, the decode
GPU 1, or both GPU 0 on a one-GPU machine, sharing it), and the KV moves GPU to GPU over CUDA IPC
into the decode process's own XLA buffers; each side prints the path. Otherwise both run on CPU and
the KV moves over libfabric tcp.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import shutil
import struct
import subprocess
import sys
import threading
import time
from typing import Any

# ---------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256      # bytes
    dim: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    ffn: int = 256
    rope_theta: float = 10000.0
    eps: float = 1e-5


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4 + 9 * cfg.layers))

    def w(shape, fan_in):
        return jax.random.normal(next(keys), shape, jnp.float32) / jnp.sqrt(fan_in)

    D, H, KH, hd, F = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn
    layers = [dict(attn_norm=1.0 + 0.1 * w((D,), 1), wq=w((D, H * hd), D), wk=w((D, KH * hd), D),
                   wv=w((D, KH * hd), D), wo=w((H * hd, D), H * hd), mlp_norm=1.0 + 0.1 * w((D,), 1),
                   w1=w((D, F), D), w3=w((D, F), D), w2=w((F, D), F)) for _ in range(cfg.layers)]
    return dict(embed=w((cfg.vocab, D), 1), layers=layers, final_norm=1.0 + 0.1 * w((D,), 1),
                lm_head=w((D, cfg.vocab), D))


def rms_norm(x, weight, eps):
    import jax.numpy as jnp

    return x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)) * weight


def rope(x, pos, theta):
    """x[..., H, hd] at positions pos[...] (rotate-half form)."""
    import jax.numpy as jnp

    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = pos.astype(jnp.float32)[..., None, None] * freqs
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q, k, v, mask, cfg: ModelConfig):
    """q[..., Tq, H, hd], k/v[..., Tk, KH, hd], mask[..., Tq, Tk] -> [..., Tq, H*hd] (GQA)."""
    import jax
    import jax.numpy as jnp

    g = cfg.heads // cfg.kv_heads
    q = q.reshape(*q.shape[:-2], cfg.kv_heads, g, cfg.head_dim)
    s = jnp.einsum("...qkgd,...tkd->...kgqt", q, k) / jnp.sqrt(jnp.float32(cfg.head_dim))
    s = jnp.where(mask[..., None, None, :, :], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("...kgqt,...tkd->...qkgd", p, v)
    return o.reshape(*o.shape[:-3], cfg.heads * cfg.head_dim)


def mlp(x, lp):
    import jax

    return (jax.nn.silu(x @ lp["w1"]) * (x @ lp["w3"])) @ lp["w2"]


def make_prefill(cfg: ModelConfig, layout: Any, marks: Any, max_prompt: int):
    """jit(params, ks, vs, tokens[P], n, page_table[P/T], mark_token) -> (ks, vs, first_token).
    Writes each layer's K/V into the pages (HND) of the donated cache, then marks the layer."""
    import jax
    import jax.numpy as jnp

    from jax_garden import kv

    T, dt = layout.page_tokens, layout.np_dtype
    P = max_prompt

    def prefill(params, ks, vs, tokens, n, page_table, mark_token):
        ks, vs = list(ks), list(vs)
        pos = jnp.arange(P)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] < n)
        x = params["embed"][tokens]
        for layer, lp in enumerate(params["layers"]):
            h = rms_norm(x, lp["attn_norm"], cfg.eps)
            q = rope((h @ lp["wq"]).reshape(P, cfg.heads, cfg.head_dim), pos, cfg.rope_theta)
            k = rope((h @ lp["wk"]).reshape(P, cfg.kv_heads, cfg.head_dim), pos, cfg.rope_theta).astype(dt)
            v = (h @ lp["wv"]).reshape(P, cfg.kv_heads, cfg.head_dim).astype(dt)
            # [P, KH, hd] -> pages [P/T, KH, T, hd] (HND), into the request's pages of the cache
            ks[layer] = ks[layer].at[page_table].set(k.reshape(P // T, T, cfg.kv_heads, cfg.head_dim).transpose(0, 2, 1, 3))
            vs[layer] = vs[layer].at[page_table].set(v.reshape(P // T, T, cfg.kv_heads, cfg.head_dim).transpose(0, 2, 1, 3))
            ks[layer], vs[layer] = kv.mark_layer(marks, layer, mark_token, ks[layer], vs[layer])
            # attend with the cache-rounded K/V, exactly what the decode side will read
            x = x + attention(q, k.astype(jnp.float32), v.astype(jnp.float32), mask, cfg) @ lp["wo"]
            x = x + mlp(rms_norm(x, lp["mlp_norm"], cfg.eps), lp)
        last = rms_norm(x[n - 1], params["final_norm"], cfg.eps)
        return ks, vs, jnp.argmax(last @ params["lm_head"]).astype(jnp.int32)

    return jax.jit(prefill, donate_argnums=(1, 2))


def make_decode_step(cfg: ModelConfig, layout: Any, max_pages: int):
    """jit(params, ks, vs, tokens[B], pos[B], page_table[B, MP]) -> (ks, vs, next_tokens[B]).
    Writes the current token's K/V at its position, attends over the row's pages (paged attention by
    gather), returns the greedy next token. Rows are independent (a row's result does not depend on
    the other rows), so batch composition does not change any row's tokens."""
    import jax
    import jax.numpy as jnp

    T, dt = layout.page_tokens, layout.np_dtype
    KH, hd = cfg.kv_heads, cfg.head_dim

    def step(params, ks, vs, tokens, pos, page_table):
        ks, vs = list(ks), list(vs)
        B = tokens.shape[0]
        page = jnp.take_along_axis(page_table, (pos // T)[:, None], axis=1)[:, 0]
        slot = pos % T
        heads = jnp.arange(KH)
        t = jnp.arange(max_pages * T)
        mask = (t[None, :] <= pos[:, None])[:, None, :]  # [B, 1, MP*T]
        x = params["embed"][tokens]
        for layer, lp in enumerate(params["layers"]):
            h = rms_norm(x, lp["attn_norm"], cfg.eps)
            q = rope((h @ lp["wq"]).reshape(B, cfg.heads, hd), pos, cfg.rope_theta)
            k = rope((h @ lp["wk"]).reshape(B, KH, hd), pos, cfg.rope_theta).astype(dt)
            v = (h @ lp["wv"]).reshape(B, KH, hd).astype(dt)
            ks[layer] = ks[layer].at[page[:, None], heads[None, :], slot[:, None]].set(k)
            vs[layer] = vs[layer].at[page[:, None], heads[None, :], slot[:, None]].set(v)
            kg = ks[layer][page_table].transpose(0, 1, 3, 2, 4).reshape(B, max_pages * T, KH, hd)
            vg = vs[layer][page_table].transpose(0, 1, 3, 2, 4).reshape(B, max_pages * T, KH, hd)
            o = attention(q[:, None], kg.astype(jnp.float32), vg.astype(jnp.float32), mask, cfg)[:, 0]
            x = x + o @ lp["wo"]
            x = x + mlp(rms_norm(x, lp["mlp_norm"], cfg.eps), lp)
        logits = rms_norm(x, params["final_norm"], cfg.eps) @ params["lm_head"]
        return ks, vs, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.jit(step, donate_argnums=(1, 2))


# -------------------------------------------------------------------------------------- settings


def settings(args: argparse.Namespace) -> dict:
    cfg = ModelConfig(layers=args.layers)
    page_tokens = 16
    max_prompt = -(-args.prompt_max // page_tokens) * page_tokens
    max_pages = -(-(args.prompt_max + args.new_tokens) // page_tokens)
    return dict(cfg=cfg, page_tokens=page_tokens, max_prompt=max_prompt, max_pages=max_pages)


def make_layout(cfg: ModelConfig, page_tokens: int, num_pages: int) -> Any:
    from jax_garden import kv

    return kv.KVLayout(num_layers=cfg.layers, num_pages=num_pages, page_tokens=page_tokens,
                       kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype="bfloat16")


def prompts(args: argparse.Namespace) -> list[bytes]:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    words = b"the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    out = []
    for i in range(args.requests):
        n = int(rng.integers(args.prompt_min, args.prompt_max + 1))
        text = b" ".join(words[int(j)] for j in rng.integers(0, len(words), n))
        out.append(text[:n].ljust(n, b"."))
    return out


def _use_gpu(args: argparse.Namespace) -> None:
    """GPU runs: this process's JAX uses GPU `args.gpu`; CUDA keeps seeing every GPU, so the engine
    can map the other process's cache (never CUDA_VISIBLE_DEVICES)."""
    if args.gpu is not None:
        import jax

        jax.config.update("jax_cuda_visible_devices", str(args.gpu))


def _engine(args: argparse.Namespace) -> Any:
    from jax_garden import fabric

    # Either completion mode is safe: the decode side judges readiness by counting imms
    # (docs/kv.md, "Engine completion mode").
    return fabric.TransferEngine(provider=args.provider, timeout=args.engine_timeout, completion=args.completion)


# -------------------------------------------------------------------------------------- prefill


PAYLOAD = struct.Struct("<i5d")  # first token; ticket received, stream open, start, last layer mark, program done


def run_prefill(args: argparse.Namespace) -> int:
    _use_gpu(args)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_garden import kv

    s = settings(args)
    cfg, T = s["cfg"], s["page_tokens"]
    eng = _engine(args)
    layout = make_layout(cfg, T, num_pages=1 + args.requests * (s["max_prompt"] // T))
    cache = kv.PagedKVCache(eng, layout)
    side = kv.PrefillSide(cache, timeout=args.timeout)
    print(f"CONTACT {bytes(side.contact).hex()}", flush=True)
    params = init_params(cfg, args.seed)
    prefill = make_prefill(cfg, layout, side.marks, s["max_prompt"])
    sink = cache.allocator.alloc(1)  # page 0: padding rows of the page table land here, never sent
    # Compile before serving (token 0 marks nothing: no stream has token 0).
    warm = np.full(s["max_prompt"] // T, int(sink[0]), np.int32)
    k, v, first = prefill(params, cache.k, cache.v, jnp.zeros(s["max_prompt"], jnp.int32), jnp.int32(1),
                          jnp.asarray(warm), jnp.uint32(0))
    int(first)
    cache.commit(k, v)
    served = 0
    try:
        while True:
            try:
                ticket, prompt = side.recv_ticket(timeout=args.timeout)
            except TimeoutError:
                print("prefill: no ticket within the timeout; exiting", file=sys.stderr)
                return 1
            if not ticket:  # the decode process is done
                break
            t_recv = time.monotonic()
            n = len(prompt)
            t = kv.Ticket.from_bytes(ticket)
            src = cache.allocator.alloc(t.pages.size)
            try:
                stream = side.open_stream(ticket, src)
                t_open = time.monotonic()
                if served == 0 and stream.path:
                    path, why = stream.path
                    print(f"prefill: on {jax.devices()[0]}, KV writes to the decode cache take the '{path}' path ({why})",
                          flush=True)
                tokens = np.zeros(s["max_prompt"], np.int32)
                tokens[:n] = np.frombuffer(prompt, np.uint8)
                table = np.full(s["max_prompt"] // T, int(sink[0]), np.int32)
                table[:src.size] = src
                t_start = time.monotonic()
                k, v, first = prefill(params, cache.k, cache.v, jnp.asarray(tokens), jnp.int32(n),
                                      jnp.asarray(table), jnp.uint32(stream.token))
                first = int(first)  # waits for the program
                t_end = time.monotonic()
                cache.commit(k, v)
                t_last = stream.times["marks"].get(layout.num_layers - 1, t_end)
                stream.finish(PAYLOAD.pack(first, t_recv, t_open, t_start, t_last, t_end))
                stream.wait(args.timeout)
                served += 1
            except (kv.StreamError, ValueError) as e:  # a cancelled stream or a bad ticket: keep serving
                print(f"prefill: request failed: {e}", file=sys.stderr)
            finally:
                cache.allocator.free(src)
    finally:
        side.close()
        eng.close()
    print(f"prefill: served {served} requests, {side.counts}", flush=True)
    return 0


# --------------------------------------------------------------------------------------- decode


def run_decode(args: argparse.Namespace) -> int:
    _use_gpu(args)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_garden import fabric, kv

    s = settings(args)
    cfg, T, MP = s["cfg"], s["page_tokens"], s["max_pages"]
    B = args.requests
    eng = _engine(args)
    layout = make_layout(cfg, T, num_pages=1 + B * MP)
    cache = kv.PagedKVCache(eng, layout)
    side = kv.DecodeSide(cache, timeout=args.timeout)
    region = cache.region(0, 0, 0)
    offered = (f"CUDA IPC ({region.descriptor.ipc_kind}) to same-host writers" if region.descriptor.has_ipc_handle
               else f"no CUDA IPC export ({region.registration_note})" if region.is_cuda else "host memory")
    print(f"decode: cache on {jax.devices()[0]}, {offered}", flush=True)
    contact = bytes.fromhex(args.prefill_contact)
    params = init_params(cfg, args.seed)
    step = make_decode_step(cfg, layout, MP)
    sink = int(cache.allocator.alloc(1)[0])  # rows without a request write here
    texts = prompts(args)

    # Warm up the decode step so the first step of a request is not a compilation.
    warm_k, warm_v, _ = step(params, [jnp.zeros_like(a) for a in cache.k], [jnp.zeros_like(a) for a in cache.v],
                             jnp.zeros(B, jnp.int32), jnp.zeros(B, jnp.int32), jnp.full((B, MP), sink, jnp.int32))
    jax.block_until_ready(warm_k)
    del warm_k, warm_v

    reqs, sent = [], []
    for text in texts:
        req = side.reserve(len(text))
        reqs.append(req)
        sent.append(time.monotonic())
        side.send_ticket(contact, req, text)
        # A thread blocked in wait() turns the request READY the moment its last write is counted
        # (req.times["ready"]), while the loop below is busy with decode steps.
        threading.Thread(target=_wait_quietly, args=(req, args.timeout), daemon=True).start()

    table = np.full((B, MP), sink, np.int32)
    tokens = np.zeros(B, np.int32)
    pos = np.zeros(B, np.int32)
    active = np.zeros(B, bool)
    out: list[list[int]] = [[] for _ in range(B)]
    info: list[dict] = [{} for _ in range(B)]
    extra_pages: list[Any] = [None] * B
    pending = set(range(B))
    deadline = time.monotonic() + args.timeout
    while pending or active.any():
        for i in sorted(pending):
            st = reqs[i].poll()
            if st is kv.State.PENDING:
                continue
            pending.discard(i)
            if st is not kv.State.READY:
                print(f"decode: request {i} {st.value}: {reqs[i].reason}", flush=True)
                return 1
            first, t_recv, t_open, t_start, t_last, t_end = PAYLOAD.unpack(reqs[i].payload)
            n = len(texts[i])
            pages = reqs[i].pages
            extra_pages[i] = cache.allocator.alloc(MP - pages.size)  # room for the generated tokens
            table[i] = np.concatenate([pages, extra_pages[i]])
            tokens[i], pos[i], active[i] = first, n, True
            out[i].append(first)
            info[i] = dict(ready=reqs[i].times["ready"], start=t_start, last=t_last, end=t_end, n=n)
            if args.inject_mismatch and i == 0:
                _corrupt(cache, pages)
        if not active.any():
            if time.monotonic() > deadline:
                print("decode: no request became READY in time", flush=True)
                return 1
            oldest = min(pending)
            try:
                reqs[oldest].wait(timeout=0.05)
            except TimeoutError:
                pass
            continue
        t0 = time.monotonic()
        k, v, nxt = step(params, cache.k, cache.v, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(table))
        nxt = np.asarray(nxt)
        t1 = time.monotonic()
        cache.commit(k, v)
        for i in np.flatnonzero(active):
            if "first_step" not in info[i]:
                info[i]["first_step"], info[i]["first_step_done"] = t1 - t0, t1
            out[i].append(int(nxt[i]))
            tokens[i], pos[i] = nxt[i], pos[i] + 1
            if len(out[i]) == args.new_tokens:
                active[i] = False
                table[i] = sink
                reqs[i].release()
                cache.allocator.free(extra_pages[i])
    side.send_ticket(contact, b"", b"bye")  # an empty ticket tells the prefill process to stop

    print(f"\n{'req':>3} {'prompt':>6} {'TTFT ms':>8} = {'queue':>6} + {'prefill':>8} + {'tail':>6} + {'1st step':>8}"
          f"   (tail = READY - last layer mark)")
    for i in range(B):
        d = info[i]
        ttft = (d["first_step_done"] - sent[i]) * 1e3
        print(f"{i:>3} {d['n']:>6} {ttft:>8.1f} = {(d['start'] - sent[i]) * 1e3:>6.1f} + "
              f"{(d['end'] - d['start']) * 1e3:>8.1f} + {(d['ready'] - d['last']) * 1e3:>6.2f} + "
              f"{d['first_step'] * 1e3:>8.1f}")
    print(f"decode side: {side.counts}", flush=True)
    side.close()

    reference = colocated(args, params, texts, layout, s, cache.sharding)
    eng.close()
    bad = [i for i in range(B) if out[i] != reference[i]]
    for i in range(B):
        tag = "MISMATCH" if i in bad else "ok"
        print(f"request {i}: {tag}: {bytes(out[i]).decode('latin-1')!r}" +
              (f" vs colocated {bytes(reference[i]).decode('latin-1')!r}" if i in bad else ""))
    if bad:
        print(f"MISMATCH: {len(bad)} of {B} requests differ from the colocated run", flush=True)
        return 1
    print(f"all generated tokens identical to the colocated run ({B} requests x {args.new_tokens} tokens)", flush=True)
    return 0


def _wait_quietly(req: Any, timeout: float) -> None:
    try:
        req.wait(timeout)
    except TimeoutError:
        pass


def _corrupt(cache: Any, pages: Any) -> None:
    """--inject-mismatch: zero request 0's K in every layer after it arrived (shows the check works)."""
    import jax
    import jax.numpy as jnp

    zero = jax.jit(lambda ks, p: [k.at[p].set(0) for k in ks], donate_argnums=0)
    cache.commit(zero(cache.k, jnp.asarray(pages.astype("int32"))), cache.v)


def colocated(args: argparse.Namespace, params: dict, texts: list[bytes], layout: Any, s: dict,
              sharding: Any) -> list[list[int]]:
    """The same prefill and decode programs in this process, no transfer: the reference tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_garden import kv

    cfg, T, MP = s["cfg"], s["page_tokens"], s["max_pages"]
    B = len(texts)
    eng = _engine(args)  # only for the prefill program's layer marks (nobody listens)
    marks = kv.LayerMarks(eng.watcher(lambda *a: None), cfg.layers)
    prefill = make_prefill(cfg, layout, marks, s["max_prompt"])
    step = make_decode_step(cfg, layout, MP)
    zeros = jax.jit(lambda: jnp.zeros(layout.array_shape, layout.np_dtype), out_shardings=sharding)
    ks = [zeros() for _ in range(cfg.layers)]  # placed like the decode cache: same compiled programs
    vs = [zeros() for _ in range(cfg.layers)]
    sink = 0
    table = np.full((B, MP), sink, np.int32)
    tokens, pos = np.zeros(B, np.int32), np.zeros(B, np.int32)
    out = []
    for i, text in enumerate(texts):
        n = len(text)
        table[i] = 1 + i * MP + np.arange(MP)
        toks = np.zeros(s["max_prompt"], np.int32)
        toks[:n] = np.frombuffer(text, np.uint8)
        ptable = np.full(s["max_prompt"] // T, sink, np.int32)
        npages = -(-n // T)
        ptable[:npages] = table[i, :npages]
        ks, vs, first = prefill(params, ks, vs, jnp.asarray(toks), jnp.int32(n), jnp.asarray(ptable), jnp.uint32(i + 1))
        tokens[i], pos[i] = int(first), n
        out.append([int(first)])
    for _ in range(args.new_tokens - 1):
        ks, vs, nxt = step(params, ks, vs, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(table))
        nxt = np.asarray(nxt)
        for i in range(B):
            out[i].append(int(nxt[i]))
        tokens, pos = nxt.astype(np.int32), pos + 1
    eng.close()
    return out


# ------------------------------------------------------------------------------------- launcher


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in r.stdout.splitlines() if line.startswith("GPU "))


class _Child:
    def __init__(self, name: str, cmd: list[str], env: dict):
        self.name = name
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    platform = args.platform
    ngpu = _gpu_count()
    if platform == "auto":
        platform = "gpu" if ngpu >= 1 else "cpu"
    print(f"disaggregated serving: {args.requests} requests, prompts {args.prompt_min}-{args.prompt_max} tokens, "
          f"{args.new_tokens} new tokens each, {args.layers} layers, platform {platform} "
          f"({('one GPU per process' if ngpu > 1 else 'both processes on the one GPU') + ', CUDA IPC' if platform == 'gpu' else 'CPU, libfabric tcp on 127.0.0.1'})",
          flush=True)
    base = [sys.executable, *(["-P"] if sys.flags.safe_path else []), os.path.abspath(__file__), *argv]
    gpu_of = {"prefill": 0, "decode": 1 if ngpu > 1 else 0}

    def role_args(role: str) -> list[str]:  # the GPU each process's JAX uses; CUDA sees them all
        return ["--role", role] + (["--gpu", str(gpu_of[role])] if platform == "gpu" else [])

    def env_for(gpu: int) -> dict:
        env = dict(os.environ)
        if platform == "gpu":
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # the processes may share a GPU
            # Both processes must pick the same kernels (the check is bitwise): no autotuning.
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
                                " --xla_gpu_deterministic_ops=true").strip()
        else:
            env["JAX_PLATFORMS"] = "cpu"
        return env

    children: list[_Child] = []
    try:
        pre = _Child("prefill", [*base, *role_args("prefill")], env_for(0))
        children.append(pre)
        contact = None
        deadline = time.monotonic() + args.timeout
        while contact is None:
            try:
                line = pre.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                print("launcher: the prefill process did not start", flush=True)
                return 1
            if line.startswith("CONTACT "):
                contact = line.split()[1]
            else:
                print(f"[prefill] {line}", end="", flush=True)
        dec = _Child("decode", [*base, *role_args("decode"), "--prefill-contact", contact], env_for(1))
        children.append(dec)

        def relay(child: _Child) -> None:
            while (line := child.lines.get()) is not None:
                print(line if child is dec else f"[prefill] {line}", end="", flush=True)

        threads = [threading.Thread(target=relay, args=(c,), daemon=True) for c in children]
        for t in threads:
            t.start()
        try:
            rc = dec.proc.wait(timeout=args.timeout * 4)
        except subprocess.TimeoutExpired:
            print("launcher: the decode process did not finish in time", flush=True)
            return 1
        try:
            prc = pre.proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            prc = 1
        for t in threads:
            t.join(timeout=5)
        return rc or (1 if prc else 0)
    finally:
        for c in children:
            c.kill()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--prompt-min", type=int, default=40)
    p.add_argument("--prompt-max", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a short configuration (3 requests, 2 layers, 8 new tokens)")
    p.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--provider", default="tcp", help="libfabric provider (default tcp)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for any one wait")
    p.add_argument("--engine-timeout", type=float, default=10.0)
    p.add_argument("--completion", choices=("delivery", "transmit"), default="delivery",
                   help="the engines' completion mode (default delivery, the engine's default)")
    p.add_argument("--inject-mismatch", action="store_true",
                   help="zero one request's K cache after it arrived: the check must report a mismatch")
    p.add_argument("--role", choices=("prefill", "decode"), help=argparse.SUPPRESS)
    p.add_argument("--prefill-contact", help=argparse.SUPPRESS)
    p.add_argument("--gpu", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.prompt_min, args.prompt_max, args.new_tokens, args.layers = 3, 20, 60, 8, 2
    if args.role == "prefill":
        return run_prefill(args)
    if args.role == "decode":
        return run_decode(args)
    return launch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
