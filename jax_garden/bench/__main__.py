"""python -m jax_garden.bench <fabric|fabric-gpu|moe|weights|kv> [options]

``fabric`` runs the host rows (engine vs raw libfabric vs TCP on 127.0.0.1) and, when this machine
has a GPU and the build has CUDA, the GPU rows of ``fabric-gpu`` after them (``--no-gpu`` skips).
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


def _gpu_rows_available() -> bool:
    try:
        from jax_garden import fabric

        return bool(fabric.gpu_available())
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m jax_garden.bench {{{'|'.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    with_gpu = name == "fabric" and "--no-gpu" not in rest
    rest = [a for a in rest if a != "--no-gpu"] if name == "fabric" else rest
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
