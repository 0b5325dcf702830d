"""One bootstrap for every service: publish / fetch / barrier, over ``jax.distributed``'s key-value
store (processes of one JAX job) or over functions the caller gives (any other channel).

Keys are namespaced ``jax_garden/<service>/<name>/...`` by the caller; values are bytes (stored
as hex text in the key-value store). Every fetch and barrier has a timeout.
"""

from __future__ import annotations

from typing import Any, Callable

from jax_garden._validate import check_bytes_like, check_float, check_instance


class Bootstrap:
    """Publish / fetch / barrier over a key-value store.

    ``Bootstrap()`` uses ``jax.distributed``'s store (``RuntimeError`` naming the alternative when
    ``jax.distributed.initialize`` was not called). ``Bootstrap(publish=, fetch=, barrier=)`` uses
    the caller's functions: ``publish(key: str, value: bytes)``, ``fetch(key: str, timeout_s: float)
    -> bytes`` (raising ``TimeoutError`` when the key does not come), ``barrier(name: str, timeout_s:
    float)`` (optional)."""

    def __init__(self, *, publish: Callable[[str, bytes], Any] | None = None,
                 fetch: Callable[[str, float], bytes] | None = None,
                 barrier: Callable[[str, float], Any] | None = None):
        if (publish is None) != (fetch is None):
            raise ValueError("Bootstrap: give both publish= and fetch= (or neither, for jax.distributed)")
        for name, fn in (("publish", publish), ("fetch", fetch), ("barrier", barrier)):
            if fn is not None and not callable(fn):
                raise TypeError(f"Bootstrap: {name} must be callable, got {type(fn).__name__}")
        self._publish, self._fetch, self._barrier = publish, fetch, barrier
        self._client = None
        if publish is None:
            from jax_garden._compat import distributed_client

            self._client = distributed_client()
            if self._client is None:
                raise RuntimeError("bootstrap through jax.distributed's key-value store needs "
                                   "jax.distributed.initialize() (all processes in one JAX job); otherwise pass "
                                   "the addresses yourself or give Bootstrap(publish=..., fetch=...)")

    @property
    def kind(self) -> str:
        return "jax.distributed" if self._client is not None else "callable"

    def publish(self, key: str, value: Any) -> None:
        check_instance("key", key, str)
        value = check_bytes_like("value", value)
        if self._client is not None:
            self._client.key_value_set(key, value.hex())
        else:
            self._publish(key, value)

    def fetch(self, key: str, timeout: float) -> bytes:
        """The value published under ``key``, waiting for it up to ``timeout`` seconds
        (``TimeoutError`` naming the key)."""
        check_instance("key", key, str)
        timeout = check_float("timeout", timeout)
        if self._client is None:
            return check_bytes_like(f"value of {key!r}", self._fetch(key, timeout))
        try:
            v = self._client.blocking_key_value_get(key, max(1, int(timeout * 1000)))
        except Exception as e:  # the client raises its own error type on a timeout
            raise TimeoutError(f"bootstrap: {key!r} was not published within {timeout:g} s ({e})") from None
        try:
            return bytes.fromhex(v)
        except (TypeError, ValueError):
            raise ValueError(f"bootstrap: the value under {key!r} is not hex bytes: {str(v)[:40]!r}") from None

    def barrier(self, name: str, timeout: float) -> None:
        """Every participant reaches ``name`` (``TimeoutError`` after ``timeout`` seconds)."""
        check_instance("name", name, str)
        timeout = check_float("timeout", timeout)
        if self._client is not None:
            try:
                self._client.wait_at_barrier(name, max(1, int(timeout * 1000)))
            except Exception as e:  # noqa: BLE001
                raise TimeoutError(f"bootstrap: barrier {name!r} not reached by every process within "
                                   f"{timeout:g} s ({e})") from None
        elif self._barrier is not None:
            self._barrier(name, timeout)
        else:
            raise ValueError("bootstrap: no barrier function was given (Bootstrap(barrier=...))")

    def exchange(self, namespace: str, mine: dict[int, bytes], wanted: list[int], timeout: float) -> dict[int, bytes]:
        """Publish ``mine`` (rank -> bytes) under ``namespace/<rank>`` and fetch the ``wanted`` ranks'."""
        for r, v in mine.items():
            self.publish(f"{namespace}/{r}", v)
        return {r: self.fetch(f"{namespace}/{r}", timeout) for r in wanted}
