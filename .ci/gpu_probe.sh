#!/usr/bin/env bash
# The quick look before .ci/gpu_verify.sh (< 4 minutes on one GPU, build included): checks the
# riskiest assumptions of the ipc path first, with two processes sharing GPU 0 (or on GPUs 0 and 1):
#   1. imm records stored by the copy's GPU stream (cuStreamWriteValue64) into another process's
#      mailbox, in shared memory registered with cudaHostRegister: the every-op test (write, paged,
#      scatter; exact imm counts, bytes compared, stats say the stream stored the records);
#   2. VMM IPC on by default into XLA's buffers of another process on the same device, and cuda_async
#      pool memory falling back to staged with its reason;
#   3. per-op cost at 64 KiB / 1 MiB / 16 MiB, paged 16 KiB x 10,000, 100,000-page posting, and a
#      jax-array destination, against same-device cudaMemcpyAsync (bench fabric-gpu --probe).
# Usage: bash .ci/gpu_probe.sh OUTDIR   (PYTHON=python3 by default; LIBFABRIC_ROOT as for gpu_verify.sh)
set -uo pipefail
out=${1:?usage: bash .ci/gpu_probe.sh OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${PYTHON:-python3}
start=$(date +%s)
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
if [ -z "${LIBFABRIC_ROOT:-}" ] && [ -d "$root/.deps/root/usr/include/rdma" ]; then
  export LIBFABRIC_ROOT="$root/.deps/root"
fi
note() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/probe_steps.txt"; }

note "machine: $(nvidia-smi -L 2>/dev/null | tr '\n' ';')"
note "build: $python -m pip install --no-build-isolation ."
if ! timeout 180 "$python" -m pip install --no-build-isolation -v . > "$out/probe_build.log" 2>&1; then
  note "BUILD FAILED (see probe_build.log)"; tail -30 "$out/probe_build.log"; exit 1
fi
note "built; gpu_available: $(cd /tmp && "$python" -c 'from jax_garden import fabric; print(fabric.gpu_available())' 2>&1 | tail -1)"

note "tests: every op across processes (GPU-stored imm records), jax arrays per allocator (VMM IPC default)"
timeout -k 10 100 "$python" -P -m pytest -q -rfE -p no:cacheprovider --timeout=90 tests/test_fabric_gpu.py \
  -k "(every_op_across_processes and ipc) or vmm-default or cuda-async" > "$out/probe_tests.log" 2>&1
note "tests: rc=$? $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$out/probe_tests.log" | tail -1)"
grep -E "^(FAILED|ERROR)" "$out/probe_tests.log" | head -10

note "bench fabric-gpu --probe"
(cd "$out" && timeout -k 10 75 "$python" -P -m jax_garden.bench fabric-gpu --probe --json "$out/probe_fabric_gpu.json") \
  > "$out/probe_bench.log" 2>&1
note "bench: rc=$?"
cat "$out/probe_bench.log" | tail -20
note "done"
