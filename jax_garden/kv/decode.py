"""The decode end of KV streaming: requests (pages + ticket + state) and the DecodeSide that reserves
them, answers the prefill side's stream openings and counts arrivals. The protocol decisions are the
pure transitions of :mod:`jax_garden.kv.state`; this module carries out their effects."""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
import zlib
from typing import Any

import numpy as np

from jax_garden import _lifetime, fabric
from jax_garden._service.mailbox import DEFAULT_LIVENESS_S, Contact, PeerProbe, as_contact
from jax_garden._validate import check_float, check_int, check_int_array, check_timeout
from jax_garden.kv import protocol as P
from jax_garden.kv import state as sm
from jax_garden.kv.cache import PagedKVCache
from jax_garden.kv.errors import OutOfPages
from jax_garden.kv.imm import KIND_DATA, KIND_PAYLOAD, MAX_SLOTS, kv_imm
from jax_garden.kv.layout import KVLayout
from jax_garden.kv.plan import plan_imm_writes, plan_writes
from jax_garden.kv.router import KVRouter, UserMessages
from jax_garden.kv.state import State
from jax_garden.kv.ticket import Ticket, as_ticket

log = logging.getLogger("jax_garden.kv")

PAYLOAD_MAGIC = 0x4B56504C  # "KVPL"
PAYLOAD_HEADER = 16          # magic, generation, length, crc32 (u32 each)


