"""Argument checks shared by every public module, following jax's convention: a wrong *type*
raises ``TypeError``, a wrong *value* (range, shape, choice) raises ``ValueError``. Messages name
the argument and the value that was wrong."""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import numpy as np

U32_MAX = (1 << 32) - 1
U64_LIMIT = 1 << 64


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(name: str, value: Any, *, minimum: int | None = 0, maximum: int | None = U64_LIMIT - 1) -> int:
    """An integer (Python or NumPy, never bool) in ``[minimum, maximum]`` (either bound may be None)."""
    if type(value) is int:  # fast path: the hot ops check several of these
        if (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
            return value
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {_type_name(value)} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        if maximum in (U64_LIMIT - 1, U32_MAX):
            raise ValueError(f"{name} must fit in {64 if maximum > U32_MAX else 32} bits (0..{maximum}), got {value}")
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_positive_int(name: str, value: Any, *, maximum: int | None = U64_LIMIT - 1) -> int:
    return check_int(name, value, minimum=1, maximum=maximum)


def check_float(name: str, value: Any, *, positive: bool = True, allow_zero: bool = False) -> float:
    """A real number (int or float, never bool); finite and > 0 when ``positive`` (>= 0 with
    ``allow_zero``: a timeout of 0 polls)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {_type_name(value)} {value!r}")
    value = float(value)
    if positive and not ((0 <= value if allow_zero else 0 < value) and value < float("inf")):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of ``choices`` (TypeError when the type matches none of them)."""
    choices = tuple(choices)
    if value in choices:
        return value
    if not any(isinstance(value, type(c)) for c in choices):
        raise TypeError(f"{name} must be one of {choices!r}, got {_type_name(value)} {value!r}")
    raise ValueError(f"{name} must be one of {choices!r}, got {value!r}")


def check_instance(name: str, value: Any, cls: type | tuple[type, ...], what: str | None = None) -> Any:
    if not isinstance(value, cls):
        expected = what or (cls.__name__ if isinstance(cls, type) else " or ".join(c.__name__ for c in cls))
        raise TypeError(f"{name} must be {expected}, got {_type_name(value)}")
    return value


def check_bytes_like(name: str, value: Any) -> bytes:
    """bytes, bytearray, memoryview or any object with the buffer protocol, as bytes."""
    if isinstance(value, bytes):
        return value
    try:
        return bytes(memoryview(value))
    except TypeError:
        raise TypeError(f"{name} must be bytes-like (bytes, bytearray, memoryview), got {_type_name(value)}") from None


def check_timeout(name: str, value: Any, default: float | None = None) -> float:
    """The one timeout rule of every call that waits: ``None`` means ``default`` (the object's own
    timeout); otherwise a finite number of seconds >= 0, where 0 checks once without blocking. Not a
    number (or a bool) -> ``TypeError``; negative, NaN or infinite -> ``ValueError`` (every wait ends)."""
    if value is None:
        if default is None:
            raise TypeError(f"{name} must be a number of seconds, got None")
        return float(default)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number of seconds (or None for the default), got "
                        f"{_type_name(value)} {value!r}")
    value = float(value)
    if not 0.0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number of seconds >= 0 (0: check once without waiting), "
                         f"got {value}")
    return value


def has_repeats(arr: np.ndarray) -> bool:
    """Whether a 1-D array holds some value twice. Sorts and compares neighbours: np.unique hashes,
    about 7x slower on the few hundred page indices of a KV ticket, which is checked on every receive."""
    if arr.size < 2:
        return False
    ordered = np.sort(arr)
    return bool((ordered[1:] == ordered[:-1]).any())


def check_int_array(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
                    distinct: bool = False) -> np.ndarray:
    """A 1-D sequence of integers (as int64): ``TypeError`` when it is not one, ``ValueError`` for an
    element outside ``[minimum, maximum]`` or (``distinct``) a repeated one."""
    if isinstance(value, (str, bytes, bytearray, memoryview)) or np.isscalar(value):
        raise TypeError(f"{name} must be a 1-D sequence of ints, got {_type_name(value)} {value!r}")
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - ragged or odd objects
        raise TypeError(f"{name} must be a 1-D sequence of ints, got {_type_name(value)}") from None
    if arr.ndim != 1:
        raise TypeError(f"{name} must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must hold ints, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if minimum is not None and lo < minimum:
            raise ValueError(f"{name}: {lo} is out of range {minimum}..{maximum if maximum is not None else ''}")
        if maximum is not None and hi > maximum:
            raise ValueError(f"{name}: {hi} is out of range {minimum if minimum is not None else ''}..{maximum}")
        if distinct and has_repeats(arr):
            vals, counts = np.unique(arr, return_counts=True)
            raise ValueError(f"{name}: {int(vals[counts > 1][0])} appears twice")
    return arr


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)} {value!r}")
    return bool(value)
