"""What every benchmark needs besides its own measurements: child processes that are always
reaped, percentile / median statistics, ratios, progress lines, an aligned table, and the JSON
report with its top-level ``headline`` dict (the key same-run ratios, which .ci/gpu_verify.sh
prints)."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

# ------------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float, *, interpolate: bool = False) -> float:
    """The ``q``-quantile (``q`` in [0, 1]) of ``values``: nearest rank by default, linear
    interpolation between ranks (numpy's default) with ``interpolate``. NaN when empty."""
    s = sorted(float(v) for v in values)
    if not s:
        return float("nan")
    if not interpolate:
        return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None


# ------------------------------------------------------------------------------- reporting


class Progress:
    """Progress lines of a long run, flushed at once (default on stderr, so stdout keeps the
    table). ``timed`` lines start with the seconds since the run began."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self, message: str) -> None:
        print(message, file=self.stream or sys.stderr, flush=True)

    def timed(self, message: str) -> None:
        self.line(f"[{self.elapsed():6.1f}s] {message}")


def description(doc: str | None) -> str:
    """The first paragraph of a module docstring as one line: an ``argparse`` description that is
    never cut mid-sentence."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def format_table(columns: Sequence[tuple[str, int, str]], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of an aligned table: a header, a rule, one line per row. ``columns`` are
    ``(title, width, align)`` with align ``<`` or ``>``; cells are strings (formatted by the caller)
    and are padded to the width, never cut. A column of width 0 and no title widens the gap."""
    def line(cells: Sequence[Any]) -> str:
        return " ".join(f"{str(c):{a}{w}}" if w else "" for c, (_, w, a) in zip(cells, columns))

    head = line([title for title, _, _ in columns])
    return [head, "-" * len(head), *(line(r) for r in rows)]


def print_table(columns: Sequence[tuple[str, int, str]], rows: Iterable[Sequence[Any]],
                stream: TextIO | None = None) -> None:
    for text in format_table(columns, rows):
        print(text, file=stream or sys.stdout)


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if getattr(o, "ndim", 0) and hasattr(o, "tolist"):  # numpy arrays
        return o.tolist()
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str | os.PathLike, result: dict, headline: dict[str, Any]) -> Path:
    """Writes ``result`` with ``headline`` (name -> value of the key same-run ratios) as its
    first key, creating the folder. Returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"headline": dict(headline), **{k: v for k, v in result.items() if k != "headline"}}
    out.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    return out


# ------------------------------------------------------------------------- child processes


class BenchError(RuntimeError):
    """A benchmark step failed (a child exited, stalled or broke the protocol)."""


class Child:
    """A child process in its own session; stdout lines are queued, stderr kept for error
    messages. :meth:`kill` always reaps it (call it in a ``finally``)."""

    def __init__(self, cmd: list[str], name: str, env: dict[str, str] | None = None):
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._pump_out, daemon=True),
                         threading.Thread(target=self._pump_err, daemon=True)]
        for t in self._threads:
            t.start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def stderr_tail(self) -> str:
        lines = [line.rstrip() for line in self.stderr if line.strip()]
        return " | ".join(lines[-4:]) or "(no stderr)"

    def line(self, timeout: float) -> str:
        """The next stdout line; BenchError if none comes within ``timeout`` s or the child exits."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self.name}: no output within {timeout:.0f} s; stderr: {self.stderr_tail()}") from None
        if line is None:
            self.proc.wait(timeout=5)
            for t in self._threads:
                t.join(timeout=5)
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}; stderr: {self.stderr_tail()}")
        return line

    def finish(self, deadline: float) -> list[str]:
        """Waits for exit (until the monotonic deadline); returns the remaining stdout lines."""
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name}: still running after its time limit; stderr: {self.stderr_tail()}") from None
        for t in self._threads:
            t.join(timeout=5)
        if self.proc.returncode != 0:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}; stderr: {self.stderr_tail()}")
        out = []
        while True:
            item = self.lines.get_nowait() if not self.lines.empty() else None
            if item is None:
                return out
            out.append(item)

    def kill(self) -> None:
        """Kills the child (if still running) and reaps it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the group is just this child's
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for t in self._threads:
            t.join(timeout=2)


def child_env() -> dict[str, str]:
    """This process's environment with the folder holding this very jax_garden first on
    PYTHONPATH, so that children import it (e.g. a side-by-side dev build) whatever their cwd
    holds. Not resolved: dev builds are symlinks."""
    import jax_garden

    env = dict(os.environ)
    pkg_parent = str(Path(jax_garden.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *filter(None, [env.get("PYTHONPATH")])])
    return env
