"""One mailbox per engine over its two-sided control messages, shared by every service on the engine.

A thread blocked in ``engine.recv`` keeps the engine's worker polling at full rate, so nothing waits
in recv while idle: every message is followed by an imm-only write (the doorbell,
``IMM_DOORBELL``) to the receiver's small control region. The reader thread sleeps in the doorbell
counter's ``wait_any`` (woken by the worker that counts the doorbell, with no thread in between),
then takes as many messages as doorbells rang (delivery is unordered, so it waits briefly for a
message its doorbell announced) and whatever else is queued. It also wakes every 0.5 s, so a
message whose doorbell was lost is handled anyway.

Every message travels in an envelope: ``seal("JGMB", u8 version | u8 protocol | u64 mailbox id |
u64 sequence | blob sender contact | body)``. The protocol byte routes it to the one handler a
service registered for it (:class:`~jax_garden._service.tags.ProtocolId`); ``USER`` messages and raw
``engine.send`` traffic (no envelope) go to a queue the application reads (:meth:`Mailbox.recv_user`).
A message whose send or doorbell failed is sent again by the ticker, up to ``SEND_ATTEMPTS`` times
with the same sequence number; the receiver drops a sequence number it already handled.

Liveness is separate from operation timeouts: a :class:`PeerProbe` sends an imm-only write
(``IMM_PING``, never counted) to a peer every ``liveness_s / 4`` while a service depends on it, and
declares the peer dead when a probe fails or stays unanswered for ``liveness_s``. A dead peer is
remembered by the mailbox: nothing more is sent to it (every send to a dead peer makes tcp;ofi_rxm
try to reconnect, and its reject loop can starve connection set-up towards live peers).

Threads: the reader (``jax_garden-mailbox``) runs the services' handlers; the ticker
(``jax_garden-mailbox-tick``) resends, runs the services' tick callbacks every ``tick_s`` and the
timers of :meth:`Mailbox.call_later`. Both stop when the last service releases the mailbox.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import os
import queue
import struct
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from jax_garden import fabric
from jax_garden._service.codec import Reader, Writer, seal, unseal
from jax_garden._service.tags import ProtocolId, Service, imm_tag

log = logging.getLogger("jax_garden.service")

IMM_DOORBELL = (imm_tag(Service.MAILBOX) << 28) | 0x0FFFFFFF  # one per control message
IMM_PING = (imm_tag(Service.MAILBOX) << 28) | 0x0FFFFFFE      # liveness probe; nobody counts it
SEND_ATTEMPTS = 3
DEFAULT_LIVENESS_S = 1.0
TICK_S = 0.25

_ENVELOPE_MAGIC = b"JGMB"
_ENVELOPE_VERSION = 1
_HEADER = struct.Struct("<BBQQ")

# ------------------------------------------------------------------------------------ contacts

_CONTACT_MAGIC = b"JGKC"
_CONTACT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Contact:
    """Where a mailbox listens: its engine address and the descriptor of its control region
    (doorbell imms announce each message). Share ``bytes(contact)``."""

    address: fabric.NetAddress
    descriptor: fabric.MemoryDescriptor

    def __bytes__(self) -> bytes:
        body = Writer().u16(_CONTACT_VERSION).blob(bytes(self.address)).blob(bytes(self.descriptor)).bytes()
        return seal(_CONTACT_MAGIC, body)

    @property
    def key(self) -> bytes:
        return bytes(self.address)

    @staticmethod
    def from_bytes(data: Any) -> "Contact":
        r = Reader(unseal(data, _CONTACT_MAGIC, "contact"), "contact")
        version = r.u16()
        if version != _CONTACT_VERSION:
            raise ValueError(f"contact: version {version}, this build reads {_CONTACT_VERSION}")
        address = fabric.NetAddress.from_bytes(r.blob())
        descriptor = fabric.MemoryDescriptor.from_bytes(r.blob())
        r.end()
        return Contact(address, descriptor)


def as_contact(c: Any, what: str = "contact") -> Contact:
    """A :class:`Contact` from itself, its bytes or their hex string (``TypeError`` otherwise)."""
    if isinstance(c, Contact):
        return c
    if isinstance(c, str):
        try:
            c = bytes.fromhex(c)
        except ValueError:
            raise ValueError(f"{what}: a string must be the hex form of a contact's bytes, got {c[:40]!r}") from None
    if isinstance(c, (bytes, bytearray, memoryview)):
        return Contact.from_bytes(c)
    raise TypeError(f"{what} must be a contact (its bytes, as given by the other side's .contact / .address), "
                    f"got {type(c).__name__}")


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A message as a service handler receives it: who sent it (None for raw engine traffic), for
    which protocol, and the decoded message (bytes for USER)."""

    sender: Contact | None
    protocol: ProtocolId
    message: Any


