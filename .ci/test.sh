#!/usr/bin/env bash
# The test command (README): sets up if needed, then runs the CPU test suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash .ci/setup.sh test
bash .ci/thread_safety.sh  # the engine's lock annotations, checked by clang
# -P keeps the source tree off sys.path, so the installed package (with its extension) is tested.
exec .venv/bin/python -P -m pytest tests -q -p no:cacheprovider "$@"
