#!/usr/bin/env bash
# Developer build without installing: compiles into BUILD_DIR and lays out BUILD_DIR/pkg/jax_garden
# (symlinks to the sources + the built extension), so several builds can coexist.
# Usage: .ci/dev_build.sh [BUILD_DIR] [extra cmake args...]; then PYTHONPATH=BUILD_DIR/pkg python -P ... (-P: keep the source tree off sys.path)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build/dev}; shift || true
python=${PYTHON:-$root/.venv/bin/python}
# Prefer the venv's cmake and ninja (CUDA 20 needs CMake >= 3.26); harmless where there is none.
export PATH="$root/.venv/bin:$PATH"
cmake -S "$root" -B "$build" -G Ninja -DPython_EXECUTABLE="$python" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
ninja -C "$build" >/dev/null
pkg=$build/pkg/jax_garden
mkdir -p "$pkg"
for f in "$root"/jax_garden/*; do
  case "$(basename "$f")" in bin | __pycache__ | _jax_garden*.so) continue ;; esac  # setup.sh's links, caches
  ln -sfn "$f" "$pkg/$(basename "$f")"
done
ln -sfn "$build"/_jax_garden*.so "$pkg/"
mkdir -p "$pkg/bin" && ln -sfn "$build/raw_fabric_bench" "$pkg/bin/raw_fabric_bench"
echo "$build/pkg"
