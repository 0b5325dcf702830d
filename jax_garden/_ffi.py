"""Loads the native extension and registers its XLA FFI targets, once, at import.

The C++ module returns ``{platform: {target_name: capsule}}``; CPU targets are registered
with ``platform="cpu"`` and CUDA targets with ``platform="CUDA"``.
"""

from __future__ import annotations

import os

import jax


def _missing_extension_message(package_dir: str, error: ImportError) -> str:
    """What to run when this copy of jax_garden has no built extension: most often a source
    checkout that shadows the installed package (Python puts the current directory, or a script's
    directory, first on sys.path)."""
    in_checkout = os.path.exists(os.path.join(os.path.dirname(package_dir), "pyproject.toml"))
    built = [f for f in os.listdir(package_dir) if f.startswith("_jax_garden") and f.endswith(".so")]
    if built:  # there, but it does not load (a dangling link, a mismatched build): say why
        lines = [f"jax_garden's native extension in {package_dir} does not load: {error}"]
    else:  # Python's own message ("partially initialized module ... circular import") misleads here
        lines = [f"jax_garden's native extension (_jax_garden) is not built in {package_dir}."]
    if in_checkout:
        root = os.path.dirname(package_dir)
        lines += [
            "This is the source tree of a checkout, which Python found before any installed jax_garden",
            "(the current directory or a script's directory comes first on sys.path). Either:",
            f"  * build it into the checkout once:  cd {root} && bash .ci/setup.sh",
            "    (a venv in .venv with the package installed, and the extension linked into the checkout),",
            "  * or use an installed jax_garden: start Python with -P (python -P -m ..., python -P script.py)",
            "    or from another directory; install with  pip install --no-build-isolation .  from the checkout.",
        ]
    else:
        lines.append("Reinstall the package: pip install --no-build-isolation <checkout of jax_garden>.")
    return "\n".join(lines)


try:
    from jax_garden import _jax_garden as native
except ImportError as e:
    if getattr(e, "name", None) not in ("jax_garden._jax_garden", "jax_garden") and "_jax_garden" not in str(e):
        raise
    raise ImportError(_missing_extension_message(os.path.dirname(os.path.abspath(__file__)), e)) from None

_registered: dict[str, list[str]] = {}


def _register_all() -> None:
    for platform, targets in native.ffi_targets().items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
            _registered.setdefault(platform, []).append(name)


def registered_targets() -> dict[str, list[str]]:
    """Names of the FFI targets registered at import, by platform."""
    return {k: list(v) for k, v in _registered.items()}


def built_with_cuda() -> bool:
    return bool(native.built_with_cuda)


_register_all()
