#!/usr/bin/env bash
# The main job (README): sets up if needed, then runs the disaggregated-serving example: a prefill
# process streams each layer's KV cache into a decode process's paged cache while its prefill runs
# (jax_garden.kv over the TransferEngine), several concurrent requests are decoded greedily, and
# every generated token is checked against the same model run in one process (non-zero exit on a
# mismatch). CPU over tcp on 127.0.0.1; on a machine with 2 GPUs, one GPU per process.
# Extra arguments go to the example (e.g. --quick, --requests N).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash .ci/setup.sh serve
exec .venv/bin/python -P examples/disaggregated_serving.py "$@"
