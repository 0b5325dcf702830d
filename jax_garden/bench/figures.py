"""The figures of ``--plot``: one function per benchmark, drawing from the result that benchmark writes
as JSON, so a saved run can be drawn again later::

    python -m jax_garden.bench.figures fabric bench_results/fabric.json fabric.png
    python -m jax_garden.bench.figures kv bench_results/kv.json kv_ttft.png

Built on :mod:`jax_garden.bench._plot` (matplotlib, optional).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jax_garden.bench import _plot


def note(benchmark: str, argv: list[str], *details: str) -> str:
    """The small print under a figure: the command that measured it (output paths left out), then
    ``details`` (machine, load) and today's date."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--json", "--plot"):
            skip = True
        elif not a.startswith(("--out=", "--json=", "--plot=")):
            keep.append(a)
    return "; ".join([f"python -m jax_garden.bench {' '.join([benchmark, *keep])}", *details,
                      time.strftime("%Y-%m-%d")])


def fabric(result: dict, path: str, note: str | None = None) -> Path:
    """``bench fabric``: p50 latency (half round trip) and bandwidth of single writes against their size,
    one line per system; raw libfabric and TCP sockets (the baselines) dashed."""
    writes = [r for r in result["rows"] if r["test"] == "write"]
    if not writes:
        raise ValueError("fabric figure: the result has no write rows")
    sizes = sorted({r["size"] for r in writes})
    names = list(dict.fromkeys(r["name"] for r in writes))
    value = {(r["name"], r["size"]): r for r in writes}

    def series(field: str) -> dict[str, tuple[list[int], list[float | None]]]:
        return {n: (sizes, [value.get((n, s), {}).get(field) for s in sizes]) for n in names}

    styles = {n: "--" for n in names if not n.startswith("engine")}
    ticks = _plot.size_ticks(sizes)
    window = result.get("config", {}).get("window")
    return _plot.save(path, [
        _plot.Lines("write latency (p50, half round trip)", "write size", "µs", series("p50_us"),
                    logx=True, logy=True, xticks=ticks, styles=styles),
        _plot.Lines(f"bandwidth ({window} writes in flight)" if window else "bandwidth", "write size", "GB/s",
                    series("gbps"), logx=True, xticks=ticks, styles=styles),
    ], title="TransferEngine vs raw libfabric vs TCP sockets (tcp provider, 127.0.0.1)", note=note)


# bench kv systems in the order they are drawn, with their labels
KV_SYSTEMS = {"colocated": "colocated", "layerwise": "layer-wise", "layerwise, open waited": "layer-wise,\nopen waited",
              "layerwise scattered": "layer-wise\nscattered",
              "bulk": "bulk after\nprefill", "jax.experimental.transfer": "jax.experimental\n.transfer"}


def kv(result: dict, path: str, note: str | None = None) -> Path:
    """``bench kv``: time to first token per system, one panel per platform and prompt length: the p50
    of each part stacked (ticket sent until the prefill starts: the ticket's trip, and the stream's
    opening where the prefill waits for it; the prefill; from the prefill's end to READY), and
    the p50 TTFT itself as a marker (medians of parts need not add up to the median total)."""
    panels = []
    keys = list(dict.fromkeys((r["platform"], r["tokens"]) for r in result["rows"] if r.get("ttft_ms")))
    if not keys:
        raise ValueError("kv figure: the result has no rows with a TTFT")
    for platform, tokens in keys:
        rows = {r["system"]: r for r in result["rows"] if (r["platform"], r["tokens"]) == (platform, tokens)}
        systems = [s for s in KV_SYSTEMS if rows.get(s, {}).get("ttft_ms")]
        opening, prefill, after, ttft = [], [], [], []
        for s in systems:
            r = rows[s]
            o = r.get("start_ms", r.get("open_ms")) or 0.0
            p = r.get("prefill_ms") or 0.0
            opening.append(o)
            prefill.append(p)
            after.append(max(0.0, r["ttft_ms"] - o - p))
            ttft.append(r["ttft_ms"])
        panels.append(_plot.StackedBars(
            f"{platform}, {tokens // 1024}k-token prompt" if tokens % 1024 == 0 else f"{platform}, {tokens} tokens",
            "ms", [KV_SYSTEMS[s] for s in systems],
            {"ticket sent -> prefill starts": opening, "prefill": prefill, "prefill end -> READY": after},
            markers={"TTFT (p50)": ttft}))
    return _plot.save(path, panels, title="KV streaming: time to first token per system", note=note)


FIGURES = {"fabric": fabric, "kv": kv}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jax_garden.bench.figures",
                                 description="Draw a benchmark's --plot figure from the JSON it wrote.")
    ap.add_argument("benchmark", choices=sorted(FIGURES))
    ap.add_argument("json", help="the benchmark's JSON output")
    ap.add_argument("out", help="figure path (PNG)")
    ap.add_argument("--note", default=None, help="a line of small print (command, machine, date)")
    args = ap.parse_args(argv)
    try:
        _plot.check(args.out)
    except _plot.PlotUnavailable as e:
        print(f"figures: {e}", file=sys.stderr)
        return 2
    result = json.loads(Path(args.json).read_text())
    print(f"wrote {FIGURES[args.benchmark](result, args.out, args.note)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
