"""The kv service of one engine: which DecodeSides (by cache id) and which PrefillSide live on it,
and the routing of KV control messages to them. It stands on the engine's mailbox (one per engine,
shared with every other service there) and lives while a kv side does."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jax_garden import fabric
from jax_garden._service.mailbox import TICK_S, Contact, Envelope, Mailbox, as_contact
from jax_garden._validate import check_timeout
from jax_garden._service.tags import ProtocolId
from jax_garden.kv import protocol as P
from jax_garden.kv.imm import MAX_CACHE_TAGS

log = logging.getLogger("jax_garden.kv")

_attach_lock = threading.Lock()  # attaching and detaching sides, across engines (rare, short)


class KVRouter:
    """Routes the KV protocol of one engine's mailbox (see the module docstring)."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.contact: Contact = mailbox.contact
        self.decode_sides: dict[int, Any] = {}  # cache id -> DecodeSide
        self.prefill: Any = None
        self.closed = False
        # Fence jobs wait for a stream's writes to complete at the sender before FENCED goes out.
        self.fence_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-fence")
        # Users' on_end callbacks, one at a time, never behind a fence job.
        self.callbacks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-callback")
        self._lock = threading.Lock()
        self._period = TICK_S
        mailbox.route(ProtocolId.KV, self._dispatch)
        mailbox.on_tick(self._tick, self._period)

    # -- sides -------------------------------------------------------------------------------------------
    @staticmethod
    def attach_decode(engine: fabric.TransferEngine, side: Any) -> "KVRouter":
        """Register a DecodeSide on ``engine``; sets ``side.cache_tag`` (ValueError past 15 per engine)."""
        with _attach_lock:
            mb = Mailbox.acquire(engine)
            router = mb.service(ProtocolId.KV, KVRouter)
            with router._lock:
                used = {s.cache_tag for s in router.decode_sides.values()}
                free = [t for t in range(MAX_CACHE_TAGS) if t not in used]
                if not free:
                    mb.release()
                    raise ValueError(f"at most {MAX_CACHE_TAGS} DecodeSides per engine")
                side.cache_tag = free[0]
                router.decode_sides[side.cache_id] = side
            router._tick_for(side.liveness_s)
            return router

    @staticmethod
    def attach_prefill(engine: fabric.TransferEngine, side: Any) -> "KVRouter":
        """Register the (one) PrefillSide of ``engine``."""
        with _attach_lock:
            mb = Mailbox.acquire(engine)
            router = mb.service(ProtocolId.KV, KVRouter)
            with router._lock:
                if router.prefill is not None:
                    mb.release()
                    raise ValueError("one PrefillSide per engine")
                router.prefill = side
            router._tick_for(side.liveness_s)
            return router

    def _tick_for(self, liveness_s: float) -> None:
        """Tick at least four times per liveness interval (a dead peer is noticed within it)."""
        period = min(TICK_S, liveness_s / 4)
        if period < self._period:
            self._period = period
            self.mailbox.off_tick(self._tick)
            self.mailbox.on_tick(self._tick, period)

    def detach(self, side: Any) -> None:
        """Unregister ``side``; the last kv side of the engine takes the router down."""
        with _attach_lock:
            with self._lock:
                if self.decode_sides.get(getattr(side, "cache_id", None)) is side:
                    del self.decode_sides[side.cache_id]
                elif self.prefill is side:
                    self.prefill = None
                else:
                    return
                last = not self.decode_sides and self.prefill is None
                if last:
                    self.closed = True
            if last:
                self.mailbox.unroute(ProtocolId.KV)
                self.mailbox.off_tick(self._tick)
                self.mailbox.drop_service(ProtocolId.KV, self)
                self.fence_pool.shutdown(wait=False)
                self.callbacks.shutdown(wait=False)
            self.mailbox.release()

    def rekey(self, side: Any, old_id: int) -> None:
        """A DecodeSide changed its cache id (its cache was re-registered)."""
        with self._lock:
            if self.decode_sides.get(old_id) is side:
                del self.decode_sides[old_id]
            self.decode_sides[side.cache_id] = side

    def sides(self) -> list[Any]:
        with self._lock:
            return [*self.decode_sides.values(), *([self.prefill] if self.prefill else [])]

    # -- messages --------------------------------------------------------------------------------------------
    def send(self, to: Contact, msg: Any) -> None:
        """Send one KV message (PeerDead if the mailbox found ``to`` dead)."""
        self.mailbox.send(to, ProtocolId.KV, P.KV.encode(msg), msg.KIND.name)

    def _dispatch(self, env: Envelope) -> None:
        msg = P.KV.decode(env.message)
        if isinstance(msg, (P.Open, P.Fenced)):
            with self._lock:
                side = self.decode_sides.get(msg.cache_id)
            if side is not None:
                (side._on_open if isinstance(msg, P.Open) else side._on_fenced)(env.sender, msg)
            elif isinstance(msg, P.Open):
                reason = (f"unknown cache id {msg.cache_id:#018x} at this decode side (a ticket from another cache, "
                          "or the cache was closed)")
                self.send(env.sender, P.Reject(msg.cache_id, msg.slot, msg.generation, msg.token, reason))
            return
        pf = self.prefill
        if pf is None:
            log.warning("kv: %s message for a prefill side, none on this engine", msg.KIND.name)
            return
        if isinstance(msg, P.TicketMsg):
            pf._on_ticket(msg)
        elif isinstance(msg, P.Accept):
            pf._on_accept(msg)
        elif isinstance(msg, P.Reject):
            pf._on_reject(msg)
        elif isinstance(msg, P.Cancel):
            pf._on_cancel(env.sender, msg)

    def _tick(self, now: float) -> None:
        for side in self.sides():
            try:
                side._tick(now)
            except Exception:  # noqa: BLE001
                log.exception("kv: heartbeat of %r failed", side)


class UserMessages:
    """Opaque user messages over a side's mailbox (both kv sides): needs ``_router``, ``timeout`` and
    ``_check_open``."""

    def send_message(self, to: Any, payload: bytes) -> None:
        """Opaque bytes to the side (or any mailbox) at contact ``to``: its ``recv_message`` gets them."""
        to = as_contact(to, "send_message: to")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"send_message: payload must be bytes, got {type(payload).__name__}")
        self._check_open("send_message")
        self._router.mailbox.send_user(to, payload)

    def recv_message(self, timeout: float | None = None) -> tuple[Contact | None, bytes]:
        """Next non-kv message that reached this engine: ``(sender contact or None, bytes)``."""
        timeout = check_timeout("timeout", timeout, self.timeout)
        self._check_open("recv_message")
        return self._router.mailbox.recv_user(timeout)
