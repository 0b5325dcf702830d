"""README.md and docs/ fit a newcomer: README is at most 250 lines, nothing in them points outside the
repository, every link and every file named resolves, the two-process example runs as printed, and
every section of docs/results.md says its command, machine and date."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", md.read_text(), re.M)}


def test_readme_fits_a_screenful_or_five():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.name)
def test_nothing_points_outside_the_repository(md):
    text = md.read_text()
    for bad in ("DESIGN.md", "../shared", "/work/", "issues show"):
        assert bad not in text, (md.name, bad)
    assert not re.search(r"\bissue \d+", text), md.name


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.name)
def test_links_and_named_files_resolve(md):
    text = md.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        assert dest.exists(), (md.name, target)
        if anchor:
            assert anchor in _anchors(dest), (md.name, target, sorted(_anchors(dest)))
    # Files named in backticks: examples/..., .ci/..., docs/..., jax_garden/..., tests/...
    for name in re.findall(r"`((?:examples|\.ci|docs|jax_garden|tests|ffi|cmake)/[\w./-]+)`", text):
        assert (ROOT / name).exists(), (md.name, name)


def test_results_sections_say_command_machine_and_date():
    text = (ROOT / "docs" / "results.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert {s.splitlines()[0] for s in sections} >= {"Tests", "TransferEngine, host memory over tcp",
                                                     "GPU memory in the engine", "MoE dispatch/combine",
                                                     "KV streaming", "Weight push"}
    for s in sections:
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", s), s.splitlines()[0]
        assert re.search(r"`(python -m jax_garden\.bench [^`]+|bash \.ci/[^`]+)`", s), s.splitlines()[0]
        assert re.search(r"CPU VM|H200|H100", s), s.splitlines()[0]


def _example() -> str:
    text = README.read_text()
    section = text.split("## A complete two-process example", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.timeout(180)
def test_the_two_process_example_runs_as_printed(tmp_path):
    (tmp_path / "hello_fabric.py").write_text(_example())
    r = subprocess.run([sys.executable, "-P", "hello_fabric.py"], capture_output=True, text=True, timeout=170,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = re.search(r"It prints `([^`]+)`", README.read_text()).group(1)
    assert r.stdout.strip() == expected
