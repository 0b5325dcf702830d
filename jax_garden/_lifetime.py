"""Objects still open at interpreter exit are closed, quietly, while Python still runs.

A service object (a KV decode or prefill side, a weights publisher or subscriber) runs daemon threads
and hands Python callables to its engine. Left open at exit (after an uncaught exception, say), its
threads are frozen mid-call when the interpreter finalizes, the frames they hold never let go of the
engine, regions and counters, and nanobind prints its leak report for every one of them. Closing
them from an ``atexit`` handler first stops the threads and drops those references, so the objects
are freed as usual.

Order: service objects first, newest first (they are built on engines and on each other), then the
engines. Errors and log records raised by a close at exit are dropped: the process is ending, and the
caller never asked for the close. A reference that is really leaked (a missing decref) is untouched by
this and still shows up in nanobind's report.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import weakref
from typing import Any, Callable

SERVICE = 0  # closed first: objects built on engines (kv sides, weights publishers and subscribers)
ENGINE = 1   # closed last: TransferEngines

_lock = threading.Lock()
_order = itertools.count()
# key (registration order) -> (group, weak reference, how to close it)
_open: dict[int, tuple[int, "weakref.ref[Any]", Callable[[Any], Any] | None]] = {}
_key_attr = "_jax_garden_exit_key"


def close_at_exit(obj: Any, group: int = SERVICE, how: Callable[[Any], Any] | None = None) -> None:
    """Closes ``obj`` at interpreter exit if it is still alive and open then: ``how(obj)``, by default
    ``obj.close()`` (a service whose close can wait long passes a bounded one). Holds only a weak
    reference; ``obj.close`` calls :func:`closed` to drop the registration."""
    with _lock:
        key = next(_order)
        _open[key] = (group, weakref.ref(obj, lambda _, k=key: _forget(k)), how)
    try:
        object.__setattr__(obj, _key_attr, key)
    except (AttributeError, TypeError):  # no room for the key: the weak entry still goes with obj
        pass


def _forget(key: int) -> None:
    with _lock:
        _open.pop(key, None)


def closed(obj: Any) -> None:
    """``obj`` was closed by its owner: nothing left to do at exit."""
    key = getattr(obj, _key_attr, None)
    if key is not None:
        _forget(key)


def open_objects() -> list[tuple[Any, Callable[[Any], Any] | None]]:
    """(object, how) for every object that would be closed at exit now, in closing order."""
    with _lock:
        entries = sorted(_open.items(), key=lambda e: (e[1][0], -e[0]))
    return [(obj, how) for _, (_, ref, how) in entries if (obj := ref()) is not None]


@atexit.register
def _close_open_objects() -> None:
    objs = open_objects()
    if not objs:
        return
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # a service's threads may log the engine closing under them
    try:
        for obj, how in objs:
            try:
                how(obj) if how is not None else obj.close()
            except BaseException:  # noqa: BLE001 - best effort at exit
                pass
    finally:
        logging.disable(previous)
