"""The adversarial delivery mode of a TransferEngine, seen from Python (``TransferEngine.adversary``).

The mode (off by default; ``TransferEngine(adversary="seed=7,...")`` or ``JAX_GARDEN_ADVERSARY``)
does on purpose what a reliable but unordered network may legally do and loopback tcp never does:
it holds pieces back before they are posted (bounded random delays; the last piece of a multi-piece
op by a wide margin), holds arrived imms back before they are counted, starts ipc copies late, cuts
the imm deliveries of the ipc/staged paths, reports transmit-completion ops complete while their
pieces are still held (their source bytes copied first) and, with ``reset=P``, resets the connection
of a multi-piece op mid-op (the op fails). It never delivers an imm before its own piece's data,
never loses or duplicates a piece, and never completes a delivery-completion op before its bytes
landed. docs/testing.md lists the settings.

Tests use :meth:`Adversary.hold` to hold chosen pieces (e.g. the last data write of a request) until
:meth:`Adversary.release`, and :meth:`Adversary.stats` / :func:`totals` to assert the mode acted.
"""

from __future__ import annotations

from typing import Any

from jax_garden._jax_garden import fabric as _native
from jax_garden._validate import U32_MAX, check_int

ALL_BITS = U32_MAX


def totals() -> dict:
    """What the mode did in every engine of this process so far (closed engines included):
    ``pieces``, ``held``, ``messages_held``, ``reordered``, ``last_held``, ``tail_held``, ``imms_held``,
    ``imm_splits``, ``copies_delayed``, ``early_completions``, ``resets``, ``targeted``."""
    return dict(_native.adversary_totals())


class Adversary:
    """One engine's adversarial mode: its settings, what it did, and targeted holds."""

    def __init__(self, native_engine: Any):
        self._native = native_engine

    @property
    def spec(self) -> str:
        """The settings in effect, as ``seed=...,hold=...,...``."""
        return self._native.adversary

    def stats(self) -> dict:
        """What this engine's mode did so far (the keys of :func:`totals`)."""
        return dict(self._native.adversary_stats())

    def hold(self, imm: int, *, mask: int = ALL_BITS, skip: int = 0) -> None:
        """Hold back every RMA piece (fabric path) whose imm equals ``imm`` under ``mask`` before it
        is posted, after letting the first ``skip`` such pieces pass, until :meth:`release`. Held
        pieces of an op that fails (its deadline, the engine closing) are dropped as usual."""
        imm = check_int("imm", imm, maximum=U32_MAX)
        mask = check_int("mask", mask, maximum=U32_MAX)
        self._native.adversary_hold(imm & mask, mask, check_int("skip", skip))

    def release(self, imm: int, *, mask: int = ALL_BITS) -> int:
        """End the hold on ``imm``/``mask``: its pieces are posted in the worker's next pass and later
        ones are not held. Returns how many pieces it was holding."""
        imm = check_int("imm", imm, maximum=U32_MAX)
        mask = check_int("mask", mask, maximum=U32_MAX)
        return int(self._native.adversary_release(imm & mask, mask))

    def holding(self, imm: int, *, mask: int = ALL_BITS) -> int:
        """How many pieces the hold on ``imm``/``mask`` holds now."""
        imm = check_int("imm", imm, maximum=U32_MAX)
        mask = check_int("mask", mask, maximum=U32_MAX)
        return int(self._native.adversary_holding(imm & mask, mask))

    def __repr__(self) -> str:
        return f"Adversary({self.spec})"
