#!/usr/bin/env bash
# Waits, bounded, until no other process holds the package manager's locks (on a freshly booted VM
# unattended-upgrades or cloud-init often runs apt for the first minutes), saying who holds them.
# Usage: bash .ci/wait_apt_lock.sh [MAX_SECONDS]      (default: $JAX_GARDEN_APT_LOCK_WAIT_S or 600)
# Exit status 0 once the locks are free, 1 (with a message naming the holder) after MAX_SECONDS.
# apt and dpkg take fcntl locks; lslocks (util-linux) lists them. Without lslocks this returns at
# once and apt-get's own wait (-o DPkg::Lock::Timeout=..., which setup.sh passes) does the waiting.
# JAX_GARDEN_APT_LOCKS (colon-separated paths) replaces the list of lock files (the tests use it).
set -euo pipefail
max=${1:-${JAX_GARDEN_APT_LOCK_WAIT_S:-600}}
case "$max" in '' | *[!0-9]*) echo "wait_apt_lock.sh: MAX_SECONDS must be a whole number, got '$max'" >&2; exit 2 ;; esac
IFS=: read -r -a locks <<< "${JAX_GARDEN_APT_LOCKS:-/var/lib/dpkg/lock-frontend:/var/lib/dpkg/lock:/var/lib/apt/lists/lock:/var/cache/apt/archives/lock}"
command -v lslocks >/dev/null 2>&1 || exit 0

holders() {  # one "COMMAND (pid PID) holds PATH" line per lock of the list that is held
  lslocks --noheadings --raw --output PID,COMMAND,PATH 2>/dev/null | while read -r pid cmd path; do
    for lock in "${locks[@]}"; do
      if [ "$path" = "$lock" ]; then echo "$cmd (pid $pid) holds $path"; fi
    done
  done | sort -u | paste -sd ';' - | sed 's/;/; /g'
}

start=$SECONDS
next_note=0
while held=$(holders) && [ -n "$held" ]; do
  waited=$((SECONDS - start))
  if [ "$waited" -ge "$max" ]; then
    echo "setup: the package manager is still busy after ${max} s: ${held}." >&2
    echo "setup: let it finish (or stop it), then run this command again; JAX_GARDEN_APT_LOCK_WAIT_S=SECONDS waits longer." >&2
    exit 1
  fi
  if [ "$waited" -ge "$next_note" ]; then
    echo "setup: waiting for the package manager's lock (${held}); ${waited} s so far, at most ${max} s"
    next_note=$((waited + 30))
  fi
  sleep 1
done
if [ "$next_note" -gt 0 ]; then echo "setup: the package manager's lock is free after $((SECONDS - start)) s"; fi
exit 0
