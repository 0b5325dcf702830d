#!/usr/bin/env bash
# The test command (README): sets up if needed, then runs the CPU test suite, then the protocol
# suites again under the engine's adversarial delivery mode (docs/testing.md), once per seed in
# JAX_GARDEN_TEST_SEEDS (default 1,2; empty: skip that pass).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash .ci/setup.sh test
bash .ci/thread_safety.sh  # the engine's lock annotations, checked by clang
# -P keeps the source tree off sys.path, so the installed package (with its extension) is tested.
.venv/bin/python -P -m pytest tests -q -p no:cacheprovider "$@"
seeds=${JAX_GARDEN_TEST_SEEDS-1,2}
if [ -n "$seeds" ]; then
  exec .venv/bin/python -P -m pytest tests -q -p no:cacheprovider -m adversarial --adversary="$seeds" "$@"
fi
