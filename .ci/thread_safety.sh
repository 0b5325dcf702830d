#!/usr/bin/env bash
# Compiles the native sources (common, the engine, the MoE host code and their CPU XLA handlers) with
# clang's thread-safety analysis (-Wthread-safety, as errors): the guarded members and lock
# requirements annotated in ffi/ (common/thread_annotations.h, the progress role in fabric/worker.h)
# are checked by the compiler. CUDA sources (*_cuda.cc, *.cu) are left out. Needs clang++ (setup.sh
# installs it), the libfabric headers and the venv's jax (for the XLA FFI headers).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cxx=${CLANGXX:-$(command -v clang++ || command -v clang++-19 || command -v clang++-16 || command -v clang++-14 || true)}
if [ -z "$cxx" ]; then echo "thread_safety.sh: no clang++ found" >&2; exit 2; fi
python=${PYTHON:-$root/.venv/bin/python}
xla=$("$python" -c "import jax.ffi; print(jax.ffi.include_dir())")
inc=(-Iffi "-I$xla")
[ -n "${LIBFABRIC_ROOT:-}" ] && inc+=("-I$LIBFABRIC_ROOT/usr/include")
status=0
checked=0
for f in ffi/common/*.cc ffi/fabric/*/*.cc ffi/moe/*.cc ffi/xla/fabric_cpu.cc ffi/xla/moe_cpu.cc; do
  case "$f" in *_cuda.cc) continue ;; esac
  "$cxx" -std=c++20 -fsyntax-only -Wthread-safety -Wthread-safety-beta -Werror=thread-safety \
    -Werror=thread-safety-beta "${inc[@]}" "$f" || status=1
  checked=$((checked + 1))
done
[ $status -eq 0 ] && echo "thread_safety.sh: $checked files clean ($("$cxx" --version | head -1))"
exit $status
