#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: libfabric headers, a Python 3.12 venv with
# jax 0.11.2, and the package built from this checkout. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

need=()
pkg-config --exists libfabric 2>/dev/null || need+=(libfabric-dev pkg-config)
# clang: .ci/thread_safety.sh checks the engine's lock annotations with -Wthread-safety
command -v clang++ >/dev/null 2>&1 || command -v clang++-14 >/dev/null 2>&1 || need+=(clang)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

find_python312() {
  # A candidate counts only if it runs and is 3.12 (pyenv shims exist for versions not selected).
  for c in /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 python3.12; do
    for f in $c; do
      if "$f" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then echo "$f"; return 0; fi
    done
  done
  return 1
}
py=$(find_python312 || true)
if [ -z "$py" ]; then
  apt-get install -y -qq python3.12 python3.12-venv >/dev/null
  py=python3.12
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $py"
  "$py" -m venv .venv
fi
echo "setup: installing jax 0.11.2 and the build tools into .venv (pip)"
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "jax==0.11.2" "jaxlib==0.11.2" numpy ml_dtypes nanobind "scikit-build-core>=0.10" \
  pytest pytest-timeout ninja cmake
# CPU-only unless asked otherwise: CI has nvcc but no GPU, and the CUDA build is checked on GPU machines.
echo "setup: building and installing jax_garden from this checkout (about a minute)"
JAX_GARDEN_CUDA=${JAX_GARDEN_CUDA:-OFF} .venv/bin/pip install -q --no-build-isolation .
echo "setup: done"
