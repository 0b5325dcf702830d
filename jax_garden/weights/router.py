"""The weights service of one engine: its (at most one) Publisher and Subscriber, and the routing of
WEIGHTS control messages to them, on the engine's mailbox (shared with every other service there)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from jax_garden import fabric
from jax_garden._service.mailbox import TICK_S, Contact, Envelope, Mailbox
from jax_garden._service.tags import ProtocolId
from jax_garden.weights import protocol as P

log = logging.getLogger("jax_garden.weights")

_attach_lock = threading.Lock()

_TO_SUBSCRIBER = (P.Hello, P.PushRequest, P.PushClaim, P.Status)


class WeightsRouter:
    """Routes the WEIGHTS protocol of one engine's mailbox (see the module docstring)."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.contact: Contact = mailbox.contact
        self.publisher: Any = None
        self.subscriber: Any = None
        self._lock = threading.Lock()
        self._period = TICK_S
        mailbox.route(ProtocolId.WEIGHTS, self._dispatch)
        mailbox.on_tick(self._tick, self._period)

    def tick_for(self, liveness_s: float) -> None:
        """Tick at least four times per liveness interval (a dead peer is noticed within it)."""
        period = min(TICK_S, liveness_s / 4)
        if period < self._period:
            self._period = period
            self.mailbox.off_tick(self._tick)
            self.mailbox.on_tick(self._tick, period)

    @staticmethod
    def attach(engine: fabric.TransferEngine, endpoint: Any, role: str) -> "WeightsRouter":
        """Register a publisher (``role="publisher"``) or subscriber on ``engine``: one of each per engine."""
        with _attach_lock:
            mb = Mailbox.acquire(engine)
            router = mb.service(ProtocolId.WEIGHTS, WeightsRouter)
            with router._lock:
                if getattr(router, role) is not None:
                    mb.release()
                    raise ValueError(f"this engine already carries a weights {role.capitalize()}: one per engine "
                                     "(give each its own engine)")
                setattr(router, role, endpoint)
            return router

    def detach(self, endpoint: Any) -> None:
        with _attach_lock:
            with self._lock:
                if self.publisher is endpoint:
                    self.publisher = None
                elif self.subscriber is endpoint:
                    self.subscriber = None
                else:
                    return
                last = self.publisher is None and self.subscriber is None
            if last:
                self.mailbox.unroute(ProtocolId.WEIGHTS)
                self.mailbox.off_tick(self._tick)
                self.mailbox.drop_service(ProtocolId.WEIGHTS, self)
            self.mailbox.release()

    def send(self, to: Contact, msg: Any) -> None:
        """Send one WEIGHTS message (PeerDead if the mailbox found ``to`` dead)."""
        self.mailbox.send(to, ProtocolId.WEIGHTS, P.WEIGHTS.encode(msg), f"weights {msg.KIND.name}")

    def _dispatch(self, env: Envelope) -> None:
        msg = P.WEIGHTS.decode(env.message)
        target = self.subscriber if isinstance(msg, _TO_SUBSCRIBER) else self.publisher
        if target is None:
            log.warning("weights: %s from %s, but no %s on this engine", msg.KIND.name, env.sender.address,
                        "subscriber" if isinstance(msg, _TO_SUBSCRIBER) else "publisher")
            return
        target._on_message(env.sender, msg)

    def _tick(self, now: float) -> None:
        for endpoint in (self.subscriber, self.publisher):
            if endpoint is not None:
                try:
                    endpoint._tick(now)
                except Exception:  # noqa: BLE001
                    log.exception("weights: tick of %r failed", endpoint)
