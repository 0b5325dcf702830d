#!/usr/bin/env bash
# A short GPU check of the MoE kernels (about 3 minutes on one H100): builds and installs the
# package as .ci/gpu_verify.sh does, prints `bench moe --profile` (every variant of the NVLink
# kernels at EP1, 1 and 128 tokens: old against new, each kernel's time split, the floors), then
# runs the MoE GPU tests that exercise the synchronisation modes and the fused kernels (in one
# process, 2 processes sharing the GPU, under CUDA graphs, a peer that never arrives).
# Usage: bash .ci/moe_probe.sh OUTDIR   (PYTHON=python3 by default; logs and JSON under OUTDIR)
set -uo pipefail
out=${1:?usage: bash .ci/moe_probe.sh OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
if [ -z "${LIBFABRIC_ROOT:-}" ] && [ -d "$root/.deps/root/usr/include/rdma" ]; then
  export LIBFABRIC_ROOT="$root/.deps/root"
fi
start=$(date +%s)
note() { echo "[$(( $(date +%s) - start ))s] $*"; }

note "build"
if ! timeout 240 "$python" -m pip install --no-build-isolation -v . > "$out/build.log" 2>&1; then
  note "BUILD FAILED"; tail -30 "$out/build.log"; exit 1
fi
note "bench moe --profile"
(cd "$out" && timeout 100 "$python" -P -m jax_garden.bench moe --quick --no-classic --profile --ladder-iters 40 \
  --out "$out/moe_profile.json") > "$out/bench.log" 2>&1
note "bench rc=$?"
sed -n '/MoE ladder and profile/,$p' "$out/bench.log"
grep -E "error|Error" "$out/bench.log" | tail -10
note "MoE GPU tests"
timeout 150 "$python" -P -m pytest -q -rfE -p no:cacheprovider --timeout=110 -m gpu tests/test_moe_gpu.py \
  -k "sync_variants or fused_kernel_stamps or (one_process_per_rank and 2) or under_cuda_graphs or never_arrives" \
  > "$out/tests.log" 2>&1
note "tests rc=$?"
tail -40 "$out/tests.log"
