"""The benchmark command line: ``python -m jax_garden.bench --help`` exits 0 and lists the benchmarks,
every benchmark has ``--help`` (whole sentences) and ``--quick``, the examples take ``--quick``, and
child processes start with the parent's interpreter flags (-P keeps a checkout from shadowing the
installed package)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "jax_garden.bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_help_exits_0_and_lists_every_benchmark():
    from jax_garden.bench.__main__ import BENCHMARKS

    r = _bench("--help")
    assert r.returncode == 0, r.stderr
    for name in BENCHMARKS:
        assert f"\n  {name} " in r.stdout, (name, r.stdout)
    assert "--quick" in r.stdout and "--plot" in r.stdout


@pytest.mark.parametrize("args,needle", [((), "no benchmark named"), (("nope",), "unknown benchmark 'nope'")])
def test_a_missing_or_unknown_benchmark_is_a_usage_error(args, needle):
    r = _bench(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "benchmarks:" in r.stderr


@pytest.mark.parametrize("name", ["fabric", "fabric-gpu", "moe", "kv", "weights"])
def test_every_benchmark_has_help_and_quick(name):
    from jax_garden.bench.__main__ import BENCHMARKS

    r = _bench(name, "--help")
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout
    assert f"python -m jax_garden.bench {name}" in r.stdout  # the command users type, not a module path
    doc = importlib.import_module(BENCHMARKS[name]).__doc__
    # The description is the docstring's whole first paragraph, never a line cut mid-sentence.
    first = " ".join(doc.strip().split("\n\n")[0].split())
    assert first.endswith((".", ":")), first
    assert " ".join(first.split()[-4:]) in " ".join(r.stdout.split()), (first, r.stdout)


def test_moe_nodes_takes_quick():
    r = _bench("moe", "--nodes", "2", "--help")
    assert r.returncode == 0 and "--quick" in r.stdout and "--nodes" in r.stdout


@pytest.mark.parametrize("example", ["disaggregated_serving.py", "rl_weight_push.py"])
def test_examples_take_quick_and_not_short(example):
    r = subprocess.run([sys.executable, "-P", str(ROOT / "examples" / example), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout and "--short" not in r.stdout


def test_kv_bench_labels_its_posting_rate():
    from jax_garden.bench import kv

    result = {"rows": [{"platform": "cpu", "tokens": 2048, "system": "bulk", "posted_per_s": 1234.0}],
              "targets": [], "cancel": {}}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        kv.print_table(result)
    out = buf.getvalue()
    assert "pages/s" not in out and "posted/s" in out and "1234" in out
    assert "not a transfer rate" in out


def test_kv_bench_keeps_the_first_request_out_of_the_p50s():
    """A cold first request (14 ms of ticket on one H100, against 0.6 ms warm) made the p50 of two
    requests their mean: it is its own row, and the layerwise row is the warm requests' median."""
    from jax_garden.bench import kv

    layout = {"num_layers": 2, "page_tokens": 16, "kv_heads": 1, "head_dim": 8, "dtype": "bfloat16"}

    def rec(ttft_ms: float, warmup: bool = False) -> dict:
        return {"case": "layerwise", "warmup": warmup, "scattered": False, "open_wait": False, "tokens": 64,
                "ttft_s": ttft_ms / 1e3, "tail_s": 1e-4, "after_finish_s": 1e-4, "prefill_s": 9e-3,
                "finish_s": 1e-5, "pages": 4, "writes": 4, "on_mark": 2, "open_s": 1e-3, "start_s": 1e-3}

    records = [{"case": "colocated", "tokens": 64, "ttft_s": 0.010}, rec(40.0, warmup=True), rec(12.0), rec(13.0)]
    rows = {r["system"]: r for r in kv.summarize("gpu", records, {}, layout, [64])["rows"]}
    assert rows["layerwise"]["ttft_ms"] == pytest.approx(12.5) and rows["layerwise"]["iters"] == 2
    assert rows["first request (warm-up)"]["ttft_ms"] == pytest.approx(40.0)
    assert rows["first request (warm-up)"]["ttft_overhead_pct"] == pytest.approx(300.0)


def test_child_processes_get_this_interpreters_flags():
    code = ("from jax_garden._interpreter import python_command; import json; "
            "print(json.dumps(python_command('-c', 'pass')))")
    for flags in (["-P"], ["-P", "-X", "dev"], []):
        r = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=60,
                           cwd="/")
        assert r.returncode == 0, r.stderr
        cmd = json.loads(r.stdout.strip().splitlines()[-1])
        assert cmd[0] == sys.executable and cmd[-2:] == ["-c", "pass"]
        assert ("-P" in cmd) == ("-P" in flags)
        assert ("dev" in cmd) == ("dev" in flags)


@pytest.fixture
def shadowing_checkout(tmp_path: Path) -> Path:
    """A directory whose own jax_garden/ is a checkout without a built extension: any process that
    imports jax_garden from its working directory (started without -P) fails there."""
    (tmp_path / "jax_garden").mkdir()
    (tmp_path / "jax_garden" / "__init__.py").write_text(
        "raise ImportError('imported the shadowing source tree: a child process lost -P')\n")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'jax_garden'\n")
    return tmp_path


@pytest.mark.timeout(400)
def test_moe_nodes_from_a_checkout_root_children_inherit_P(shadowing_checkout):
    """Item 2 of the newcomer report: `bench moe --nodes 2` from the repository root, with -P; its worker
    processes must not import the checkout, and its JSON lands beside the other benchmarks'."""
    env = dict(os.environ)
    import jax_garden

    env["PYTHONPATH"] = os.pathsep.join([str(Path(jax_garden.__file__).parent.parent),
                                         *filter(None, [env.get("PYTHONPATH")])])
    r = subprocess.run([sys.executable, "-P", "-m", "jax_garden.bench", "moe", "--nodes", "2", "--quick",
                        "--hidden", "256", "--experts", "8", "--top-k", "2", "--tokens", "16", "--iters", "2",
                        "--no-reference"], capture_output=True, text=True, timeout=380, env=env,
                       cwd=shadowing_checkout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "shadowing source tree" not in r.stderr
    out = shadowing_checkout / "bench_results" / "moe_nodes.json"
    assert out.exists(), sorted(p.name for p in shadowing_checkout.rglob("*.json"))
    assert json.loads(out.read_text())["errors"] == []
