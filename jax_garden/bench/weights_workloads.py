"""Workloads of ``bench weights``: Kimi-K2-like shapes and their trainer / inference layouts for the
simulation, the measured configurations, deterministic parameter values, and the bitwise check of
what a subscriber received."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# ---------------------------------------------------------------------------------------------
# Kimi-K2-like shapes


K2 = dict(hidden=7168, layers=61, dense_layers=1, experts=384, moe_inter=2048, shared_inter=2048,
          dense_inter=18432, vocab=163840, heads=64, q_lora=1536, kv_lora=512, qk_nope=128, qk_rope=64,
          v_head=128)


def k2_tensors(cfg: dict = K2) -> list[tuple[str, tuple, bool]]:
    """[(path, shape, fp8 on the wire)] for one model."""
    H, E = cfg["hidden"], cfg["experts"]
    qk = cfg["qk_nope"] + cfg["qk_rope"]
    out: list[tuple[str, tuple, bool]] = [("embed", (cfg["vocab"], H), False)]
    for layer in range(cfg["layers"]):
        p = f"layers.{layer}."
        out += [(p + "input_norm", (H,), False), (p + "post_norm", (H,), False),
                (p + "q_a", (H, cfg["q_lora"]), True), (p + "q_a_norm", (cfg["q_lora"],), False),
                (p + "q_b", (cfg["q_lora"], cfg["heads"] * qk), True),
                (p + "kv_a", (H, cfg["kv_lora"] + cfg["qk_rope"]), True), (p + "kv_a_norm", (cfg["kv_lora"],), False),
                (p + "kv_b", (cfg["kv_lora"], cfg["heads"] * (cfg["qk_nope"] + cfg["v_head"])), True),
                (p + "o", (cfg["heads"] * cfg["v_head"], H), True)]
        if layer < cfg["dense_layers"]:
            F = cfg["dense_inter"]
            out += [(p + "mlp_w1", (H, F), True), (p + "mlp_w3", (H, F), True), (p + "mlp_w2", (F, H), True)]
        else:
            F, S = cfg["moe_inter"], cfg["shared_inter"]
            out += [(p + "router", (E, H), False), (p + "router_bias", (E,), False),
                    (p + "experts_w1", (E, H, F), True), (p + "experts_w3", (E, H, F), True),
                    (p + "experts_w2", (E, F, H), True),
                    (p + "shared_w1", (H, S), True), (p + "shared_w3", (H, S), True), (p + "shared_w2", (S, H), True)]
    out += [("final_norm", (H,), False), ("lm_head", (cfg["vocab"], H), False)]
    return out


def _block(shape: tuple, fp8: bool) -> tuple:
    if not fp8:
        return (1,) * len(shape)
    return (1,) * (len(shape) - 2) + (128, 128)


def fsdp_sharding(shape: tuple, block: tuple, ranks: int, dst_factors: tuple | None = None, itemsize: int = 2,
                  min_shard_bytes: int = 256 * KiB):
    """FSDP over ``ranks`` (a power of two), as a trainer would lay parameters out for this push:
    dimension 0 is split by the largest power of two that keeps whole (fp8) blocks per shard and
    shards of at least ``min_shard_bytes``; another dimension d is split further only up to the
    destination's split of d (``dst_factors``), so a trainer shard never cuts a destination row
    into pieces (the pieces stay contiguous writes). Ranks left over hold replicas (HSDP); replicas
    split the push between them. Returns a MeshSharding (one device per rank)."""
    from jax_garden.weights import MeshSharding

    dst_factors = dst_factors or (1,) * len(shape)
    factors = [1] * len(shape)
    total = 1
    nbytes = math.prod(shape) * itemsize
    for d in range(len(shape)):
        limit = ranks if d == 0 else dst_factors[d]
        blocks = -(-shape[d] // block[d])
        while (total * 2 <= ranks and factors[d] * 2 <= limit and blocks % (factors[d] * 2) == 0
               and shape[d] % (factors[d] * 2) == 0 and nbytes // (total * 2) >= min_shard_bytes):
            factors[d] *= 2
            total *= 2
    axes = [(f"f{d}", f) for d, f in enumerate(factors) if f > 1] + [("rep", ranks // total)]
    spec = tuple(f"f{d}" if f > 1 else None for d, f in enumerate(factors))
    return MeshSharding(axes, spec)


def k2_specs(train_ranks: int = 256, replicas: int = 8, tp: int = 16, cfg: dict = K2) -> tuple[dict, dict]:
    """(trainer specs, inference specs) as flat dicts of TensorSpec / Fp8."""
    from jax_garden.weights import MeshSharding, TensorSpec, fp8_spec

    mesh = [("dp", replicas), ("tp", tp)]
    src: dict[str, Any] = {}
    dst: dict[str, Any] = {}
    for path, shape, fp8 in k2_tensors(cfg):
        blk = _block(shape, fp8)
        name = path.rsplit(".", 1)[-1]
        if name.startswith("experts_") or name in ("o", "shared_w2", "mlp_w2", "embed", "lm_head"):
            spec: tuple = ("tp",) + (None,) * (len(shape) - 1)  # experts / row parallel / vocab parallel
        elif name in ("q_b", "kv_b", "shared_w1", "shared_w3", "mlp_w1", "mlp_w3"):
            spec = (None, "tp")  # column parallel
        else:
            spec = ()  # replicated: norms, router, q_a, kv_a
        factors = tuple(tp if (d < len(spec) and spec[d] == "tp") else 1 for d in range(len(shape)))
        src[path] = TensorSpec(shape, "bfloat16", fsdp_sharding(shape, blk, train_ranks, factors))
        sh = MeshSharding(mesh, spec)
        dst[path] = fp8_spec(shape, sh, sh, blk) if fp8 else TensorSpec(shape, "bfloat16", sh)
    return src, dst


# ---------------------------------------------------------------------------------------------
# Measured configurations and their data


def gen_tensor(t: Any, i: int, seed: int, box: tuple | None = None) -> np.ndarray:
    """Deterministic values of tensor ``t`` (index ``i`` in its layout), or of its ``box``: a cheap
    hash of the global element index (finite, normal bf16 values; fast enough for 16 GB)."""
    import ml_dtypes

    box = box or tuple((0, n) for n in t.shape)
    strides = [1] * len(t.shape)
    for d in range(len(t.shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * t.shape[d + 1]
    idx = np.zeros([b - a for a, b in box], np.uint32)
    for d, (a, b) in enumerate(box):
        shape = [1] * len(box)
        shape[d] = b - a
        idx = idx + (np.arange(a, b, dtype=np.uint64) * strides[d]).astype(np.uint32).reshape(shape)
    h = (idx * np.uint32(2654435761) + np.uint32((seed * 7919 + i * 104729) & 0xFFFFFFFF)) >> np.uint32(11)
    if t.dtype == "bfloat16":
        bits = (h.astype(np.uint16) & np.uint16(0x83FF)) | np.uint16(0x3C00)  # sign, mantissa; exponent ~1
        return bits.view(ml_dtypes.bfloat16)
    return ((h & np.uint32(0xFFFF)).astype(np.float32) / 65536.0 - 0.5).astype(t.dtype)


def gen_params(layout: Any, seed: int) -> dict:
    return {t.path: gen_tensor(t, i, seed) for i, t in enumerate(layout.tensors)}


def bench_configs(quick: bool, gpu: bool) -> list[dict]:
    """The measured configurations: specs are built in the workers from these descriptions."""
    if gpu:
        sizes = [1 * GiB] if quick else [1 * GiB, 4 * GiB, 16 * GiB]
        out = []
        for total in sizes:
            out.append(dict(name=f"gpu 1->1 bf16 {total // GiB} GiB", src=1, dst=1, total=total, layout="same",
                            fp8=False, chunk=64 * MiB, staging=512 * MiB, direct=4 * MiB, rounds=2 if quick else 3))
            if total == GiB:  # the same push asking for its grant each time (no standing grants)
                out.append(dict(out[-1], name="gpu 1->1 bf16 1 GiB, asking each push", standing=False))
            out.append(dict(name=f"gpu 2->2 colocated FSDP->TP bf16 {total // GiB} GiB", src=2, dst=2, total=total,
                            layout="fsdp_tp", fp8=False, chunk=64 * MiB, staging=512 * MiB, direct=4 * MiB,
                            rounds=2 if quick else 3, colocated=True))
        out.append(dict(name="gpu 1->1 bf16->fp8 1 GiB", src=1, dst=1, total=GiB, layout="same", fp8=True,
                        chunk=64 * MiB, staging=512 * MiB, direct=4 * MiB, rounds=2 if quick else 3))
        return out
    total = 64 * MiB if quick else 1 * GiB
    rounds = 2 if quick else 3
    chunk = 8 * MiB if quick else 32 * MiB
    return [
        dict(name="tcp 1->1 bf16 direct", src=1, dst=1, total=total, layout="same", fp8=False, chunk=chunk,
             staging=4 * chunk, direct=1 * MiB, rounds=rounds),
        dict(name="tcp 1->1 bf16 direct, asking each push", src=1, dst=1, total=total, layout="same", fp8=False,
             chunk=chunk, staging=4 * chunk, direct=1 * MiB, rounds=rounds, standing=False),
        dict(name="tcp 1->1 bf16 staged", src=1, dst=1, total=total, layout="same", fp8=False, chunk=chunk,
             staging=4 * chunk, direct=1 << 40, rounds=rounds),
        dict(name="tcp 1->1 bf16->fp8", src=1, dst=1, total=total, layout="same", fp8=True, chunk=chunk,
             staging=4 * chunk, direct=1 << 40, rounds=rounds),
        dict(name="tcp 2->2 FSDP->TP bf16", src=2, dst=2, total=total, layout="fsdp_tp", fp8=False, chunk=chunk,
             staging=4 * chunk, direct=1 * MiB, rounds=rounds),
    ]


def config_specs(cfg: dict) -> tuple[dict, dict]:
    """(trainer specs, inference specs) of a measured configuration: 8 tensors [rows, 4096] bf16."""
    from jax_garden.weights import MeshSharding as M, TensorSpec as T, fp8_spec

    n, cols = 8, 4096
    rows = max(256, cfg["total"] // (n * cols * 2) // 256 * 256)
    src, dst = {}, {}
    for i in range(n):
        shape = (rows, cols)
        if cfg["layout"] == "same":
            s_sh, d_sh = M({"f": cfg["src"]}, ("f",)), M({"t": cfg["dst"]}, ("t",))
        else:  # FSDP rows -> tensor parallel columns
            s_sh, d_sh = M({"f": cfg["src"]}, ("f", None)), M({"t": cfg["dst"]}, (None, "t"))
        src[f"w{i}"] = T(shape, "bfloat16", s_sh)
        dst[f"w{i}"] = fp8_spec(shape, d_sh, d_sh, (128, 128)) if cfg["fp8"] else T(shape, "bfloat16", d_sh)
    return src, dst


def verify(plan: Any, sub: Any, rank: int) -> bool:
    """This subscriber rank's shards against the reference: bf16 bitwise; fp8 weights bitwise or,
    where a GPU rounds differently, within the e4m3 bound; scales to 1e-6."""
    import jax
    from jax_garden import weights

    p = sub.params()
    flat, _ = jax.tree_util.tree_flatten_with_path(p)
    got = {jax.tree_util.keystr(kp): leaf for kp, leaf in flat}
    src_index = {t.path: i for i, t in enumerate(plan.src.tensors)}
    for di, d in enumerate(plan.dst.tensors):
        base = d.path[:-len(".scale")] if d.kind == "scale" else d.path
        si = src_index[base]
        for r, l, box in d.shards:
            if r != rank:
                continue
            key = d.path + ".weight" if d.kind == "fp8" else d.path
            arr = np.asarray(got[key])
            if d.kind == "array":
                want = gen_tensor(plan.src.tensors[si], si, 1, box)
                if not np.array_equal(arr.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)):
                    return False
                continue
            # quantize whole blocks around the box, then crop
            blo = tuple((a // b) * b for (a, _), b in zip(box, d.block)) if d.kind == "fp8" else \
                tuple(a * b for (a, _), b in zip(box, d.block))
            bhi = tuple(min(-(-e // b) * b, n) for (_, e), b, n in zip(box, d.block, plan.src.tensors[si].shape)) \
                if d.kind == "fp8" else tuple(min(e * b, n) for (_, e), b, n in zip(box, d.block, plan.src.tensors[si].shape))
            x = gen_tensor(plan.src.tensors[si], si, 1, tuple(zip(blo, bhi)))
            q, sc = weights.quantize_fp8(x, d.block)
            if d.kind == "scale":
                if not np.allclose(arr, sc, rtol=1e-6):
                    return False
                continue
            crop = tuple(slice(a - o, e - o) for (a, e), o in zip(box, blo))
            q, xc = q[crop], x.astype(np.float32)[crop]
            if np.array_equal(arr.view(np.uint8), np.ascontiguousarray(q).view(np.uint8)):
                continue
            s_full = sc
            for dd, b in enumerate(d.block):
                s_full = np.repeat(s_full, b, axis=dd)
            s_full = s_full[tuple(slice(0, n) for n in x.shape)][crop]
            err = np.abs(arr.astype(np.float32) * s_full - xc)
            if not (err <= np.maximum(np.abs(xc) * 2.0 ** -4, s_full * 2.0 ** -10) * 1.0001 + 1e-30).all():
                return False
    return True
