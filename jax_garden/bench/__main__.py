"""python -m jax_garden.bench BENCHMARK [options]     (python -m jax_garden.bench BENCHMARK --help: its options)

Every benchmark runs its baseline in the same run, prints a table and writes JSON (default under
bench_results/) whose "headline" holds the same-run ratios. --quick makes any of them short; fabric, kv
and moe --ladder draw a figure with --plot PATH (needs matplotlib). fabric runs the host rows and, when this machine
has a GPU and the build has CUDA, the rows of fabric-gpu after them (--no-gpu skips those).
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "fabric": "jax_garden.bench.fabric",
    "fabric-gpu": "jax_garden.bench.fabric_gpu",
    "moe": "jax_garden.bench.moe",
    "weights": "jax_garden.bench.weights",
    "kv": "jax_garden.bench.kv",
}

# One line each for the list that --help prints (the modules' docstrings say the rest).
SUMMARIES = {
    "fabric": "TransferEngine latency and bandwidth on 127.0.0.1 vs raw libfabric vs TCP sockets",
    "fabric-gpu": "GPU memory through the engine (ipc and staged paths) vs cudaMemcpyPeerAsync (needs a GPU)",
    "moe": "MoE dispatch/combine vs moe.RaggedAllToAll on GPUs (--ladder: token ladder); --nodes N: across processes",
    "weights": "weight push trainer -> inference vs raw libfabric and jax.experimental.transfer; --simulate k2",
    "kv": "KV-cache streaming: TTFT layer-wise vs bulk vs jax.experimental.transfer, with the raw floor",
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = [__doc__.split("\n")[0], "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {SUMMARIES[name]}" for name in BENCHMARKS]
    lines += ["", *__doc__.split("\n", 2)[2].strip().splitlines()]
    return "\n".join(lines)


def _gpu_rows_available() -> bool:
    try:
        from jax_garden import fabric

        return bool(fabric.gpu_available())
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        problem = f"unknown benchmark {argv[0]!r}" if argv else "no benchmark named"
        print(f"{usage()}\n\nerror: {problem}", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    with_gpu = name == "fabric" and "--no-gpu" not in rest and not {"-h", "--help"} & set(rest)
    rc = int(importlib.import_module(BENCHMARKS[name]).main(rest) or 0)
    if with_gpu and _gpu_rows_available():
        import os

        os.makedirs("bench_results", exist_ok=True)
        gpu_args = ["--json", os.path.join("bench_results", "fabric_gpu.json")]
        gpu_args += ["--quick"] if "--quick" in rest else []
        rc |= int(importlib.import_module(BENCHMARKS["fabric-gpu"]).main(gpu_args) or 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
