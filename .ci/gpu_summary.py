"""Prints the last lines of .ci/gpu_verify.sh: test counts and the headline ratios of each GPU
benchmark JSON in the output folder (each benchmark's `headline` dict, else its known rows)."""

import glob
import json
import os
import sys

out = sys.argv[1]
print("== GPU verification summary")
with open(os.path.join(out, "env.txt")) as f:
    gpus = [line.strip() for line in f if line.startswith("GPU ")]
print(f"machine: {len(gpus)} x {gpus[0].split(':')[1].split('(')[0].strip() if gpus else '?'}")
with open(os.path.join(out, "test_counts.txt")) as f:
    for line in f:
        print("tests", line.rstrip())
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    name = os.path.basename(path)[6:-5]
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"bench {name}: unreadable ({e})")
        continue
    items = dict(data.get("headline", {}))
    for row in data.get("rows", []) if name == "fabric_gpu" else []:
        if row.get("ratio") is not None:
            items[row["name"]] = f"{row['ratio']:.2f}x {row['baseline']}" + (
                f" (target {row['target']})" if row.get("target") else "")
    for key, ratios in (data.get("ratios", {}) if name == "moe" else {}).items():
        for k in ("round_trip_speedup_vs_ragged", "dispatch_bw_vs_peer_copy", "combine_bw_vs_peer_copy"):
            if k in ratios:
                items[f"{key} {k}"] = f"{ratios[k]:.2f}"
    for e in data.get("errors", []):
        items.setdefault("error", e)
    print(f"bench {name}:")
    for k, v in items.items():
        print(f"  {k}: {v:.3g}" if isinstance(v, float) else f"  {k}: {v}")