@dataclasses.dataclass
class Outgoing:
    """A message until both its send and its doorbell completed (sent again on failure)."""

    to: Contact
    name: str
    frame: bytes
    attempts: int = 0
    transfers: list = dataclasses.field(default_factory=list)


class PeerDead(ConnectionError):
    """A send to a peer the mailbox found dead (its message says why)."""


# ------------------------------------------------------------------------------------ the mailbox

_mailboxes: "weakref.WeakKeyDictionary[fabric.TransferEngine, Mailbox]" = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def weak_callback(obj: Any, method: Callable) -> Callable:
    """A callable for the engine (doorbells, watchers) that does not keep ``obj`` alive: the engine
    holds its callbacks in C++, where Python's collector cannot see the cycle."""
    ref = weakref.ref(obj)

    def call(*args: Any) -> None:
        o = ref()
        if o is not None:
            method(o, *args)

    return call


class Mailbox:
    """The control-message mailbox of one engine (see the module docstring). Get it with
    :meth:`acquire`; every ``acquire`` is matched by one :meth:`release`."""

    def __init__(self, engine: fabric.TransferEngine):
        self.engine = engine
        self._ctrl = np.zeros(64, np.uint8)  # the target of doorbells and pings; its bytes are never read
        self._ctrl_region = engine.register(self._ctrl)
        self.contact = Contact(engine.address, self._ctrl_region.descriptor)
        self._contact_bytes = bytes(self.contact)
        self.mailbox_id = int.from_bytes(os.urandom(8), "little")
        self._seq = itertools.count(1)
        self._cv = threading.Condition()
        self._users = 0
        self._stop = False
        self._routes: dict[int, Callable[[Envelope], None]] = {}
        self._services: dict[Any, Any] = {}
        self._ticks: list[tuple[Callable[[float], None], float]] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_ids = itertools.count()
        self._intercept: Callable[[Envelope], bool] | None = None
        self.user_queue: "queue.Queue[tuple[Contact | None, bytes]]" = queue.Queue()
        self._sent: list[Outgoing] = []
        self._dead: dict[bytes, str] = {}
        self._heard: dict[bytes, float] = {}  # sender -> when a message from it last arrived
        # A probe of this very engine, renewed every tick: a peer counts as silent only while this
        # engine answers itself (a stall of this process must not make every peer look dead).
        self._self_ping: Any = None
        self._self_sent = 0.0
        self._self_answered = 0.0  # send time of the last answered self-probe
        self._seen: "OrderedDict[int, OrderedDict[int, None]]" = OrderedDict()  # sender -> recent seqs
        self._bell_counter = engine.imm_counter(IMM_DOORBELL)
        self._tick_event = threading.Event()
        self.tick_s = TICK_S
        self._reader = threading.Thread(target=self._read_loop, name="jax_garden-mailbox", daemon=True)
        self._ticker = threading.Thread(target=self._tick_loop, name="jax_garden-mailbox-tick", daemon=True)
        self._reader.start()
        self._ticker.start()

    # -- lifetime ----------------------------------------------------------------------------------
    @staticmethod
    def acquire(engine: fabric.TransferEngine) -> "Mailbox":
        """The engine's mailbox (started on first use); release it with :meth:`release`."""
        if not isinstance(engine, fabric.TransferEngine):
            raise TypeError(f"engine must be a fabric.TransferEngine, got {type(engine).__name__}")
        if engine.closed:
            raise ValueError("the engine is closed")
        with _mailboxes_lock:
            mb = _mailboxes.get(engine)
            if mb is None or mb._stop:
                mb = _mailboxes[engine] = Mailbox(engine)
            with mb._cv:
                mb._users += 1
            return mb

    def release(self) -> None:
        """One user less; the last one stops the threads."""
        with self._cv:
            self._users -= 1
            last = self._users <= 0
        if last:
            self.stop()

    def service(self, key: Any, make: Callable[["Mailbox"], Any]) -> Any:
        """The per-engine object of a service (its router), made by ``make(self)`` on first use."""
        with self._cv:
            obj = self._services.get(key)
            if obj is None:
                obj = self._services[key] = make(self)
            return obj

    def drop_service(self, key: Any, obj: Any) -> None:
        with self._cv:
            if self._services.get(key) is obj:
                del self._services[key]

    @property
    def closed(self) -> bool:
        return self._stop

    def stop(self) -> None:
        with _mailboxes_lock:
            if _mailboxes.get(self.engine) is self:
                del _mailboxes[self.engine]
        with self._cv:
            if self._stop:
                return
            self._stop = True
            self._cv.notify_all()
        self._tick_event.set()
        if not self.engine.closed:
            try:  # wake the reader now rather than at its next 0.5 s timeout
                self.engine.write_imm(self._ctrl_region.descriptor, IMM_DOORBELL)
            except Exception:  # noqa: BLE001 - the engine is closing: the reader stops by itself
                pass
        for t in (self._reader, self._ticker):
            if t is not threading.current_thread():
                t.join(timeout=5)

    # -- services ------------------------------------------------------------------------------------
    def route(self, protocol: ProtocolId, handler: Callable[[Envelope], None]) -> None:
        """Messages of ``protocol`` go to ``handler`` (on the reader thread). One handler per protocol."""
        with self._cv:
            if protocol in self._routes and self._routes[protocol] is not handler:
                raise ValueError(f"protocol {protocol.name} already has a handler on this engine")
            self._routes[int(protocol)] = handler

    def unroute(self, protocol: ProtocolId) -> None:
        with self._cv:
            self._routes.pop(int(protocol), None)

    def on_tick(self, fn: Callable[[float], None], period: float = TICK_S) -> None:
        """Call ``fn(now)`` on the ticker at least every ``period`` seconds (the ticker runs at the
        shortest period any service asked for; every tick callback runs on every tick)."""
        with self._cv:
            self._ticks.append((fn, float(period)))
            self.tick_s = min(p for _, p in self._ticks)
        self._tick_event.set()

    def off_tick(self, fn: Callable[[float], None]) -> None:
        with self._cv:
            self._ticks = [(f, p) for f, p in self._ticks if f != fn]
            self.tick_s = min((p for _, p in self._ticks), default=TICK_S)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the ticker ``delay`` seconds from now (a timer of a service)."""
        with self._cv:
            heapq.heappush(self._timers, (time.monotonic() + max(0.0, delay), next(self._timer_ids), fn))
        self._tick_event.set()

    def intercept(self, fn: Callable[[Envelope], bool] | None) -> None:
        """Fault injection for tests: ``fn(envelope)`` runs on the reader thread before routing; when it
        returns True the message is not routed (the test may :meth:`deliver` it later). None removes it."""
        self._intercept = fn

    def deliver(self, env: Envelope) -> None:
        """Route ``env`` as if it had just arrived (after :meth:`intercept` held it)."""
        self._route(env)

    # -- sending -------------------------------------------------------------------------------------
    def send(self, to: Contact, protocol: ProtocolId, body: bytes, name: str = "") -> None:
        """Send one message (``body`` as the protocol encoded it) and ring the receiver's doorbell (not
        waited for). A failed send or doorbell is sent again by the ticker, up to SEND_ATTEMPTS times.
        ``PeerDead`` when the mailbox found ``to`` dead; ``ValueError`` when the message exceeds the
        engine's control-message limit."""
        name = name or protocol.name
        frame = seal(_ENVELOPE_MAGIC, _HEADER.pack(_ENVELOPE_VERSION, int(protocol), self.mailbox_id, next(self._seq))
                     + Writer().blob(self._contact_bytes).bytes() + body)
        limit = self.engine._native.max_message_bytes - 64
        if len(frame) > limit:
            raise ValueError(f"{name} message of {len(frame)} bytes exceeds the engine's control-message limit "
                             f"({limit + 64}); create the engines with a larger max_message_bytes")
        why = self._dead.get(to.key)
        if why is not None:
            raise PeerDead(f"{name} not sent: {to.address} is unreachable ({why})")
        out = Outgoing(to, name, frame)
        self.post(out)
        with self._cv:
            self._sent.append(out)

    def post(self, out: Outgoing) -> None:
        """Post one attempt of ``out``: its send and its doorbell."""
        out.attempts += 1
        out.transfers = [self.engine.send(out.to.address, out.frame),
                         self.engine.write_imm(out.to.descriptor, IMM_DOORBELL)]

    def send_user(self, to: Any, payload: Any) -> None:
        """Opaque bytes to the mailbox at ``to``; they arrive at its :meth:`recv_user`."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"send_message: payload must be bytes, got {type(payload).__name__}")
        self.send(as_contact(to), ProtocolId.USER, bytes(payload), "USER")

    def recv_user(self, timeout: float) -> tuple[Contact | None, bytes]:
        """Next USER message or raw ``engine.send`` payload: ``(sender contact or None, bytes)``."""
        try:
            return self.user_queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"recv_message: no message within {timeout} s") from None

    # -- liveness ------------------------------------------------------------------------------------
    def ping(self, to: Contact) -> Any:
        return self.engine.write_imm(to.descriptor, IMM_PING)

    def mark_dead(self, to: Contact, why: str) -> None:
        with self._cv:
            self._dead[to.key] = why
            while len(self._dead) > 4096:
                self._dead.pop(next(iter(self._dead)))

    def is_dead(self, to: Contact) -> str | None:
        return self._dead.get(to.key)

    def answered_itself_since(self, t: float) -> bool:
        """Whether this engine answered a probe of itself sent at or after ``t``."""
        return self._self_answered >= t

    def _probe_self(self, now: float) -> None:
        p = self._self_ping
        if p is not None:
            if not p.done:
                return
            if not p.failed:
                self._self_answered = self._self_sent
        try:
            self._self_ping = self.engine.write_imm(self._ctrl_region.descriptor, IMM_PING)
            self._self_sent = now
        except Exception:  # noqa: BLE001 - the engine is closing
            self._self_ping = None

    def heard_at(self, peer: Contact) -> float:
        """When a message from ``peer`` last arrived (0.0: never)."""
        return self._heard.get(peer.key, 0.0)

    # -- the reader ----------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        # Each doorbell announces one message, which may arrive just after it (unordered delivery):
        # wait briefly for as many messages as new doorbells, then take whatever else is there. A
        # message whose doorbell was lost, or that came late, is taken by the next wake (at most
        # 0.5 s later). Nothing blocks in recv for long, so the engine's worker is not kept busy.
        eng = self.engine
        while True:
            if self._stop or eng.closed:
                self._stop = True
                return
            try:
                announced = self._bell_counter.wait_any(0.5)
            except fabric.TransferError:
                self._stop = True
                return  # engine closed
            if self._stop:
                return
            while True:
                try:
                    sender, data = eng.recv_message(timeout=0.05 if announced > 0 else 0.0)
                except TimeoutError:
                    break
                except fabric.TransferError:
                    return  # engine closed
                except Exception:  # noqa: BLE001
                    log.exception("mailbox: control recv failed")
                    break
                announced -= 1
                try:
                    self._receive(data)
                except Exception:  # noqa: BLE001 - a bad message must not stop the reader
                    log.exception("mailbox: control message from %s dropped", sender)

    def _first_time(self, mailbox_id: int, seq: int) -> bool:
        """False for a message already handled (a resend of one whose completion was lost)."""
        seqs = self._seen.get(mailbox_id)
        if seqs is None:
            seqs = self._seen[mailbox_id] = OrderedDict()
            while len(self._seen) > 4096:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(mailbox_id)
        if seq in seqs:
            return False
        seqs[seq] = None
        while len(seqs) > 4096:
            seqs.popitem(last=False)
        return True

    def _receive(self, data: bytes) -> None:
        if not data.startswith(_ENVELOPE_MAGIC):
            self.user_queue.put((None, data))  # raw engine.send traffic
            return
        raw = unseal(data, _ENVELOPE_MAGIC, "mailbox message")
        if len(raw) < _HEADER.size or raw[0] != _ENVELOPE_VERSION:
            raise ValueError(f"mailbox message: version {raw[0] if raw else None}, this build speaks "
                             f"{_ENVELOPE_VERSION}")
        _, protocol, mailbox_id, seq = _HEADER.unpack_from(raw)
        r = Reader(raw[_HEADER.size:], "mailbox message")
        sender = Contact.from_bytes(r.blob())
        body = bytes(raw[_HEADER.size + r.pos:])
        self._heard[sender.key] = time.monotonic()
        if len(self._heard) > 4096:
            self._heard.pop(next(iter(self._heard)))
        if not self._first_time(mailbox_id, seq):
            return
        try:
            protocol = ProtocolId(protocol)
        except ValueError:
            log.warning("mailbox: message of unknown protocol %d from %s dropped", protocol, sender.address)
            return
        env = Envelope(sender, protocol, body)
        if self._intercept is not None and self._intercept(env):
            return
        self._route(env)

    def _route(self, env: Envelope) -> None:
        if env.protocol is ProtocolId.USER:
            self.user_queue.put((env.sender, env.message))
            return
        with self._cv:
            handler = self._routes.get(int(env.protocol))
        if handler is None:
            log.warning("mailbox: %s message from %s, but no %s service on this engine", env.protocol.name,
                        env.sender.address if env.sender else None, env.protocol.name)
            return
        handler(env)

    # -- the ticker ----------------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        self._last_tick = time.monotonic()
        next_tick = self._last_tick + self.tick_s
        while not self._stop:
            with self._cv:
                next_tick = min(next_tick, self._last_tick + self.tick_s)  # a shorter period was asked for
                wake = min(next_tick, self._timers[0][0]) if self._timers else next_tick
            self._tick_event.wait(max(0.0, wake - time.monotonic()))
            self._tick_event.clear()
            if self._stop:
                return
            if self.engine.closed:
                with self._cv:
                    self._stop = True
                    self._cv.notify_all()
                return
            now = time.monotonic()
            due = []
            with self._cv:
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
            for fn in due:
                try:
                    fn()
                except Exception:  # noqa: BLE001
                    log.exception("mailbox: timer failed")
            if now < next_tick:
                continue
            next_tick = now + self.tick_s
            self._last_tick = now
            self._probe_self(now)
            self._resend()
            with self._cv:
                ticks = [f for f, _ in self._ticks]
            for fn in ticks:
                try:
                    fn(now)
                except Exception:  # noqa: BLE001
                    log.exception("mailbox: tick of a service failed")

    def _resend(self) -> None:
        with self._cv:
            sent, self._sent = self._sent, []
        keep = []
        for out in sent:
            if not all(t.done for t in out.transfers):
                keep.append(out)
                continue
            failed = [t for t in out.transfers if t.failed]
            if not failed:
                continue
            if out.attempts < SEND_ATTEMPTS and not self.engine.closed and out.to.key not in self._dead:
                log.info("mailbox: %s to %s failed (%s); sending it again", out.name, out.to.address, failed[0].error)
                try:
                    self.post(out)
                    keep.append(out)
                except Exception as e:  # noqa: BLE001
                    log.info("mailbox: %s could not be sent again: %s", out.name, e)
            else:
                log.info("mailbox: %s to %s failed %d times: %s", out.name, out.to.address, out.attempts,
                         failed[0].error)
        with self._cv:
            self._sent = keep + self._sent

    def __repr__(self) -> str:
        return f"Mailbox({self.engine!r}, {self._users} user(s){', stopped' if self._stop else ''})"


class PeerProbe:
    """Liveness of one remote mailbox, probed with imm-only writes while something depends on it.

    :meth:`check` (called from a tick, at least every ``liveness_s / 4``) sends a new probe as soon as
    the previous one was answered. The peer is dead once a probe failed (the mailbox then remembers
    it: nothing more is sent to it) or, with ``liveness_s`` set, once a probe stayed unanswered for
    ``liveness_s`` seconds while nothing else was heard from the peer and this engine kept answering
    a probe of itself (a live engine answers an imm-only write within milliseconds, whatever its
    process computes: its progress thread is not Python's; but a probe queued behind a backlog of
    data may wait, so data arriving from the peer (:meth:`heard`), writes to it completing, or a
    message from it count as signs of life too; and a stall of this process must not make its peers
    look dead). The engine's own timeout is much longer. A silent peer fails what depends on it but
    is not remembered: it may answer again."""

    def __init__(self, contact: Contact, liveness_s: float | None = None):
        self.contact = contact
        self.liveness_s = liveness_s
        self._ping: Any = None
        self._sent_at = 0.0
        self._heard_at = 0.0
        self.dead: str | None = None

    def heard(self, when: float | None = None) -> None:
        """A sign of life from the peer other than a probe's answer (data from it arrived, a write to
        it completed)."""
        self._heard_at = max(self._heard_at, time.monotonic() if when is None else when)

    def check(self, mailbox: Mailbox, now: float | None = None) -> str | None:
        """Why the peer is dead (once found), else None."""
        if self.dead:
            return self.dead
        self.dead = mailbox.is_dead(self.contact)
        if self.dead:
            return self.dead
        now = time.monotonic() if now is None else now
        p = self._ping
        failed = None
        if p is not None:
            if p.done:
                if p.failed:
                    failed = f"liveness probe failed: {p.error or 'unknown error'}"
                p = self._ping = None
            elif self.liveness_s is not None:
                quiet_since = max(self._sent_at, self._heard_at, mailbox.heard_at(self.contact))
                # Silent: nothing from the peer for liveness_s while this engine kept answering itself.
                if now - quiet_since > self.liveness_s and mailbox.answered_itself_since(quiet_since):
                    self.dead = (f"no answer to a liveness probe for {now - self._sent_at:.2f} s and nothing else "
                                 f"heard from it for {now - quiet_since:.2f} s (liveness_s={self.liveness_s:g})")
                    return self.dead
        if p is None and failed is None:
            try:
                self._ping = mailbox.ping(self.contact)
                self._sent_at = now
            except Exception as e:  # noqa: BLE001
                failed = f"liveness probe could not be posted: {e}"
        if failed:
            self.dead = failed
            mailbox.mark_dead(self.contact, failed)
        return self.dead
