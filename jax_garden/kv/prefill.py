"""The prefill end of KV streaming: streams (one request each, from the source pages of this side's
cache to a decode cache) and the PrefillSide that opens them from tickets and posts each layer's
writes as the jitted prefill marks it done."""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import zlib
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from jax_garden import _lifetime, fabric
from jax_garden._service.mailbox import DEFAULT_LIVENESS_S, Contact, PeerProbe, as_contact, weak_callback
from jax_garden._validate import check_bool, check_float, check_int, check_timeout, has_repeats
from jax_garden.kv import protocol as P
from jax_garden.kv.cache import PagedKVCache
from jax_garden.kv.decode import PAYLOAD_HEADER, PAYLOAD_MAGIC
from jax_garden.kv.errors import BufferMovedError, StreamError
from jax_garden.kv.imm import KIND_DATA, KIND_PAYLOAD, kv_imm
from jax_garden.kv.marks import LayerMarks
from jax_garden.kv.plan import plan_imm_writes, plan_writes
from jax_garden.kv.router import KVRouter, UserMessages
from jax_garden.kv.state import StreamEvent, StreamState, stream_next
from jax_garden.kv.ticket import Ticket, as_ticket

log = logging.getLogger("jax_garden.kv")


class Stream:
    """One request being streamed from a :class:`PrefillSide`'s source pages to a decode cache."""

    # The states as class attributes too (kv.Stream.DONE ...); they are StreamState members, str-valued.
    OPENING, STREAMING, FINISHED = StreamState.OPENING, StreamState.STREAMING, StreamState.FINISHED
    DONE, CANCELLED, FAILED = StreamState.DONE, StreamState.CANCELLED, StreamState.FAILED

    def __init__(self, side: "PrefillSide", ticket: Ticket, src_pages: np.ndarray, token: int, layerwise: bool,
                 on_end: Callable[["Stream"], Any] | None = None):
        self._side = side
        self._on_end = on_end
        self.ticket = ticket
        self.src_pages = src_pages
        self.token = token
        self.layerwise = layerwise
        self.key = (ticket.cache_id, ticket.slot, ticket.generation)
        self.state: StreamState = StreamState.OPENING
        self.reason = ""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._reply: tuple[str, Any] | None = None
        self._open_deadline = float("inf")  # open_stream(wait=False): no ACCEPT by then fails the stream
        self.plan = plan_writes(ticket.layout, side.cache.num_shards, ticket.shards, src_pages, ticket.pages)
        self.per_layer_imms = plan_imm_writes(self.plan, domains=side.cache.engine.num_domains,
                                              split_threshold=side.cache.engine.split_threshold)
        self.expected = (2 * ticket.layout.num_layers * self.per_layer_imms,
                         0)  # payload part filled at ACCEPT (the decode side's slot size)
        self._dst: list[fabric.MemoryDescriptor] = []
        self._payload_desc: fabric.MemoryDescriptor | None = None
        self._payload_offset = 0
        self._slot_bytes = 0
        self._posted = np.zeros(ticket.layout.num_layers, dtype=bool)
        self._transfers: list[Any] = []
        self._staging: Any = None
        self.posted = [0, 0]  # imm-carrying writes posted: data, payload
        self.failed_writes = 0
        self.bytes_posted = 0
        self.pages_posted = 0
        self.layers_posted_on_mark = 0
        self._seen_done = 0  # writes completed at the last tick (signs of the decode side's life)
        self.times: dict[str, Any] = {"opened": time.monotonic(), "marks": {}, "posted": {}}

    # -- public ------------------------------------------------------------------------------------------
    @property
    def path(self) -> tuple[str, str] | None:
        """The engine path this stream's KV writes take toward the decode cache (``"ipc"``,
        ``"fabric"`` or ``"staged"``) and why, once the decode side accepted the ticket (else None)."""
        if not self._dst:
            return None
        cache = self._side.cache
        return cache.engine.path_for(cache.region(0, 0, 0), self._dst[0], why=True)

    @property
    def done(self) -> bool:
        return self.state.ended

    def check(self) -> None:
        """Raise :class:`StreamError` if the stream was cancelled or failed (the reason says why): a
        prefill that checks between layers or chunks stops computing for nothing. Inside a jitted
        program, call it from ``jax.experimental.io_callback`` to abort the program."""
        if self.state in (StreamState.CANCELLED, StreamState.FAILED):
            raise StreamError(f"stream {self.key} {self.state}: {self.reason}")

    @property
    def layers_posted(self) -> list[int]:
        """The layers whose writes were posted so far (on their marks, or by ``finish``)."""
        with self._lock:
            return np.flatnonzero(self._posted).tolist()

    def finish(self, payload: bytes = b"") -> None:
        """The prefill program has completed and its outputs were committed to the source cache:
        post every layer not posted yet, then the payload (last). Returns without waiting; see
        :meth:`wait`. Raises StreamError if the stream was cancelled or failed, ValueError if the
        payload exceeds the ticket's capacity, BufferMovedError if the source cache moved (the stream
        then fails)."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"finish: payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
        if len(payload) > self.ticket.payload_capacity:
            raise ValueError(f"finish: payload of {len(payload)} bytes exceeds the ticket's capacity "
                             f"({self.ticket.payload_capacity})")
        side = self._side
        try:
            # Layers posted on their marks were ordered after their writes; the rest must be ready.
            with self._lock:
                unposted = [layer for layer, done in enumerate(self._posted) if not done]
            side.cache.block_until_ready(unposted)
            side.cache.check()
        except BufferMovedError as e:
            side._fail(self, f"source cache: {e}")
            raise
        self._await_answer()
        with self._lock:
            if self.state is not StreamState.STREAMING:
                raise StreamError(f"finish: the stream is {self.state}{': ' + self.reason if self.reason else ''}")
            try:
                for layer in range(self.ticket.layout.num_layers):
                    if not self._posted[layer]:
                        self._post_layer_locked(layer)
                self._post_payload_locked(payload)
            except Exception as e:  # noqa: BLE001
                self._fail_locked(f"posting failed: {e}")
                raise StreamError(f"finish: posting failed: {e}") from e
            self._to(StreamEvent.FINISH)
            self.times["finished"] = time.monotonic()

    def _await_answer(self) -> None:
        """An OPENING stream (``open_stream(wait=False)``): wait for the decode side's answer, up to
        the open deadline; no answer by then fails the stream."""
        with self._lock:
            while self.state is StreamState.OPENING:
                left = self._open_deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))
            unanswered = self.state is StreamState.OPENING
        if unanswered:
            self._side._open_unanswered(self)

    def wait(self, timeout: float | None = None) -> dict:
        """Wait until every write of the stream completed at the sender (after :meth:`finish`), and
        return its statistics. Raises StreamError if the stream failed or was cancelled, TimeoutError
        after ``timeout`` (default: the side's timeout)."""
        timeout = check_timeout("timeout", timeout, self._side.timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.state in (StreamState.STREAMING, StreamState.OPENING):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"stream {self.key}: finish() was not called within {timeout} s")
                self._cond.wait(min(left, 0.05))
            transfers = list(self._transfers)
        for t in transfers:
            left = deadline - time.monotonic()
            try:
                t.wait(max(left, 1e-3))
            except (fabric.TransferError, TimeoutError) as e:
                if not t.done:  # our wait ran out, the write is still in flight
                    raise TimeoutError(f"stream {self.key}: writes still in flight after {timeout} s") from None
                self._side._fail(self, f"a write failed: {e}")  # the engine failed it (peer dead or silent)
        self._side._maybe_done(self)
        if self.state in (StreamState.FAILED, StreamState.CANCELLED):
            raise StreamError(f"stream {self.key} {self.state}: {self.reason}")
        return self.stats()

    def stats(self) -> dict:
        return {"posted_data": self.posted[0], "posted_payload": self.posted[1], "bytes": self.bytes_posted,
                "pages": self.pages_posted, "layers_posted_on_mark": self.layers_posted_on_mark,
                "writes": len(self.plan) * 2 * self.ticket.layout.num_layers, "state": self.state}

    # -- posting (callers hold self._lock) -----------------------------------------------------------------
    def _post_layer_locked(self, layer: int) -> None:
        side, eng, t = self._side, self._side.cache.engine, self.ticket
        imm = kv_imm(t.cache_tag, t.slot, t.generation, KIND_DATA)
        dom, split = eng.num_domains, eng.split_threshold
        for kind in (0, 1):
            for w in self.plan:
                src = side.cache.region(layer, kind, w.src_shard)
                dst = self._dst[(layer * 2 + kind) * t.shards + w.dst_shard]
                if w.op == "write":
                    tr = eng.write(src, dst, w.nbytes, w.src_offset, w.dst_offset, imm)
                    n = fabric.imm_writes("write", domains=dom, length=w.nbytes, split_threshold=split)
                else:
                    tr = eng.write_paged(src, dst, w.nbytes, w.src_index, w.dst_index, w.src_stride, w.dst_stride,
                                         w.src_offset, w.dst_offset, imm)
                    n = fabric.imm_writes("paged", domains=dom, pages=w.blocks)
                self._transfers.append(tr)
                self.posted[0] += n
                self.bytes_posted += w.bytes_moved
        self.pages_posted += 2 * int(self.src_pages.size)
        self._posted[layer] = True
        self.times["posted"][layer] = time.monotonic()

    def _post_payload_locked(self, payload: bytes) -> None:
        side, eng, t = self._side, self._side.cache.engine, self.ticket
        region, offset = side._staging_slot(self, self._slot_bytes)
        buf = side._staging_view(region, offset, self._slot_bytes)
        buf[:] = 0
        head = np.array([PAYLOAD_MAGIC, t.generation, len(payload), zlib.crc32(payload)], dtype="<u4")
        buf[:PAYLOAD_HEADER] = head.view(np.uint8)
        buf[PAYLOAD_HEADER:PAYLOAD_HEADER + len(payload)] = np.frombuffer(payload, np.uint8)
        imm = kv_imm(t.cache_tag, t.slot, t.generation, KIND_PAYLOAD)
        tr = eng.write(region, self._payload_desc, self._slot_bytes, offset, self._payload_offset, imm)
        self._transfers.append(tr)
        self.posted[1] += fabric.imm_writes("write", domains=eng.num_domains, length=self._slot_bytes,
                                            split_threshold=eng.split_threshold)

    def _post_marked_locked(self, layer: int) -> bool:
        """Post a marked layer unless it was; True if posting failed the stream."""
        if self._posted[layer]:
            return False
        try:
            self._post_layer_locked(layer)
            self.layers_posted_on_mark += 1
        except Exception as e:  # noqa: BLE001
            return self._fail_locked(f"posting layer {layer} failed: {e}")
        return False

    def _to(self, event: StreamEvent, reason: str | None = None) -> bool:
        """Apply ``event`` (under the stream lock); False when it changes nothing in this state."""
        nxt = stream_next(self.state, event)
        if nxt is None:
            return False
        self.state = nxt
        if reason is not None:
            self.reason = reason
        self._cond.notify_all()
        if self._on_end is not None and nxt in (StreamState.CANCELLED, StreamState.FAILED):
            fn, self._on_end = self._on_end, None
            self._side._router.callbacks.submit(_call_on_end, fn, self)  # never under the stream lock
        return True

    def _fail_locked(self, why: str) -> bool:
        return self._to(StreamEvent.FAIL, why)

    def __repr__(self) -> str:
        return (f"Stream(token={self.token}, slot={self.ticket.slot}, gen={self.ticket.generation}, {self.state}"
                f"{': ' + self.reason if self.reason else ''})")


class PrefillSide(UserMessages):
    """The prefill end: opens streams from tickets and posts each layer's writes from ``cache`` (the
    source pages) as the jitted prefill marks it done.

    Args:
      cache: the source :class:`PagedKVCache` (same layout as the decode caches, any page count and
        head sharding).
      timeout: default timeout of ``open_stream``, ``recv_ticket`` and ``Stream.wait``, seconds.
      payload_slots / payload_slot_bytes: the registered staging pool for payloads.
      liveness_s: a decode side this side streams to that answers no liveness probe for this long is
        dead: its streams fail naming it (no more posting). Separate from operation timeouts.
    """

    def __init__(self, cache: PagedKVCache, *, timeout: float = 30.0, payload_slots: int = 64,
                 payload_slot_bytes: int = 4096 + 64, liveness_s: float = DEFAULT_LIVENESS_S):
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a kv.PagedKVCache, got {type(cache).__name__}")
        self.timeout = check_float("timeout", timeout)
        payload_slots = check_int("payload_slots", payload_slots, minimum=1, maximum=1 << 16)
        payload_slot_bytes = check_int("payload_slot_bytes", payload_slot_bytes, minimum=PAYLOAD_HEADER + 1,
                                       maximum=(1 << 20) + 64)
        self.liveness_s = check_float("liveness_s", liveness_s)
        cache._check_usable()
        self.cache = cache
        eng = cache.engine
        self._lock = threading.RLock()
        self._streams: dict[tuple[int, int, int], Stream] = {}
        self._by_token: dict[int, Stream] = {}
        self._ended: "OrderedDict[tuple[int, int, int], tuple[int, int, int]]" = OrderedDict()
        self._descs: dict[int, tuple[list[fabric.MemoryDescriptor], fabric.MemoryDescriptor]] = {}
        self._peers: dict[bytes, PeerProbe] = {}
        self._tickets: "queue.Queue[tuple[bytes, bytes]]" = queue.Queue()
        self._tokens = itertools.count(int.from_bytes(os.urandom(3), "little") + 1)
        self._staging_buf = np.zeros(payload_slots * payload_slot_bytes, np.uint8)
        self._staging_region = eng.register(self._staging_buf)
        self._staging_size = payload_slot_bytes
        self._staging_free = list(range(payload_slots))
        self._closed = False
        self.counts = {"opened": 0, "done": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._watcher = eng.watcher(weak_callback(self, PrefillSide._on_mark))
        self.marks = LayerMarks(self._watcher, cache.layout.num_layers)
        self._router = KVRouter.attach_prefill(eng, self)
        self.contact: Contact = self._router.contact
        cache._listeners.add(self)
        _lifetime.close_at_exit(self)

    # -- public -----------------------------------------------------------------------------------------
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what}: the PrefillSide is closed")

    def recv_ticket(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        """Next ticket sent with ``DecodeSide.send_ticket``: ``(ticket bytes, extra bytes)``."""
        timeout = check_timeout("timeout", timeout, self.timeout)
        self._check_open("recv_ticket")
        try:
            return self._tickets.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"recv_ticket: no ticket within {timeout} s") from None

    def open_stream(self, ticket: Any, src_pages: Any, *, layerwise: bool = True, timeout: float | None = None,
                    on_end: Callable[[Stream], Any] | None = None, wait: bool = True) -> Stream:
        """Check ``ticket`` against this side's source cache (ValueError: garbled, truncated, wrong
        layout, pages out of range, ...), then ask the decode side to accept the stream (ValueError if
        it rejects: a ticket from another cache, a stale or cancelled ticket). Nothing is posted before
        the decode side accepted. ``src_pages``: the request's pages in the source cache, in token
        order. ``layerwise=False`` posts everything at ``finish`` (bulk mode). ``on_end(stream)`` is
        called once, on a kv service thread, if the stream is cancelled or fails after it opened (the
        decode side cancelled it, its deadline passed, the decode side died, a write failed): the
        moment to stop computing its prefill (see also :meth:`Stream.check`).

        ``wait=False`` returns as soon as OPEN is sent, with the stream OPENING: launch the prefill
        at once (``stream.token`` is known), so the round trip to the decode side overlaps the first
        layers instead of delaying them. Layers marked before the decode side accepts are posted the
        moment it does; ``finish`` waits for the answer. A rejection, a cancel, or no answer within
        ``timeout`` fails the stream instead of raising here (``finish``/``wait``/``check`` raise
        StreamError, ``on_end`` is called). Checks of the ticket and pages still raise at once."""
        layerwise = check_bool("layerwise", layerwise)
        wait = check_bool("wait", wait)
        if on_end is not None and not callable(on_end):
            raise TypeError(f"on_end must be callable(stream), got {type(on_end).__name__}")
        timeout = check_timeout("timeout", timeout, self.timeout)
        t = as_ticket(ticket)
        cache, eng = self.cache, self.cache.engine
        if bad := cache.layout.mismatches(t.layout):
            raise ValueError(f"kv ticket: wrong layout for this prefill cache: {', '.join(bad)}")
        if t.contact.address.provider != eng.provider:
            raise ValueError(f"kv ticket: decode side uses provider {t.contact.address.provider!r}, this engine "
                             f"{eng.provider!r}")
        try:
            src = np.asarray(src_pages)
        except Exception:  # noqa: BLE001
            raise TypeError(f"src_pages must be a sequence of ints, got {type(src_pages).__name__}") from None
        if src.ndim != 1 or (src.size and not np.issubdtype(src.dtype, np.integer)):
            raise TypeError(f"src_pages must be a 1-D sequence of ints, got {src.dtype} shape {src.shape}")
        if src.size != t.pages.size:
            raise ValueError(f"src_pages: {src.size} pages, the ticket has {t.pages.size}")
        if src.size and (int(src.min()) < 0 or int(src.max()) >= cache.layout.num_pages):
            raise ValueError(f"src_pages: page {int(src.max()) if src.max() >= cache.layout.num_pages else int(src.min())} "
                             f"out of range (the source cache has {cache.layout.num_pages} pages)")
        if has_repeats(src):
            raise ValueError("src_pages: a page appears twice")
        if t.payload_capacity + PAYLOAD_HEADER > 1 << 20:
            raise ValueError(f"kv ticket: payload capacity {t.payload_capacity} too large")
        self._check_open("open_stream")
        cache._check_usable()
        with self._lock:
            self._check_open("open_stream")
            old = self._streams.get((t.cache_id, t.slot, t.generation))
            if old is not None and not old.done:
                raise ValueError(f"kv ticket: slot {t.slot} generation {t.generation} already has a stream here")
            token = next(self._tokens) & 0xFFFFFFFF
            while token == 0 or token in self._by_token:
                token = next(self._tokens) & 0xFFFFFFFF
            s = Stream(self, t, src.astype(np.uint32), token, layerwise, on_end)
            s._open_deadline = time.monotonic() + timeout
            self._streams[s.key] = s
            self._by_token[token] = s  # marks before the ACCEPT are recorded, and posted at it
            need_desc = t.cache_id not in self._descs
        lay = cache.layout
        self._router.send(t.contact, P.Open(t.cache_id, t.slot, t.generation, token, 1 if need_desc else 0,
                                            lay.num_layers, lay.num_pages, lay.page_tokens, lay.kv_heads,
                                            lay.head_dim, lay.dtype, lay.page_layout, cache.num_shards,
                                            eng.num_domains, eng.split_threshold, s.src_pages))
        if not wait:
            return s
        with s._lock:
            while s._reply is None:
                left = s._open_deadline - time.monotonic()
                if left <= 0:
                    break
                s._cond.wait(min(left, 0.05))
            reply = s._reply
        if reply is None or reply[0] == "timeout":  # (the service tick may have given up first)
            self._open_unanswered(s)
            raise TimeoutError(f"open_stream: the decode side did not answer within {timeout} s")
        if reply[0] == "cancel":  # its fence job answers the decode side
            raise StreamError(f"open_stream: {reply[1]}")
        if reply[0] == "reject":
            raise ValueError(f"kv ticket rejected by the decode side: {reply[1]}")
        return s

    def _open_unanswered(self, s: Stream) -> None:
        """No ACCEPT by the open deadline: fail the stream and tell the decode side, which may still
        accept, that nothing will come (a fence with 0 posted)."""
        with s._lock:
            if not s._fail_locked("no answer to OPEN"):
                return  # answered meanwhile, or already ended
            s._reply = ("timeout", None)
        self.counts["failed"] += 1
        self._send_fence(s, P.FenceFlags.ABORT, "the prefill side gave up waiting for ACCEPT")
        self._record_end(s, P.FenceFlags.ABORT)

    def _refused(self, s: Stream) -> None:
        """The decode side (or our check of its ACCEPT) refused the stream before anything was posted."""
        with self._lock:
            self._by_token.pop(s.token, None)
            if self._streams.get(s.key) is s:
                del self._streams[s.key]
        self.counts["rejected"] += 1

    def streams(self) -> list[Stream]:
        with self._lock:
            return [s for s in self._streams.values() if not s.done]

    def close(self) -> None:
        """Fail every live stream (no more posting) and detach from the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _lifetime.closed(self)
            live = [s for s in self._streams.values() if not s.done]
        for s in live:
            self._fail(s, "prefill side closed")
        self._router.detach(self)

    def __enter__(self) -> "PrefillSide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- staging for payloads ------------------------------------------------------------------------------
    def _staging_slot(self, s: Stream, nbytes: int) -> tuple[fabric.MemoryRegion, int]:
        with self._lock:
            if nbytes <= self._staging_size and self._staging_free:
                i = self._staging_free.pop()
                s._staging = ("pool", i)
                return self._staging_region, i * self._staging_size
        buf = np.zeros(nbytes, np.uint8)  # rare: a bigger payload slot, or the pool is exhausted
        region = self.cache.engine.register(buf)
        s._staging = ("own", region)
        return region, 0

    def _staging_view(self, region: fabric.MemoryRegion, offset: int, nbytes: int) -> np.ndarray:
        if region is self._staging_region:
            return self._staging_buf[offset:offset + nbytes]
        return region._keepalive[offset:offset + nbytes]

    def _release_staging(self, s: Stream) -> None:
        st, s._staging = s._staging, None
        if st is not None and st[0] == "pool":
            with self._lock:
                self._staging_free.append(st[1])

    # -- marks -----------------------------------------------------------------------------------------
    def _on_mark(self, layer: int, old: int, new: int) -> None:
        s = self._by_token.get(new)
        if s is None:
            return
        now = time.monotonic()
        with s._lock:
            s.times["marks"][layer] = now
            if not s.layerwise or s.state is not StreamState.STREAMING:
                return
            failed = s._post_marked_locked(layer)
        if failed:
            self._after_fail(s)

    # -- failure, fences and completion ----------------------------------------------------------------
    def _fail(self, s: Stream, why: str) -> None:
        with s._lock:
            failed = s._fail_locked(why)
        if failed:
            self._after_fail(s)

    def _after_fail(self, s: Stream) -> None:
        self.counts["failed"] += 1
        with self._lock:
            self._by_token.pop(s.token, None)
        self._router.fence_pool.submit(self._fence_job, s, P.FenceFlags.ABORT, s.reason)

    def _fence_job(self, s: Stream, flags: int, why: str) -> None:
        """Wait until every write of ``s`` completed at the sender, then tell the decode side how many
        imm-carrying writes were posted (it counts them in before reusing the pages)."""
        with s._lock:
            transfers = list(s._transfers)
        limit = self.cache.engine.timeout + 5.0
        for t in transfers:
            try:
                t.wait(limit)
            except (fabric.TransferError, TimeoutError):
                flags |= P.FenceFlags.FAILED_WRITES
        with s._lock:
            s.failed_writes = sum(1 for t in transfers if t.failed)
            s._transfers = []
        self._release_staging(s)
        self._send_fence(s, flags, why)
        self._record_end(s, flags)

    def _send_fence(self, s: Stream, flags: int, why: str) -> None:
        msg = P.Fenced(s.ticket.cache_id, s.ticket.slot, s.ticket.generation, s.posted[0], s.posted[1], int(flags), why)
        try:
            self._router.send(s.ticket.contact, msg)
        except Exception as e:  # noqa: BLE001 - a dead decode side cannot hear it anyway
            log.info("kv: FENCED not sent: %s", e)

    def _record_end(self, s: Stream, flags: int) -> None:
        with self._lock:
            self._by_token.pop(s.token, None)
            if self._streams.get(s.key) is s:
                del self._streams[s.key]
            self._ended[s.key] = (s.posted[0], s.posted[1], flags)
            while len(self._ended) > 65536:
                self._ended.popitem(last=False)

    def _maybe_done(self, s: Stream) -> None:
        """A FINISHED stream whose writes all completed becomes DONE (its records are dropped)."""
        with s._lock:
            if s.state is not StreamState.FINISHED or not all(t.done for t in s._transfers):
                return
            failed = [t for t in s._transfers if t.failed]
            if failed:
                s._fail_locked(f"a write failed: {failed[0].error}")
            else:
                s._to(StreamEvent.ALL_WRITTEN)
                s.times["done"] = time.monotonic()
                s._transfers = []
                s._cond.notify_all()
        if s.state is StreamState.FAILED:
            self._after_fail(s)
            return
        self.counts["done"] += 1
        self._release_staging(s)
        self._record_end(s, 0)

    def _on_ticket(self, m: P.TicketMsg) -> None:
        self._tickets.put((m.ticket, m.extra))

    def _stream_of_reply(self, m: Any) -> Stream | None:
        with self._lock:
            s = self._streams.get((m.cache_id, m.slot, m.generation))
        return s if s is not None and s.token == m.token else None

    def _on_accept(self, m: P.Accept) -> None:
        s = self._stream_of_reply(m)
        if s is None:
            return
        if m.descriptors:
            descs = [fabric.MemoryDescriptor.from_bytes(d) for d in m.descriptors]
            self._descs[s.ticket.cache_id] = (descs[:-1], descs[-1])
        lay = s.ticket.layout
        dst, payload_desc = self._descs.get(s.ticket.cache_id, (None, None))
        eng = self.cache.engine
        expect_p = fabric.imm_writes("write", domains=eng.num_domains, length=m.slot_bytes,
                                     split_threshold=eng.split_threshold)
        problem = None
        if dst is None or len(dst) != lay.num_layers * 2 * s.ticket.shards:
            problem = "the decode side's descriptors are missing or do not match the ticket"
        elif (m.expected_data, m.expected_payload) != (s.expected[0], expect_p):
            problem = (f"imm accounting mismatch: decode expects {m.expected_data}+{m.expected_payload} writes, this "
                       f"side plans {s.expected[0]}+{expect_p}")
        with s._lock:
            if s.state is not StreamState.OPENING:
                return
            failed = False
            if problem:
                s._reply = ("reject", problem)
                s._fail_locked(problem)
            else:
                s._dst, s._payload_desc = dst, payload_desc
                s._payload_offset, s._slot_bytes = m.payload_offset, m.slot_bytes
                s.expected = (m.expected_data, m.expected_payload)
                s._to(StreamEvent.ACCEPT)
                s.times["accepted"] = time.monotonic()
                s._reply = ("accept", None)
                with self._lock:
                    self.counts["opened"] += 1
                    peer = self._peers.get(s.ticket.contact.key)
                    if peer is None or peer.dead:
                        self._peers[s.ticket.contact.key] = PeerProbe(s.ticket.contact, self.liveness_s)
                if s.layerwise:  # layers marked while the stream was OPENING (open_stream(wait=False))
                    for layer in sorted(s.times["marks"]):
                        if failed := s._post_marked_locked(layer):
                            break
            s._cond.notify_all()
        if problem:
            self._send_fence(s, P.FenceFlags.ABORT, problem)
            self._refused(s)
        elif failed:
            self._after_fail(s)

    def _on_reject(self, m: P.Reject) -> None:
        s = self._stream_of_reply(m)
        if s is None:
            return
        with s._lock:
            if s.state is not StreamState.OPENING:
                return
            s._reply = ("reject", m.reason)
            s._to(StreamEvent.REJECT, f"rejected: {m.reason}")
        self._refused(s)

    def _on_cancel(self, sender: Contact, m: P.Cancel) -> None:
        key = (m.cache_id, m.slot, m.generation)
        with self._lock:
            s = self._streams.get(key)
            ended = self._ended.get(key)
        if s is None:
            # Ended (its fence numbers are remembered) or never seen (nothing provable).
            posted_d, posted_p, flags = ended if ended is not None else (0, 0, P.FenceFlags.UNKNOWN)
            self._router.send(sender, P.Fenced(*key, posted_d, posted_p, int(flags),
                                               "stream already ended" if ended is not None else "unknown stream"))
            return
        with s._lock:
            opening = s.state is StreamState.OPENING
            cancelled = s._to(StreamEvent.CANCEL, "cancelled by the decode side")
            if cancelled and opening:  # the CANCEL overtook the ACCEPT: open_stream gives up now
                s._reply = ("cancel", "cancelled by the decode side before the stream opened")
        if cancelled:
            self.counts["cancelled"] += 1
            with self._lock:
                self._by_token.pop(s.token, None)
            self._router.fence_pool.submit(self._fence_job, s, P.FenceFlags.NONE, "cancelled")
        # else: a DONE/FAILED stream already sent (or is sending) its fence numbers via _record_end.
        elif s.state is StreamState.DONE:
            self._send_fence(s, P.FenceFlags.NONE, "stream already ended")

    def _tick(self, now: float) -> None:
        with self._lock:
            live = [s for s in self._streams.values() if not s.done]
        peers: dict[bytes, list[tuple[Stream, bool]]] = {}
        for s in live:
            if s.state is StreamState.OPENING and now > s._open_deadline:
                self._open_unanswered(s)  # open_stream(wait=False) with no answer and no finish() waiting
                continue
            if s.state is StreamState.FINISHED:
                self._maybe_done(s)
                if s.done:
                    continue
            if s.state in (StreamState.STREAMING, StreamState.FINISHED):
                with s._lock:
                    done = [t for t in s._transfers if t.done]
                failed = next((t for t in done if t.failed), None)
                if failed is not None:
                    self._fail(s, f"a write failed: {failed.error}")
                    continue
                progressed = len(done) != s._seen_done
                s._seen_done = len(done)
                peers.setdefault(s.ticket.contact.key, []).append((s, progressed))
        for key, entries in peers.items():
            streams = [s for s, _ in entries]
            with self._lock:
                peer = self._peers.get(key)
                if peer is None:
                    peer = self._peers[key] = PeerProbe(streams[0].ticket.contact, self.liveness_s)
            if any(progressed for _, progressed in entries):  # its writes completed: it is alive
                peer.heard(now)
            why = peer.check(self._router.mailbox, now)
            if why:
                for s in streams:
                    self._fail(s, f"decode side {peer.contact.address} unreachable: {why}")
        with self._lock:
            for key in [k for k, p in self._peers.items() if p.dead]:
                del self._peers[key]

    def _cache_broken(self, why: str) -> None:
        for s in self.streams():
            self._fail(s, f"source cache broken: {why}")

    def _busy_with_cache(self) -> str | None:
        n = len(self.streams())
        return f"{n} stream(s) of the PrefillSide are still live" if n else None

    def _cache_reregistered(self) -> None:
        pass  # the new regions are read at the next post

    def __repr__(self) -> str:
        return f"PrefillSide({len(self.streams())} live streams)"


def _call_on_end(fn: Callable[[Stream], Any], stream: Stream) -> None:
    try:
        fn(stream)
    except Exception:  # noqa: BLE001 - a user callback must not stop the service
        log.exception("kv: on_end callback of %r failed", stream)
