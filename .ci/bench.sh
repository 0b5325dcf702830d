#!/usr/bin/env bash
# The main job (README): sets up if needed, then runs the fabric benchmark on 127.0.0.1
# (engine vs raw libfabric vs TCP sockets, same run). Extra arguments go to the benchmark.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash .ci/setup.sh
exec .venv/bin/python -P -m jax_garden.bench fabric "$@"
