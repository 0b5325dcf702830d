#!/usr/bin/env bash
# The fabric benchmark (README): sets up if needed, then runs it on 127.0.0.1
# (engine vs raw libfabric vs TCP sockets, same run). Extra arguments go to the benchmark.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash .ci/setup.sh serve
exec .venv/bin/python -P -m jax_garden.bench fabric "$@"
