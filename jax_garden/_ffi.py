"""Loads the native extension and registers its XLA FFI targets, once, at import.

The C++ module returns ``{platform: {target_name: capsule}}``; CPU targets are registered
with ``platform="cpu"`` and CUDA targets with ``platform="CUDA"``.
"""

from __future__ import annotations

import jax

from jax_garden import _jax_garden as native

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