class Request:
    """One reservation on a :class:`DecodeSide`: its pages, its ticket and its state."""

    def __init__(self, side: "DecodeSide", slot: int, generation: int, pages: np.ndarray, num_tokens: int,
                 deadline: float):
        eng = side.cache.engine
        self._side = side
        self.slot, self.generation, self.num_tokens = slot, generation, num_tokens
        self._pages = pages
        self.deadline = deadline
        self.imm_data = kv_imm(side.cache_tag, slot, generation, KIND_DATA)
        self.imm_payload = kv_imm(side.cache_tag, slot, generation, KIND_PAYLOAD)
        self._counters = (eng.imm_counter(self.imm_data), eng.imm_counter(self.imm_payload))
        self._p = sm.Progress(deadline=deadline)   # the protocol state (replaced under the side's lock)
        self._owner: PeerProbe | None = None       # liveness of the prefill side that opened the stream
        self._waiter = False                       # a thread is taking credits outside the lock
        self._seen_total = 0                       # arrivals on both counters at the last tick
        self._payload: bytes | None = None
        self._released = False
        self.times: dict[str, float] = {"reserved": time.monotonic()}
        ticket = Ticket(side.cache_id, side.cache_tag, slot, generation, num_tokens, side.payload_bytes,
                        side.cache.layout, side.cache.num_shards, side.contact, pages)
        self.ticket: bytes = bytes(ticket)

    @property
    def pages(self) -> np.ndarray:
        """Destination page ids (uint32), in token order."""
        return self._pages.copy()

    @property
    def state(self) -> State:
        return self._p.state

    @property
    def reason(self) -> str:
        """Why the request FAILED or was CANCELLED ('' otherwise)."""
        return self._p.reason

    @property
    def quarantined(self) -> bool:
        """The request ended with writes unaccounted for: its pages were held for ``quarantine_s``."""
        return self._p.quarantined

    @property
    def payload(self) -> bytes:
        """The bytes the prefill side passed to ``finish`` (READY only)."""
        p = self._p
        if p.state is not State.READY:
            raise RuntimeError(f"payload: the request is {p.state.value}{': ' + p.reason if p.reason else ''}")
        return self._payload  # type: ignore[return-value]

    def poll(self) -> State:
        """Take whatever arrived (never blocks) and return the state."""
        with self._side._cond:
            self._side._advance(self)
            return self._p.state

    def wait(self, timeout: float | None = None) -> State:
        """Block until the request is READY, FAILED or CANCELLED and return that state. Raises
        TimeoutError if it is still PENDING after ``timeout`` (default: the side's timeout); the
        request itself keeps its own deadline (``reserve(timeout=)``)."""
        side = self._side
        timeout = check_timeout("timeout", timeout, side.timeout)
        deadline = time.monotonic() + timeout
        while True:
            with side._cond:
                side._advance(self)
                p = self._p
                if p.state is not State.PENDING:
                    return p.state
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError(f"kv request slot {self.slot} gen {self.generation}: still PENDING after "
                                       f"{timeout} s ({p.describe()})")
                kind = need = None
                if p.expected is not None and p.ending is None and not self._waiter:
                    # Block on the engine counter (its worker then polls at full rate) only once
                    # everything but the last two layers has arrived; until then check every millisecond,
                    # which leaves the CPU to the transfer and to the prefill on small machines.
                    exp_d = p.expected[KIND_DATA]
                    last_layer = 2 * exp_d // side.cache.layout.num_layers
                    if p.taken[KIND_DATA] + self._counters[KIND_DATA].credits >= exp_d - last_layer:
                        for k in (KIND_DATA, KIND_PAYLOAD):
                            if p.taken[k] < p.expected[k]:
                                kind, need = k, p.expected[k] - p.taken[k]
                                break
                if kind is None:
                    side._cond.wait(min(deadline - now, 0.001 if p.expected is not None else 0.05))
                    continue
                self._waiter = True
            got = 0
            try:
                self._counters[kind].wait(need, min(max(deadline - time.monotonic(), 0.0), 0.05) or 1e-3)
                got = need
            except TimeoutError:
                pass
            except fabric.TransferError as e:  # the engine closed
                with side._cond:
                    self._waiter = False
                    side._step(self, sm.finish(self._p, State.FAILED, f"engine error while waiting: {e}", clean=False))
                    return self._p.state
            finally:
                with side._cond:
                    if self._waiter:
                        self._waiter = False
                        self._p = sm.counted(self._p, kind, got)
                        side._cond.notify_all()

    def cancel(self, timeout: float | None = None) -> State:
        """Stop the request. Returns once the prefill side confirmed (fenced) that nothing more will
        land and every write it posted was counted here; only then are the pages reused. Returns the
        final state: CANCELLED, or READY/FAILED if the request had already ended. If the fence is not
        confirmed within ``timeout`` (default: the side's fence timeout) the request becomes FAILED
        and its pages are quarantined."""
        side = self._side
        timeout = check_timeout("timeout", timeout, side.fence_timeout)
        with side._cond:
            side._step(self, sm.begin_end(self._p, State.CANCELLED, "cancelled by the decode side", time.monotonic(),
                                          timeout))
        deadline = time.monotonic() + timeout + 1.0
        while True:
            with side._cond:
                side._advance(self)
                p = self._p
                if p.state is not State.PENDING:
                    return p.state
                now = time.monotonic()
                if now >= deadline:  # advance enforces the end deadline; this is a backstop
                    side._step(self, sm.quarantine(p, State.FAILED, "cancel not confirmed in time"))
                    return self._p.state
                if p.fence is None or self._waiter:
                    side._cond.wait(min(deadline - now, 0.02))
                    continue
                kind = need = None
                for k in (KIND_DATA, KIND_PAYLOAD):
                    if p.taken[k] < p.fence.posted[k]:
                        kind, need = k, p.fence.posted[k] - p.taken[k]
                        break
                if kind is None:
                    continue
                self._waiter = True
            got = 0
            try:
                self._counters[kind].wait(need, 0.02)
                got = need
            except (TimeoutError, fabric.TransferError):
                pass
            finally:
                with side._cond:
                    self._waiter = False
                    self._p = sm.counted(self._p, kind, got)
                    side._cond.notify_all()

    def release(self) -> None:
        """Give the pages back to the allocator (READY requests, once the sequence is done; requests
        that ended otherwise release theirs themselves)."""
        with self._side._cond:
            if self._p.state is State.PENDING:
                raise RuntimeError("release: the request is still PENDING (cancel it first)")
            if self._p.state is State.READY and not self._released:
                self._released = True
                self._side.cache.allocator.free(self._pages)

    def progress(self) -> dict:
        """Where the request stands: whether a prefill stream opened, writes expected and arrived so
        far (data and payload; arrivals counted here, not yet taken, included)."""
        with self._side._cond:
            p = self._p
            exp = p.expected
            return {"state": p.state.value, "opened": p.opened,
                    "expected_data": exp[0] if exp else None, "expected_payload": exp[1] if exp else None,
                    "arrived_data": p.taken[0] + max(self._counters[0].credits, 0),
                    "arrived_payload": p.taken[1] + max(self._counters[1].credits, 0)}

    def __repr__(self) -> str:
        p = self._p
        return (f"Request(slot={self.slot}, gen={self.generation}, {self.num_tokens} tokens, {self._pages.size} pages, "
                f"{p.state.value}{': ' + p.reason if p.reason else ''})")


