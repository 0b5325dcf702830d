#!/usr/bin/env bash
# Set-up on a fresh Debian/Ubuntu machine (root), for one command; idempotent, and quick when nothing
# changed: each step is skipped when its result is already there, and says so.
# Usage: bash .ci/setup.sh [serve|test]      (serve.sh and bench.sh ask for serve, test.sh for test)
#   serve  libfabric headers and a C++ compiler (apt, only those missing), a Python 3.12 venv in .venv
#          with jax 0.11.2 and the build tools (pip), jax_garden built from this checkout and installed
#          there, and its extension linked into the checkout (so `import jax_garden` works from here too);
#   test   the same plus clang (the thread-safety check), pytest and matplotlib (the --plot tests).
# apt waits for the package manager's lock (another apt-get, e.g. unattended upgrades on a fresh VM)
# up to JAX_GARDEN_APT_LOCK_WAIT_S seconds (default 600). JAX_GARDEN_CUDA=ON builds the CUDA parts
# (default OFF here: CI has nvcc but no GPU; GPU machines build with .ci/gpu_verify.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mode=${1:-serve}
case "$mode" in serve | test) ;; *) echo "usage: bash .ci/setup.sh [serve|test] (got '$mode')" >&2; exit 2 ;; esac
lock_wait_s=${JAX_GARDEN_APT_LOCK_WAIT_S:-600}
t_setup=$SECONDS

# -------------------------------------------------------------------------- system packages (apt)
apt_get() {  # apt-get once the package manager's lock is free (bounded); apt's own wait covers a race
  local left=$((lock_wait_s - (SECONDS - t_setup)))
  [ "$left" -gt 0 ] || left=1
  bash "$root/.ci/wait_apt_lock.sh" "$left"
  left=$((lock_wait_s - (SECONDS - t_setup)))
  [ "$left" -gt 0 ] || left=1
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$left" "$@"
}
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then apt_get update -qq; apt_updated=1; fi
  apt_get install -y -qq "$@" >/dev/null
}

need=()
if [ -z "${LIBFABRIC_ROOT:-}" ] && ! pkg-config --exists libfabric 2>/dev/null; then need+=(libfabric-dev pkg-config); fi
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || need+=(g++)
if [ "$mode" = test ]; then
  # clang: .ci/thread_safety.sh checks the engine's lock annotations with -Wthread-safety
  command -v clang++ >/dev/null 2>&1 || command -v clang++-14 >/dev/null 2>&1 || need+=(clang)
fi

find_python312() {
  # A candidate counts only if it runs and is 3.12 (pyenv shims exist for versions not selected).
  for c in /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 python3.12; do
    for f in $c; do
      if "$f" -c 'import sys, venv; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then echo "$f"; return 0; fi
    done
  done
  return 1
}
py=""
if [ ! -x .venv/bin/python ]; then
  py=$(find_python312 || true)
  [ -n "$py" ] || need+=(python3.12 python3.12-venv)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (apt)"
  apt_install "${need[@]}"
else
  echo "setup: system packages present (libfabric headers, C++ compiler$([ "$mode" = test ] && echo ", clang"))"
fi

# ------------------------------------------------------------------------------ Python venv (pip)
if [ ! -x .venv/bin/python ]; then
  py=${py:-$(find_python312)}
  echo "setup: creating .venv with $py"
  "$py" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
reqs=("jax==0.11.2" "jaxlib==0.11.2" numpy ml_dtypes nanobind "scikit-build-core>=0.10" ninja cmake)
[ "$mode" = test ] && reqs+=(pytest pytest-timeout matplotlib)
stamp_reqs=.venv/.jax_garden-requirements  # what an earlier run of this script installed
missing=()
for r in "${reqs[@]}"; do grep -qxF -- "$r" "$stamp_reqs" 2>/dev/null || missing+=("$r"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing into .venv (pip): ${missing[*]}"
  .venv/bin/pip install -q "${missing[@]}"
  printf '%s\n' "${missing[@]}" >> "$stamp_reqs"
else
  echo "setup: .venv has jax 0.11.2 and the build tools$([ "$mode" = test ] && echo ", pytest and matplotlib")"
fi

# ------------------------------------------------------------------- jax_garden from this checkout
cuda=${JAX_GARDEN_CUDA:-OFF}
# The build's inputs: every source file, the build settings, the interpreter.
fingerprint=$( {
  find ffi jax_garden cmake -type f \( -name '*.py' -o -name '*.cc' -o -name '*.h' -o -name '*.cu' \
    -o -name '*.cmake' \) -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
  sha256sum CMakeLists.txt pyproject.toml
  echo "cuda=$cuda libfabric_root=${LIBFABRIC_ROOT:-} python=$(readlink -f .venv/bin/python)"
} | sha256sum | cut -d' ' -f1)
stamp_build=.venv/.jax_garden-build
installed_ok() {  # the installed package imports (from outside the checkout) and the links are in place
  local link
  link=$(compgen -G "jax_garden/_jax_garden*.so" | head -1)
  [ -n "$link" ] && [ -e "$link" ] && [ -e jax_garden/bin/raw_fabric_bench ] &&
    (cd / && "$root/.venv/bin/python" -P -c 'import jax_garden' >/dev/null 2>&1)
}
if [ "$(cat "$stamp_build" 2>/dev/null)" = "$fingerprint" ] && installed_ok; then
  echo "setup: jax_garden is up to date (no source file changed since the last build); not rebuilding"
else
  rm -f "$stamp_build"
  echo "setup: building jax_garden from this checkout and installing it into .venv (CUDA parts: $cuda; the first" \
       "build compiles the C++ engine, several minutes on 2 cores; later builds recompile only what changed)"
  t_build=$SECONDS
  rm -f jax_garden/_jax_garden*.so jax_garden/bin/raw_fabric_bench  # links of an earlier build: not sources
  JAX_GARDEN_CUDA=$cuda .venv/bin/pip install -q --no-build-isolation .
  # Link the installed extension (and the raw libfabric baseline the fabric benchmark runs) into the
  # checkout: Python puts the current directory first on sys.path, so from the checkout's root
  # `import jax_garden` finds these sources, which then load the extension built from them.
  so=$(cd / && "$root/.venv/bin/python" -P -c 'import jax_garden._jax_garden as m; print(m.__file__)')
  ln -sfn "$so" "jax_garden/$(basename "$so")"
  mkdir -p jax_garden/bin
  ln -sfn "$(dirname "$so")/bin/raw_fabric_bench" jax_garden/bin/raw_fabric_bench
  echo "$fingerprint" > "$stamp_build"
  echo "setup: built and installed in $((SECONDS - t_build)) s"
fi
echo "setup: done in $((SECONDS - t_setup)) s"
