"""KV streaming with GPU caches (marker ``gpu``; skipped without a CUDA GPU and a CUDA build).

The core cases of tests/test_kv.py across processes that each use one GPU (chosen with
jax_cuda_visible_devices, every GPU staying visible to CUDA; on a one-GPU machine the processes
share it) and stream over the CUDA IPC path (the test checks it is the path taken): contents
bitwise for every layer and page with the jitted prefill marking layers on the GPU stream (a traced
token: a one-thread kernel, safe under command buffers), 3 processes, cancel/reuse cycles with
cancels racing layers in flight, a killed prefill and a killed decode process."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes share the GPUs

import pytest

from fabric_group import gpu_count, run_group


NGPU = gpu_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NGPU < 1, reason="needs a CUDA GPU and a CUDA build")]

LAYOUT = dict(num_layers=4, num_pages=96, page_tokens=16, kv_heads=8, head_dim=128, dtype="bfloat16")


@pytest.mark.adversarial
def test_two_gpus_stream_contents_bitwise():
    from kv_workers import serve_worker
    cfg = dict(platform="gpu", layout=LAYOUT, decodes=[0], prefills=[1], tokens=[5, 16, 17, 300, 700, 64],
               sleep_s=0.02)
    out = run_group(serve_worker, 2, cfg, exchanges=2, timeout=300)
    assert out[0]["ready"] == 6 and out[1]["streams"] == 6
    assert out[1]["on_mark"] > 0
    assert out[1]["path"][0] == "ipc", out[1]["path"]  # into XLA's buffers of the other process (VMM IPC)


def test_two_gpus_nhd_layout():
    from kv_workers import serve_worker
    cfg = dict(platform="gpu", layout=dict(LAYOUT, page_layout="NHD"), decodes=[0], prefills=[1],
               tokens=[33, 250], sleep_s=0.0)
    out = run_group(serve_worker, 2, cfg, exchanges=2, timeout=300)
    assert out[0]["ready"] == 2


def test_three_processes_one_prefill_two_decodes_on_gpus():
    from kv_workers import serve_worker
    cfg = dict(platform="gpu", gpus=2, layout=LAYOUT, decodes=[0, 2], prefills=[1], tokens=[40, 200, 9])
    out = run_group(serve_worker, 3, cfg, exchanges=2, timeout=300)
    assert out[0]["ready"] == 3 and out[2]["ready"] == 3 and out[1]["streams"] == 6


def test_cancel_reuse_cycles_on_gpus():
    from kv_workers import cycles_worker
    cfg = dict(platform="gpu", layout=dict(LAYOUT, num_pages=24), cycles=300, layer_s=0.003)
    out = run_group(cycles_worker, 2, cfg, exchanges=2, timeout=300)
    d = out[0]
    assert d["ready"] + d["cancelled"] + d["ready_after_cancel"] == 300 and d["free_at_end"], d
    assert d["cancelled"] > 100 and d["ready"] > 40, d


def test_killed_prefill_on_gpus():
    from kv_workers import ENGINE_TIMEOUT, killed_prefill_worker
    cfg = dict(platform="gpu", gpus=2, layout=dict(LAYOUT, num_layers=8))
    out = run_group(killed_prefill_worker, 3, cfg, timeout=300, expect_dead={1})
    res = out[0]
    assert res["state"] == "FAILED" and "unreachable" in res["reason"], res
    assert res["failed_after"] < ENGINE_TIMEOUT + 5, res
    assert res["quarantined"] and res["released"], res
    assert out[2] == "ok"


def test_killed_decode_on_gpus():
    from kv_workers import ENGINE_TIMEOUT, killed_decode_worker
    cfg = dict(platform="gpu", gpus=2, layout=dict(LAYOUT, num_layers=8))
    out = run_group(killed_decode_worker, 3, cfg, timeout=300, expect_dead={1})
    res = out[0]
    assert res["state"] == "failed", res
    assert res["failed_after"] < ENGINE_TIMEOUT + 5, res
    assert out[2] == "ok"