class DecodeSide(UserMessages):
    """The decode end: reserves pages of ``cache`` for requests, issues tickets, answers the prefill
    side's stream openings and counts arrivals.

    Args:
      cache: the destination :class:`PagedKVCache` (its engine carries everything).
      max_requests: request slots (concurrent requests), at most 4095.
      payload_bytes: capacity of the per-request payload (``Stream.finish(payload)``).
      timeout: default request deadline (``reserve``) and ``wait`` timeout, seconds.
      fence_timeout: how long a cancel waits for the prefill side's fence (default
        ``2 * engine.timeout + 1``); past it the request FAILS and its pages are quarantined.
      quarantine_s: how long pages of a request whose writes could not be accounted for (its prefill
        peer died or never fenced) are kept out of use (default ``engine.timeout``).
      liveness_s: a prefill side that opened a stream here and answers no liveness probe for this long
        is dead: its requests FAIL naming it (pages quarantined). Separate from operation timeouts.
    """

    def __init__(self, cache: PagedKVCache, *, max_requests: int = 256, payload_bytes: int = 4096,
                 timeout: float = 30.0, fence_timeout: float | None = None, quarantine_s: float | None = None,
                 liveness_s: float = DEFAULT_LIVENESS_S):
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a kv.PagedKVCache, got {type(cache).__name__}")
        max_requests = check_int("max_requests", max_requests, minimum=1, maximum=MAX_SLOTS - 1)
        payload_bytes = check_int("payload_bytes", payload_bytes, minimum=1, maximum=1 << 20)
        eng = cache.engine
        self.timeout = check_float("timeout", timeout)
        self.fence_timeout = check_float("fence_timeout", fence_timeout if fence_timeout is not None
                                         else 2 * eng.timeout + 1.0)
        self.quarantine_s = check_float("quarantine_s", quarantine_s if quarantine_s is not None else eng.timeout,
                                        allow_zero=True)
        self.liveness_s = check_float("liveness_s", liveness_s)
        cache._check_usable()
        self.cache = cache
        self.payload_bytes = payload_bytes
        self.slot_bytes = -(-(payload_bytes + PAYLOAD_HEADER) // 64) * 64
        self.max_requests = max_requests
        self.cache_id = int.from_bytes(os.urandom(8), "little")
        self._payload_buf = np.zeros(max_requests * self.slot_bytes, np.uint8)
        self._payload_region = eng.register(self._payload_buf)
        self._set_descriptors()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._slots: list[Request | None] = [None] * max_requests
        self._gens = [0] * max_requests
        self._free_slots = list(range(max_requests))
        heapq.heapify(self._free_slots)
        self._held: list[tuple[float, Request]] = []  # quarantined requests and when they are released
        self._peers: dict[bytes, PeerProbe] = {}
        self._closed = False
        self.counts = {"reserved": 0, "ready": 0, "cancelled": 0, "failed": 0, "quarantined": 0, "rejected_opens": 0}
        self.cache_tag = -1
        self._router = KVRouter.attach_decode(eng, self)  # sets cache_tag
        self.contact: Contact = self._router.contact
        cache._listeners.add(self)
        _lifetime.close_at_exit(self, how=lambda side: side.close(timeout=1.0))  # no long fences at exit

    def _set_descriptors(self) -> None:
        """The descriptors an ACCEPT carries: every cache buffer, then the payload region."""
        self._descriptors = tuple(self.cache.descriptors() + [bytes(self._payload_region.descriptor)])
        size = 4 + sum(4 + len(d) for d in self._descriptors)
        limit = self.cache.engine._native.max_message_bytes - 1024
        if size > limit:
            raise ValueError(f"the cache's {len(self._descriptors)} buffer descriptors take {size} bytes, more "
                             f"than one control message carries ({limit}); create the engine with a larger "
                             "max_message_bytes")

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what}: the DecodeSide is closed")

    # -- public -----------------------------------------------------------------------------------------
    def reserve(self, num_tokens: int, *, timeout: float | None = None, pages: Any = None) -> Request:
        """Reserve pages for ``num_tokens`` tokens and a request slot; returns the :class:`Request`
        (``req.ticket`` is what the prefill side needs). The request FAILS if it is not READY within
        ``timeout`` (default: the side's timeout). ``pages``: the page ids to use, in token order
        (``ceil(num_tokens / page_tokens)`` of them, all free), instead of letting the allocator choose.
        Raises OutOfPages when pages or slots are short."""
        num_tokens = check_int("reserve: num_tokens", num_tokens, minimum=1)
        timeout = check_timeout("timeout", timeout, self.timeout)
        n_pages = self.cache.layout.pages_for(num_tokens)
        if n_pages > self.cache.layout.num_pages:
            raise ValueError(f"reserve: {num_tokens} tokens need {n_pages} pages, the cache has "
                             f"{self.cache.layout.num_pages}")
        if pages is not None:
            chosen = check_int_array("reserve: pages", pages, minimum=0, maximum=self.cache.layout.num_pages - 1,
                                     distinct=True)
            if chosen.size != n_pages:
                raise ValueError(f"reserve: {chosen.size} pages given, {num_tokens} tokens of "
                                 f"{self.cache.layout.page_tokens} per page need {n_pages}")
        self._check_open("reserve")
        self.cache._check_usable()
        with self._cond:
            self._check_open("reserve")
            if not self._free_slots:
                raise OutOfPages(f"reserve: all {self.max_requests} request slots are in use")
            pages = self.cache.allocator.alloc(n_pages) if pages is None else self.cache.allocator.take(chosen)
            slot = heapq.heappop(self._free_slots)
            # A generation whose counters hold stray credits is skipped: arrivals that nobody
            # accounted for must never count toward a new request.
            for _ in range(256):
                self._gens[slot] = (self._gens[slot] + 1) & 0xFFFFFFFF
                gen = self._gens[slot]
                eng = self.cache.engine
                if all(eng.imm_counter(kv_imm(self.cache_tag, slot, gen, k)).credits == 0
                       for k in (KIND_DATA, KIND_PAYLOAD)):
                    break
                log.warning("kv: slot %d generation %d has stray imm credits; skipped", slot, gen)
            req = Request(self, slot, gen, pages, int(num_tokens), time.monotonic() + timeout)
            self._slots[slot] = req
            self.counts["reserved"] += 1
            return req

    def send_ticket(self, to: Any, request: "Request | bytes", extra: bytes = b"") -> None:
        """Hand a ticket (and ``extra`` bytes, e.g. the prompt) to a prefill side over the engine;
        it arrives at ``PrefillSide.recv_ticket``."""
        if isinstance(request, Request):
            ticket = request.ticket
        elif isinstance(request, (bytes, bytearray, memoryview)):
            ticket = bytes(request)
        else:
            raise TypeError(f"send_ticket: request must be a kv.Request or ticket bytes, got {type(request).__name__}")
        if not isinstance(extra, (bytes, bytearray, memoryview)):
            raise TypeError(f"send_ticket: extra must be bytes, got {type(extra).__name__}")
        to = as_contact(to, "send_ticket: to")
        self._check_open("send_ticket")
        self._router.send(to, P.TicketMsg(ticket, bytes(extra)))

    def lookup(self, ticket: Any) -> Request:
        """The live request a ticket belongs to (ValueError for a ticket of another cache, or of a
        request that has ended and whose slot was reused)."""
        t = as_ticket(ticket)
        self._check_open("lookup")
        if t.cache_id != self.cache_id:
            raise ValueError(f"ticket from another cache: cache id {t.cache_id:#018x}, this cache is {self.cache_id:#018x}")
        with self._cond:
            req = self._slots[t.slot] if t.slot < self.max_requests else None
            if req is None or req.generation != t.generation:
                raise ValueError(f"stale ticket: slot {t.slot} generation {t.generation} is not live here")
            return req

    def requests(self) -> list[Request]:
        """Requests that hold a slot (PENDING, or ended but quarantined)."""
        with self._cond:
            return [r for r in self._slots if r is not None]

    def poll(self) -> list[Request]:
        """Advance every live request (non-blocking); returns those that are no longer PENDING."""
        self._check_open("poll")
        with self._cond:
            live = [r for r in self._slots if r is not None]
            for r in live:
                self._advance(r)
            return [r for r in live if r.state is not State.PENDING]

    def close(self, timeout: float | None = None) -> None:
        """Cancel every PENDING request (fenced; all at once, each waits at most ``timeout``, default
        the fence timeout) and detach from the engine."""
        timeout = check_timeout("timeout", timeout, self.fence_timeout)
        with self._cond:
            if self._closed:
                return
            self._closed = True
            _lifetime.closed(self)
            live = [r for r in self._slots if r is not None and r.state is State.PENDING]
            now = time.monotonic()
            for r in live:
                self._step(r, sm.begin_end(r._p, State.CANCELLED, "the decode side closed", now, timeout))
            deadline = time.monotonic() + timeout
            while any(r.state is State.PENDING for r in live) and time.monotonic() < deadline:
                for r in live:
                    self._advance(r)
                self._cond.wait(0.01)
            for r in live:
                self._step(r, sm.quarantine(r._p, State.FAILED, "the decode side closed before the fence came"))
        self._router.detach(self)

    def __enter__(self) -> "DecodeSide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- carrying out the state machine (callers hold self._cond) ---------------------------------------
    def _advance(self, req: Request) -> None:
        if req._p.state is not State.PENDING:
            return
        credits = (req._counters[KIND_DATA].credits, req._counters[KIND_PAYLOAD].credits)
        self._step(req, sm.advance(req._p, time.monotonic(), credits, self.fence_timeout, can_take=not req._waiter))

    def _step(self, req: Request, step: sm.Step) -> None:
        """Adopt a transition's progress and carry out its effects, in order."""
        p, effects = step
        before = req._p.state
        req._p = p
        for e in effects:
            if isinstance(e, sm.Take):
                req._counters[e.kind].wait(e.n, 1.0)  # the credits are there
            elif isinstance(e, sm.SendCancel):
                req.times["cancel_sent"] = time.monotonic()
                try:
                    self._router.send(req._owner.contact, P.Cancel(self.cache_id, req.slot, req.generation))
                except Exception as ex:  # noqa: BLE001 - no fence can come: quarantine now
                    self._step(req, sm.cancel_failed(req._p, str(ex)))
            elif isinstance(e, sm.CheckPayload):
                self._step(req, sm.payload_checked(req._p, self._check_payload(req)))
            elif isinstance(e, sm.Ready):
                req.times["ready"] = time.monotonic()
                self.counts["ready"] += 1
                self._free_slot(req)
            elif isinstance(e, sm.Ended):
                req.times["ended"] = time.monotonic()
                self.counts["cancelled" if req._p.state is State.CANCELLED else "failed"] += 1
                if e.clean:
                    self.cache.allocator.free(req._pages)
                    req._released = True
                    self._free_slot(req)
                elif e.quarantine:
                    self.counts["quarantined"] += 1
                    self._held.append((time.monotonic() + self.quarantine_s, req))
                    log.warning("kv: request slot %d gen %d quarantined: %s", req.slot, req.generation, req._p.reason)
        if req._p.state is not before:
            self._cond.notify_all()

    def _check_payload(self, req: Request) -> str | None:
        """Reads the request's payload slot: None when valid (the payload is kept), else what is wrong."""
        off = req.slot * self.slot_bytes
        head = self._payload_buf[off:off + PAYLOAD_HEADER].view("<u4")
        magic, gen, length, crc = (int(x) for x in head)
        body = bytes(self._payload_buf[off + PAYLOAD_HEADER:off + PAYLOAD_HEADER + min(length, self.payload_bytes)])
        if magic != PAYLOAD_MAGIC or gen != req.generation or length > self.payload_bytes or zlib.crc32(body) != crc:
            return f"magic {magic:#x}, generation {gen}, length {length}"
        req._payload = body
        return None

    def _free_slot(self, req: Request) -> None:
        if self._slots[req.slot] is req:
            self._slots[req.slot] = None
            heapq.heappush(self._free_slots, req.slot)

    # -- control messages and heartbeat ----------------------------------------------------------------
    def _on_open(self, sender: Contact, m: P.Open) -> None:
        def reject(why: str) -> None:
            self.counts["rejected_opens"] += 1
            self._router.send(sender, P.Reject(m.cache_id, m.slot, m.generation, m.token, why))

        with self._cond:
            req = self._slots[m.slot] if m.slot < self.max_requests else None
            if req is None or req.generation != m.generation:
                return reject(f"stale ticket: slot {m.slot} generation {m.generation} is not live (cancelled, timed "
                              "out or already served)")
            p = req._p
            if p.state is not State.PENDING or p.ending is not None:
                return reject(f"the request is {p.state.value if p.ending is None else 'ending'}")
            if p.opened:
                return reject("the ticket was already opened by a prefill side")
            try:
                src_layout = KVLayout(m.num_layers, m.num_pages, m.page_tokens, m.kv_heads, m.head_dim,
                                      dtype=m.dtype, page_layout=m.page_layout)
            except (TypeError, ValueError) as e:
                return reject(f"bad source layout: {e}")
            if bad := self.cache.layout.mismatches(src_layout):
                return reject(f"wrong layout: {', '.join(bad)}")
            if m.src_pages.size != req._pages.size:
                return reject(f"{m.src_pages.size} source pages for {req._pages.size} destination pages")
            try:
                plan = plan_writes(self.cache.layout, m.src_shards, self.cache.num_shards, m.src_pages, req._pages)
                per_layer = plan_imm_writes(plan, domains=m.src_domains, split_threshold=m.split_threshold)
                payload = fabric.imm_writes("write", domains=m.src_domains, length=self.slot_bytes,
                                            split_threshold=m.split_threshold)
            except ValueError as e:
                return reject(f"cannot plan the transfer: {e}")
            expected = (2 * self.cache.layout.num_layers * per_layer, payload)
            req._p = sm.opened(p, expected)
            peer = self._peers.get(sender.key)
            if peer is None or peer.dead:
                peer = self._peers[sender.key] = PeerProbe(sender, self.liveness_s)
            req._owner = peer
            req.times["opened"] = time.monotonic()
            self._router.send(sender, P.Accept(m.cache_id, m.slot, m.generation, m.token, expected[0], expected[1],
                                               m.slot * self.slot_bytes, self.slot_bytes,
                                               self._descriptors if m.need_descriptors else ()))
            self._cond.notify_all()

    def _on_fenced(self, sender: Contact, m: P.Fenced) -> None:
        with self._cond:
            req = self._slots[m.slot] if m.slot < self.max_requests else None
            if req is None or req.generation != m.generation or req.state is not State.PENDING:
                return
            flags = P.FenceFlags(m.flags)
            if req._p.ending is None and not flags & P.FenceFlags.ABORT:
                log.warning("kv: unexpected FENCED for slot %d gen %d", m.slot, m.generation)
            req._p = sm.fenced(req._p, sm.Fence((m.posted_data, m.posted_payload), flags, m.reason), time.monotonic(),
                               self.fence_timeout)
            req.times["fenced"] = time.monotonic()
            self._advance(req)
            self._cond.notify_all()

    def _tick(self, now: float) -> None:
        with self._cond:
            for until, req in list(self._held):
                if now >= until:
                    self._held.remove((until, req))
                    self.cache.allocator.free(req._pages)
                    req._released = True
                    self._free_slot(req)
            live = [r for r in self._slots if r is not None and r.state is State.PENDING]
            owners = {id(r._owner): r._owner for r in live if r._owner is not None}
            for r in live:  # arrivals from the stream's prefill side are signs of its life
                total = r._counters[KIND_DATA].total + r._counters[KIND_PAYLOAD].total
                if r._owner is not None and total != r._seen_total:
                    r._seen_total = total
                    r._owner.heard(now)
        dead = {}
        for key, peer in owners.items():
            why = peer.check(self._router.mailbox, now)
            if why:
                dead[key] = why
        with self._cond:
            for r in live:
                if r._owner is not None and id(r._owner) in dead and r.state is State.PENDING:
                    self._step(r, sm.peer_dead(r._p, str(r._owner.contact.address), dead[id(r._owner)],
                                               self.quarantine_s))
                else:
                    self._advance(r)
            for key in [k for k, p in self._peers.items() if p.dead]:
                del self._peers[key]

    def _cache_broken(self, why: str) -> None:
        with self._cond:
            now = time.monotonic()
            for r in [r for r in self._slots if r is not None and r.state is State.PENDING]:
                self._step(r, sm.begin_end(r._p, State.FAILED, f"cache broken: {why}", now, self.fence_timeout))

    def _busy_with_cache(self) -> str | None:
        """Why the cache cannot be re-registered now (a live request), else None."""
        with self._cond:
            n = sum(1 for r in self._slots if r is not None and r.state is State.PENDING)
        return f"{n} request(s) of DecodeSide {self.cache_id:#018x} are still PENDING" if n else None

    def _cache_reregistered(self) -> None:
        """The cache's buffers were registered anew: a new cache id, so tickets and descriptors of the
        old registration are never used again."""
        with self._cond:
            old, self.cache_id = self.cache_id, int.from_bytes(os.urandom(8), "little")
            self._set_descriptors()
        self._router.rekey(self, old)

    def __repr__(self) -> str:
        return f"DecodeSide(cache {self.cache_id:#018x}, tag {self.cache_tag}, {len(self.requests())} live requests)"
