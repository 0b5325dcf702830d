"""`import jax_garden` from a checkout's root: with the extension linked into the checkout (what
.ci/setup.sh does) it works; without it, the error says exactly what to run instead of Python's
"partially initialized module ... circular import"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout-like folder: pyproject.toml and a jax_garden/ with this package's Python sources
    (links), but no built extension."""
    import jax_garden

    pkg = Path(jax_garden.__file__).parent
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'jax_garden'\n")
    dst = tmp_path / "jax_garden"
    dst.mkdir()
    for f in pkg.iterdir():
        if f.name.endswith(".py") or f.name == "bench":
            (dst / f.name).symlink_to(f.resolve())
    return tmp_path


def _import_from(root: Path) -> subprocess.CompletedProcess:
    code = "import jax_garden, jax_garden.fabric; print(jax_garden.__file__)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)


def test_import_without_a_built_extension_says_what_to_run(checkout):
    r = _import_from(checkout)
    assert r.returncode != 0
    assert "circular import" not in r.stderr, r.stderr
    assert "native extension (_jax_garden) is not built" in r.stderr, r.stderr
    assert "bash .ci/setup.sh" in r.stderr and "-P" in r.stderr, r.stderr


def test_import_with_the_extension_linked_into_the_checkout(checkout):
    from jax_garden import _jax_garden

    so = Path(_jax_garden.__file__)
    (checkout / "jax_garden" / so.name).symlink_to(so.resolve())
    r = _import_from(checkout)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(checkout / "jax_garden" / "__init__.py")


def test_this_checkout_runs_readme_commands_from_its_root_when_set_up():
    """After `bash .ci/setup.sh` (what CI runs before the tests) the repository itself imports from its
    root, and the README's commands run there without -P; in a developer tree without that link the
    message above is the expected outcome."""
    root = Path(__file__).resolve().parent.parent
    linked = list((root / "jax_garden").glob("_jax_garden*.so"))
    if not linked or not linked[0].exists():
        pytest.skip("the extension is not linked into this checkout (bash .ci/setup.sh does that)")
    r = _import_from(root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(root / "jax_garden" / "__init__.py")
    for cmd in (["-m", "jax_garden.bench", "--help"], ["-m", "jax_garden.bench", "fabric", "--help"],
                ["examples/rl_weight_push.py", "--help"], ["examples/disaggregated_serving.py", "--help"]):
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120, cwd=root)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    assert (root / "jax_garden" / "bin" / "raw_fabric_bench").exists()  # the fabric benchmark's baseline
