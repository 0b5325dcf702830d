#!/usr/bin/env python3
"""Mutation habit (not in CI): plant known bugs in the product one at a time, run the tests meant to
catch each, and report which test catches it (docs/testing.md keeps the table).

Each plant is a pattern-based edit (an exact snippet, searched in a set of files by glob), so the list
survives file moves and splits; a snippet that matches nowhere or more than once is reported as
"not planted" (update the plant). The original file is restored after each plant, also on Ctrl-C or
SIGTERM; a hard kill leaves ``<file>.mutant-orig`` beside it, which the next run restores first.
A native plant (C++) rebuilds the extension (ninja, in --build) before its tests run.

Usage:
  .venv/bin/python .ci/mutants.py [--only NAME ...] [--build DIR] [--out FILE] [--list]

Grow the list as protocols grow: add a Plant with the bug a careful reviewer might write, the tests
that should catch it, and run this script; a plant that survives is a missing test.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = "--adversary=1,2"  # the adversarial runs CI does (conftest.py)


@dataclasses.dataclass(frozen=True)
class Plant:
    name: str
    why: str                  # the bug, as a reviewer would describe it
    files: tuple[str, ...]    # globs (relative to the root) of the files that may hold the snippet
    before: str               # exact snippet (must occur exactly once over those files)
    after: str
    tests: tuple[str, ...]    # pytest node ids / files to run
    pytest_args: tuple[str, ...] = ()

    @property
    def native(self) -> bool:
        return not all(f.endswith(".py") for f in self.files)


# Where the services live (a module, or a package once split).
KV = ("jax_garden/kv.py", "jax_garden/kv/**/*.py")
WEIGHTS = ("jax_garden/weights.py", "jax_garden/weights/**/*.py")


PLANTS = [
    # ---- the six classes of issue 23 ----------------------------------------------------------------
    Plant("kv-fence-frees-early",
          "kv: the decode side frees a cancelled request's pages as soon as FENCED arrives, without waiting "
          "until the posted writes are counted",
          KV, "if p.taken == fence.posted:", "if True:",
          ("tests/test_adversarial_protocols.py::test_kv_fence_that_overtakes_the_writes_it_covers",
           "tests/test_kv.py::test_cancel_mid_stream_is_fenced")),
    Plant("kv-ready-one-early",
          "kv: READY declared with one data imm still outstanding",
          KV,
          "if p.taken == p.expected:",
          "if p.taken[0] >= p.expected[0] - 1 and p.taken[1] == p.expected[1]:",
          ("tests/test_adversarial_protocols.py::test_kv_request_stays_pending_while_its_last_data_write_is_held",
           "tests/test_kv.py::test_stream_contents_bitwise", "tests/test_kv.py::test_many_concurrent_requests")),
    Plant("weights-source-complete-early",
          "weights: a source counted complete one imm early",
          WEIGHTS,
          "if st.counter.credits >= st.expected:\n                st.counter.wait(st.expected, 1.0)",
          "if st.counter.credits >= st.expected - 1:\n                st.counter.wait(st.expected - 1, 1.0)",
          ("tests/test_adversarial_protocols.py::test_weights_version_not_in_service_while_a_sources_last_write_is_held",
           "tests/test_weights.py::test_single_process_push_versions_and_refusals")),
    Plant("weights-swap-first-runs",
          "weights: the publisher swaps the destinations of a piece's first two runs",
          WEIGHTS, "dsts = g.run_dst_offsets().tolist()",
          "dsts = (lambda d: d[1::-1] + d[2:])(g.run_dst_offsets().tolist())",
          ("tests/test_adversarial_protocols.py::test_weights_push_with_multi_run_pieces_and_fp8_blocks_bitwise",
           "tests/test_weights.py::test_single_process_push_versions_and_refusals",
           "tests/test_weights.py::test_publisher_with_two_domains")),
    Plant("weights-fp8-scale-440",
          "weights: the fp8 scale convention changed from 1/448 to 1/440 in the product",
          WEIGHTS, "INV_FP8_MAX = np.float32(1.0 / 448.0)", "INV_FP8_MAX = np.float32(1.0 / 440.0)",
          ("tests/test_adversarial_protocols.py::test_weights_push_with_multi_run_pieces_and_fp8_blocks_bitwise",
           "tests/test_weights.py::test_single_process_push_versions_and_refusals",
           "tests/test_weights.py::test_fp8_error_bound")),
    Plant("ipc-bounds-off-by-one",
          "fabric: the same-host (ipc) bounds check lets a write run one byte past the region",
          ("ffi/fabric/core/shared_regions.cc",), "if (offset > size || length > size - offset) {",
          "if (offset > size || length > size - offset + 1) {",
          ("tests/test_adversary.py::test_ipc_receiver_refuses_writes_past_the_region_at_the_exact_boundary",
           "tests/test_fabric_reliability.py::test_ipc_path_refuses_a_forged_length_in_process")),
    # ---- more, grown with the adversarial mode --------------------------------------------------------
    Plant("staged-bounds-off-by-one",
          "fabric: the staged receiver lets a chunk segment run one byte past the region",
          ("ffi/fabric/transport/transport_staged*.cc", "ffi/fabric/staged/**/*.cc"),
          "if (!(off <= in.region->length() && len <= in.region->length() - off)) {",
          "if (!(off <= in.region->length() && len <= in.region->length() - off + 1)) {",
          ("tests/test_adversary.py::test_staged_receiver_refuses_segments_past_the_region_at_the_exact_boundary",
           "tests/test_fabric_security.py")),
    Plant("staged-imms-before-last-chunk",
          "fabric: a staged sender (source staging only) sends the imms once all but the last chunk's writes "
          "completed",
          ("ffi/fabric/transport/transport_staged*.cc", "ffi/fabric/staged/**/*.cc"), "} else if (chunks_written_ == chunks_.size() && !imms_started_) {",
          "} else if (chunks_written_ + 1 >= chunks_.size() && !imms_started_) {",
          ("tests/test_fabric_staging.py::test_staged_single_write",
           "tests/test_fabric_staging.py::test_staged_paged_and_imm_counted_after_data",
           "tests/test_adversary.py::test_imm_never_counted_before_its_data_on_every_path")),
    Plant("checked-write-drops-dst-offset",
          "fabric: the checked (slow) write path passes dst_offset as 0",
          ("jax_garden/fabric.py", "jax_garden/fabric/**/*.py"),
          '_check_count("src_offset", src_offset), _check_count("dst_offset", dst_offset),\n'
          '                                  _check_imm(imm), _check_path(path))',
          '_check_count("src_offset", src_offset), 0 * _check_count("dst_offset", dst_offset),\n'
          '                                  _check_imm(imm), _check_path(path))',
          ("tests/test_fabric.py::test_checked_write_path_honours_offsets",
           "tests/test_fabric.py::test_write_without_imm_and_descriptor_bytes",
           "tests/test_fabric.py::test_write_contents_and_imm_count")),
    # ---- the same bugs against the protocol suites under the adversarial mode (random holds) -------------
    Plant("kv-fence-frees-early/adversary",
          "kv-fence-frees-early, against the kv suites run with --adversary=1,2",
          KV, "if p.taken == fence.posted:", "if True:",
          ("tests/test_kv.py::test_cancel_mid_stream_is_fenced",
           "tests/test_kv.py::test_ten_thousand_cancel_reuse_cycles_no_late_writes",
           "tests/test_kv.py::test_cancel_reuse_cycles_across_processes"), (SEEDS,)),
    Plant("kv-ready-one-early/adversary",
          "kv-ready-one-early, against the kv suites run with --adversary=1,2",
          KV, "if p.taken == p.expected:", "if p.taken[0] >= p.expected[0] - 1 and p.taken[1] == p.expected[1]:",
          ("tests/test_kv.py::test_stream_contents_bitwise", "tests/test_kv.py::test_many_concurrent_requests"),
          (SEEDS,)),
    Plant("weights-source-complete-early/adversary",
          "weights-source-complete-early, against the weights suites run with --adversary=1,2",
          WEIGHTS, "if st.counter.credits >= st.expected:\n                st.counter.wait(st.expected, 1.0)",
          "if st.counter.credits >= st.expected - 1:\n                st.counter.wait(st.expected - 1, 1.0)",
          ("tests/test_weights.py::test_single_process_push_versions_and_refusals",
           "tests/test_weights.py::test_publisher_with_two_domains", "tests/test_weights.py::test_many_small_tensors"),
          (SEEDS,)),
    Plant("staged-imms-before-last-chunk/adversary",
          "staged-imms-before-last-chunk, against the staging suites run with --adversary=1,2",
          ("ffi/fabric/transport/transport_staged*.cc", "ffi/fabric/staged/**/*.cc"),
          "} else if (chunks_written_ == chunks_.size() && !imms_started_) {",
          "} else if (chunks_written_ + 1 >= chunks_.size() && !imms_started_) {",
          ("tests/test_fabric_staging.py::test_staged_single_write",
           "tests/test_fabric_staging.py::test_staged_paged_and_imm_counted_after_data",
           "tests/test_fabric_staging.py::test_scatter_with_mixed_paths"), (SEEDS,)),
    Plant("barrier-counts-one-short",
          "fabric tests' barrier helper: a rank leaves once all but one peer arrived",
          ("tests/test_fabric_procs.py",), "eng.imm_counter(700 + k).wait(size - 1, 30)",
          "eng.imm_counter(700 + k).wait(size - 2, 30)",
          ("tests/test_fabric_procs.py::test_barrier_across_four_processes",)),
]


def _backups() -> list[Path]:
    return [Path(p) for p in glob.glob(str(ROOT / "**" / "*.mutant-orig"), recursive=True)]


def restore_leftovers() -> None:
    for b in _backups():
        target = b.with_name(b.name[: -len(".mutant-orig")])
        target.write_bytes(b.read_bytes())
        b.unlink()
        print(f"restored {target.relative_to(ROOT)} from a run that was killed", flush=True)


def locate(plant: Plant) -> tuple[Path | None, str]:
    hits = []
    files = sorted({f for pattern in plant.files for f in glob.glob(str(ROOT / pattern), recursive=True)})
    for f in files:
        text = Path(f).read_text()
        n = text.count(plant.before)
        if n:
            hits.append((Path(f), n))
    total = sum(n for _, n in hits)
    if total != 1:
        where = f" ({[str(p.relative_to(ROOT)) for p, _ in hits]})" if hits else ""
        return None, f"snippet found {total} times in {', '.join(plant.files)}{where}"
    return hits[0][0], ""


def build(build_dir: Path) -> tuple[bool, str]:
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / ".ci" / "dev_build.sh"), str(build_dir)], capture_output=True, text=True,
                       cwd=ROOT)
    return r.returncode == 0, f"{time.monotonic() - t0:.0f} s" if r.returncode == 0 else (r.stdout + r.stderr)[-3000:]


def run_tests(plant: Plant, pkg: Path, timeout: float) -> tuple[list[str], list[str], str, float]:
    """(failed test ids, passed test ids, output, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(pkg))
    env.pop("JAX_GARDEN_ADVERSARY", None)
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-rfEp", "-p", "no:cacheprovider", *plant.pytest_args,
           *plant.tests]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return ["(timed out)"], [], out, time.monotonic() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    passed = re.findall(r"^PASSED (\S+)", out, re.M)
    return failed, passed, out, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="plant names to run (default: all)")
    ap.add_argument("--build", default=str(ROOT / "build" / "mutants"), help="build directory for native plants")
    ap.add_argument("--out", help="also write the report (markdown) here")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per plant's test run")
    ap.add_argument("--list", action="store_true", help="list the plants and exit")
    args = ap.parse_args()
    if args.list:
        for p in PLANTS:
            print(f"{p.name:32s} {p.why}")
        return 0

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    restore_leftovers()
    plants = [p for p in PLANTS if not args.only or p.name in args.only]
    unknown = set(args.only or ()) - {p.name for p in PLANTS}
    if unknown:
        ap.error(f"unknown plants: {sorted(unknown)}")
    build_dir = Path(args.build)
    ok, info = build(build_dir)
    if not ok:
        print(f"the unmodified tree does not build:\n{info}")
        return 2
    pkg = build_dir / "pkg"
    rows = []
    dirty_native = False
    try:
        for p in plants:
            path, why = locate(p)
            if path is None:
                rows.append((p, "not planted: " + why, [], [], 0.0))
                print(f"[{p.name}] NOT PLANTED: {why}", flush=True)
                continue
            original = path.read_bytes()
            backup = path.with_name(path.name + ".mutant-orig")
            backup.write_bytes(original)
            try:
                path.write_text(original.decode().replace(p.before, p.after, 1))
                if p.native:
                    dirty_native = True
                    ok, info = build(build_dir)
                    if not ok:
                        rows.append((p, "planted code does not build", [], [], 0.0))
                        print(f"[{p.name}] does not build:\n{info}", flush=True)
                        continue
                failed, passed, out, secs = run_tests(p, pkg, args.timeout)
                verdict = "caught" if failed else "SURVIVED"
                rows.append((p, verdict, failed, passed, secs))
                print(f"[{p.name}] {verdict} in {secs:.0f} s: {', '.join(failed) or '-'}", flush=True)
                if not failed:
                    print(out[-2000:], flush=True)
            finally:
                path.write_bytes(original)
                backup.unlink()
    finally:
        if dirty_native:
            build(build_dir)  # leave the mutants build matching the restored sources
    lines = ["| plant | the bug | caught by | not caught by |", "|---|---|---|---|"]
    for p, verdict, failed, passed, secs in rows:
        who = "<br>".join(f"`{f}`" for f in failed) if failed else f"**{verdict}**"
        extra = f" (with `{' '.join(p.pytest_args)}`)" if p.pytest_args else ""
        missed = "<br>".join(f"`{f}`" for f in passed) or "-"
        lines.append(f"| `{p.name}` | {p.why} | {who}{extra} | {missed} |")
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0 if all(v == "caught" for _, v, _, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
