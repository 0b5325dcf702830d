"""``--plot``: the shared helper (jax_garden/bench/_plot.py) and the figures of bench fabric and bench
kv drawn from results shaped like theirs; a missing matplotlib is a clear error before any measuring."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, data[:8]
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_save_draws_lines_and_stacked_bars(tmp_path):
    pytest.importorskip("matplotlib")
    from jax_garden.bench import _plot

    sizes = [4096, 65536, 1 << 20]
    out = _plot.save(tmp_path / "sub" / "fig.png", [
        _plot.Lines("latency", "size", "µs", {"a": (sizes, [1.0, None, 3.0]), "b": (sizes, [2.0, 2.5, 4.0])},
                    logx=True, xticks=_plot.size_ticks(sizes), styles={"b": "--"}),
        _plot.StackedBars("ttft", "ms", ["x", "y"], {"p": [1.0, 2.0], "q": [0.5, None]}, markers={"t": [1.6, 2.1]}),
    ], title="t", note="a note")
    w, h = _png_size(out)
    assert w > 2 * h  # two panels side by side
    assert _plot.size_ticks([4096, 3 << 20, 100]) == [(4096.0, "4 KiB"), (float(3 << 20), "3 MiB"), (100.0, "100 B")]
    with pytest.raises(ValueError, match="no panels"):
        _plot.save(tmp_path / "empty.png", [])
    with pytest.raises(TypeError, match="Lines or StackedBars"):
        _plot.save(tmp_path / "bad.png", ["not a panel"])


def test_fabric_and_kv_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from jax_garden.bench import figures

    rows = [{"test": "imm", "size": 0, "name": "engine d=1", "p50_us": 9.0, "gbps": None}]
    for name, lat in (("engine d=1", 10.0), ("raw dc", 8.0), ("tcp", 30.0)):
        for size in (4096, 65536, 1 << 20):
            rows.append({"test": "write", "size": size, "name": name, "p50_us": lat * (1 + size / 65536),
                         "gbps": size / 1e6 / lat})
    rows.append({"test": "paged", "size": 16384, "pages": 4, "name": "raw", "p50_us": 50.0, "gbps": 1.0})
    out = figures.fabric({"rows": rows, "config": {"window": 64}}, str(tmp_path / "fabric.png"), note="n")
    assert _png_size(out)[0] > 0
    kv_rows = [{"platform": "cpu", "tokens": 2048, "system": "colocated", "ttft_ms": 100.0, "prefill_ms": 100.0},
               {"platform": "cpu", "tokens": 2048, "system": "layerwise", "ttft_ms": 130.0, "prefill_ms": 110.0,
                "open_ms": 2.0},
               {"platform": "cpu", "tokens": 2048, "system": "bulk", "ttft_ms": 180.0, "prefill_ms": 100.0,
                "open_ms": 2.0},
               {"platform": "cpu", "tokens": 2048, "system": "raw floor", "gbps": 4.0},
               {"platform": "cpu", "tokens": 8192, "system": "colocated", "ttft_ms": 400.0, "prefill_ms": 400.0}]
    out = figures.kv({"rows": kv_rows}, str(tmp_path / "kv.png"))
    w, h = _png_size(out)
    assert w > 2 * h  # one panel per prompt length
    with pytest.raises(ValueError, match="no rows with a TTFT"):
        figures.kv({"rows": [kv_rows[3]]}, str(tmp_path / "none.png"))


def test_figures_cli_redraws_a_saved_result(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    result = {"rows": [{"test": "write", "size": 4096, "name": "engine d=1", "p50_us": 10.0, "gbps": 0.4}],
              "config": {"window": 64}}
    (tmp_path / "fabric.json").write_text(json.dumps(result))
    r = subprocess.run([sys.executable, "-P", "-m", "jax_garden.bench.figures", "fabric", str(tmp_path / "fabric.json"),
                        str(tmp_path / "redrawn.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _png_size(tmp_path / "redrawn.png")[0] > 0


NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None\n"


@pytest.mark.parametrize("bench", ["fabric", "kv"])
def test_plot_without_matplotlib_fails_before_measuring(tmp_path, bench):
    code = NO_MATPLOTLIB + (f"from jax_garden.bench import {bench}\n"
                            f"sys.exit({bench}.main(['--quick', '--plot', {str(tmp_path / 'x.png')!r}]))")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0
    assert "--plot needs matplotlib" in r.stderr and "pip install matplotlib" in r.stderr, r.stderr
    assert not (tmp_path / "bench_results").exists()  # nothing was measured or written
