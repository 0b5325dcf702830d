"""jax_garden.weights with GPU memory, one GPU per process (marker ``gpu``; skipped without a CUDA
GPU and a CUDA build). The core cases of test_weights.py: a trainer process on GPU0 pushing to an
inference process on GPU1 (bf16 bitwise, fp8 within the e4m3 bound, the engine's CUDA IPC path into
XLA's own buffers), colocated 2 -> 2 (FSDP -> TP, pieces gathered by the GPU stager, replicas
sharing the work), and a sender killed mid-push (old version kept, error in time naming what is
missing, a new push completes). Every process sees every GPU and chooses the one its JAX uses
(jax_cuda_visible_devices); on a one-GPU machine the processes share it."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes share the GPUs

import pytest

from fabric_group import gpu_count, run_group, use_gpu
from test_weights import _check_local, _globals, kill_scenario

PROVIDER = "tcp"


NGPU = gpu_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NGPU < 1, reason="needs a CUDA GPU and a CUDA build")]


def _specs(n_src: int, n_dst: int):
    from jax_garden.weights import MeshSharding as M, TensorSpec as T, fp8_spec

    src = {"emb": T((256, 1024), "bfloat16", M({"f": n_src}, ("f", None))),
           "up": T((1024, 4096), "bfloat16", M({"f": n_src}, ("f", None))),
           "down": T((4096, 1024), "bfloat16", M({"f": n_src}, ("f", None))),
           "norm": T((1024,), "bfloat16", M({"rep": n_src}, ()))}
    dst = {"emb": T((256, 1024), "bfloat16", M({"t": n_dst}, (None, "t"))),
           "up": fp8_spec((1024, 4096), M({"t": n_dst}, (None, "t")), M({"t": n_dst}, (None, "t")), (128, 128)),
           "down": fp8_spec((4096, 1024), M({"t": n_dst}, ("t", None)), M({"t": n_dst}, ("t", None)), (128, 128)),
           "norm": T((1024,), "bfloat16", M({"t": n_dst}, ()))}
    return src, dst


def _worker(rank, size, exchange, n_src, gpus, direct_min):
    """Ranks < n_src publish, the others subscribe; gpus[rank] is this process's GPU."""
    use_gpu(gpus[rank])
    import jax
    import jax.numpy as jnp
    from jax_garden import fabric, weights

    assert jax.devices()[0].platform == "gpu", jax.devices()
    assert len(jax.devices()) == 1, f"jax_cuda_visible_devices came too late: this process sees {jax.devices()}"
    n_dst = size - n_src
    src, dst = _specs(n_src, n_dst)
    plan = weights.Plan(weights.Layout.from_pytree(src), weights.Layout.from_pytree(dst), chunk_bytes=1 << 20,
                        direct_min_bytes=direct_min)
    out = {}
    if rank >= n_src:
        r = rank - n_src
        sub = weights.Subscriber(plan, dst, rank=r, provider=PROVIDER)
        addrs = exchange(sub.address)[n_src:]
        sub.set_peers(addrs)
        for v in (1, 2):
            assert sub.wait(v, 120) == v
            leaves = jax.tree_util.tree_leaves(sub.params())
            assert leaves and all(a.devices() == {jax.devices()[0]} for a in leaves)  # buffers in GPU memory
            _check_local(plan, r, v, sub.params(), exact_fp8=False)
            exchange(None)
        exchange(None)
        sub.close()
        return True
    pub = weights.Publisher(plan, rank=rank, provider=PROVIDER, staging_bytes=8 << 20, timeout=120)
    addrs = exchange(None)[n_src:]
    pub.connect(addrs)
    # The path the engine takes toward the first destination buffer: CUDA IPC (copy engines) when
    # the destination exports an IPC handle, else staging (see test_xla_buffers_take_the_ipc_path).
    if pub.staging:
        out.update(pub.path_to(pub.plan.destinations_of(rank)[0]))  # {"path": ..., "dst_has_ipc": ...}
    for v in (1, 2):
        g = _globals(plan.src, v)
        params = {}
        for t in plan.src.tensors:
            box = next(b for rr, l, b in t.shards if rr == rank)
            params[t.path.strip("[]'")] = jnp.asarray(g[t.path][tuple(slice(a, b) for a, b in box)])
        h = pub.push(params, v).wait(120)
        out[v] = dict(h.bytes_sent)
        exchange(None)
    exchange(None)
    pub.close()
    assert fabric.gpu_available()
    return out


def _expected_path(out: dict) -> str:
    return "ipc" if out["dst_has_ipc"] else "staged"


@pytest.mark.adversarial
@pytest.mark.timeout(300)
def test_gpu0_trainer_to_gpu1_inference():
    out = run_group(_worker, 2, 1, [0, 1], 1 << 20, exchanges=4, timeout=240)
    assert out[1] is True
    assert out[0]["path"] == _expected_path(out[0]), out[0]


@pytest.mark.timeout(300)
def test_gpu0_trainer_to_gpu1_inference_all_staged():
    out = run_group(_worker, 2, 1, [0, 1], 1 << 40, exchanges=4, timeout=240)
    assert out[1] is True and out[0]["path"] == _expected_path(out[0]), out[0]


@pytest.mark.timeout(300)
def test_xla_buffers_take_the_ipc_path():
    """XLA's buffers export no legacy CUDA IPC handle, but their cuMemCreate ranges are served as fds
    by the owner's broker (VMM IPC, on by default): the push takes the ipc path, not staging."""
    out = run_group(_worker, 2, 1, [0, 1], 1 << 20, exchanges=4, timeout=240)
    assert out[0]["path"] == "ipc" and out[0]["dst_has_ipc"], out[0]


@pytest.mark.timeout(300)
def test_colocated_two_trainers_to_two_inference_processes():
    """Trainers on GPU0/GPU1 (FSDP), inference on GPU1/GPU0 (TP); the replicated norm is split
    between the two trainers."""
    out = run_group(_worker, 4, 2, [0, 1, 1, 0], 1 << 20, exchanges=4, timeout=240)
    assert out[2] is True and out[3] is True
    for v in (1, 2):
        assert sum(out[0][v].values()) > 0 and sum(out[1][v].values()) > 0


@pytest.mark.timeout(300)
def test_gpu_sender_killed_mid_push():
    def env_of(role, rank):  # the child chooses this GPU for its JAX (fabric_group.use_gpu)
        return {"JAX_GARDEN_TEST_GPU": str(rank if role == "pub" else 1 - rank)}

    kill_scenario(env_of)
