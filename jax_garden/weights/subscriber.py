"""The inference end of a weight push: a Subscriber owns two registered copies of its rank's shards,
grants pushes, counts their imms and switches versions in agreement with the other subscriber
ranks. Control messages come through the engine's mailbox; nothing polls while nobody waits."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Iterator, Sequence

from jax_garden import _lifetime, fabric
from jax_garden._service.bootstrap import Bootstrap
from jax_garden._service.mailbox import DEFAULT_LIVENESS_S, Contact, PeerDead, PeerProbe, as_contact
from jax_garden._validate import check_float, check_instance, check_int, check_timeout
from jax_garden.weights import protocol as P
from jax_garden.weights.layout import Fp8, Layout, MeshSharding, TensorSpec, is_abstract
from jax_garden.weights.placement import bootstrap_key, default_rank, local_devices
from jax_garden.weights.plan import Plan
from jax_garden.weights.router import WeightsRouter


# ---- state ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SourceProgress:
    """One source rank's part of the version being collected: the grant it got and what arrived."""

    epoch: int
    imm: int
    counter: Any                      # the engine's ImmCounter of that imm
    expected: int                     # imm writes the source's push delivers here
    granted_at: float
    base_total: int                   # counter total at the grant
    last_total: int
    last_progress: float              # when an arrival was last seen (no earlier than the arrival)
    complete_at: float | None = None
    waiter: bool = False              # a wait() blocks on the counter: only it takes the credits

    def arrived(self) -> int:
        return self.counter.total - self.base_total


@dataclasses.dataclass
class Attempt:
    """The version being collected into the copy not in service."""

    version: int
    slot: int
    started: float
    sources: dict[int, SourceProgress] = dataclasses.field(default_factory=dict)
    complete_at: float | None = None


@dataclasses.dataclass
class PublisherInfo:
    """A source rank that said hello: where it is, its domains, and its liveness."""

    contact: Contact
    domains: int
    probe: PeerProbe
    session: int                      # from its hello: offers are made to this session only


@dataclasses.dataclass
class StandingGrant:
    """An offer made to a source for its next push: the epoch is reserved and its counter drained,
    so writes that arrive before the claim are counted from ``base_total``."""

    session: int
    serial: int                       # unwrapped epoch count (the epoch is serial % 4096)
    slot: int
    epoch: int
    imm: int
    counter: Any
    base_total: int


@dataclasses.dataclass
class PendingRequest:
    """A push request not answered with a grant yet (told: the last PENDING reason sent)."""

    sender: Contact
    msg: P.PushRequest
    told: str | None = None


@dataclasses.dataclass(frozen=True)
class RankStatus:
    """One subscriber rank's word in a switch round."""

    serving: int | None
    candidate: int | None
    missing: str


def _layout_difference(got: Layout, want: Layout) -> str:
    gp, wp = [t.path for t in got.tensors], [t.path for t in want.tensors]
    if gp != wp:
        return f"paths differ: specs have {sorted(set(gp) - set(wp))[:6]} not in the plan, " \
               f"the plan has {sorted(set(wp) - set(gp))[:6]} not in the specs"
    for a, b in zip(got.tensors, want.tensors):
        if a.shape != b.shape:
            return f"{a.path}: shape {a.shape}, the plan says {b.shape}"
        if a.dtype != b.dtype:
            return f"{a.path}: dtype {a.dtype}, the plan says {b.dtype}"
        if a.kind != b.kind or a.block != b.block:
            return f"{a.path}: {a.kind} {a.block}, the plan says {b.kind} {b.block}"
        if a.shards != b.shards:
            return f"{a.path}: shards {[(r, l, list(x)) for r, l, x in a.shards[:4]]}..., the plan says " \
                   f"{[(r, l, list(x)) for r, l, x in b.shards[:4]]}..."
    return "layouts differ"


class Subscriber:
    """Receives parameter versions on one inference process (one rank of the plan's destination side).

    Owns two registered copies of this rank's parameter shards (double buffering): a push lands in
    the copy not in service, and the model sees a new version only when :meth:`refresh` or
    :meth:`wait` switches to it, which happens once every byte of it landed on every subscriber
    rank (the ranks agree in a round of status messages, so all of them switch at the same call).
    After a switch, the previous copy is rewritten by the next push unless a reader holds it
    (:meth:`hold`); finish work that reads the old version before calling :meth:`refresh`.

    Args:
      plan: the :class:`Plan`.
      specs: this side's pytree of specs (the one the plan's destination layout came from); gives
        :meth:`params` its structure and, for real shardings, global arrays.
      rank: this process's destination rank (default as for :class:`Publisher`).
      engine: the TransferEngine to receive with (it may carry other services too: control messages
        go through its mailbox); by default the subscriber makes its own and closes it with itself.
      fence_s: a source whose push did not complete is granted a new push only this long after
        its last write arrived, so a late write of the abandoned push cannot land in the new one.
      imm_tag: 4-bit tag of this service's imms (default 0xA; must match the publishers').
      devices / devices_per_rank: how local indices map to jax devices / how abstract meshes map
        to ranks (as in :meth:`Layout.from_pytree`).
      poll_s: while a push is being collected, :meth:`wait` blocks on one source's imm counter
        (it wakes when the writes are in) for at most this long before it looks at messages again.
      liveness_s: while a version is being collected, a source of it that answers no liveness probe
        for this long is dead: :meth:`wait` raises ``PeerDead`` naming it (the version in service
        stays; a restarted publisher may push again).
    """

    def __init__(self, plan: Plan, specs: Any, rank: int | None = None, *,
                 engine: fabric.TransferEngine | None = None, provider: str | None = None, domains: int = 1,
                 engine_timeout: float = fabric.DEFAULT_TIMEOUT, fence_s: float = 2.0,
                 imm_tag: int = P.DEFAULT_IMM_TAG, devices: Sequence[Any] | None = None, devices_per_rank: int = 1,
                 poll_s: float = 0.002, liveness_s: float = DEFAULT_LIVENESS_S):
        import jax.numpy as jnp

        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a weights.Plan, got {type(plan).__name__}")
        if engine is not None and not isinstance(engine, fabric.TransferEngine):
            raise TypeError(f"engine must be a fabric.TransferEngine, got {type(engine).__name__}")
        fence_s = check_float("fence_s", fence_s, allow_zero=True)
        poll_s = check_float("poll_s", poll_s)
        self.liveness_s = check_float("liveness_s", liveness_s)
        imm_tag = P.check_imm_tag(imm_tag)
        layout = Layout.from_pytree(specs, devices_per_rank=devices_per_rank)
        if not layout.same_placement(plan.dst):
            raise ValueError(f"specs do not match the plan's destination side: {_layout_difference(layout, plan.dst)}")
        self.plan, self.fence_s, self.imm_tag, self._poll = plan, float(fence_s), imm_tag, float(poll_s)
        self.rank = default_rank(plan.dst, rank, "destination")
        self._specs = specs
        self._own_engine = engine is None
        self.engine = engine or fabric.TransferEngine(provider, domains, timeout=engine_timeout)
        self._devices = local_devices(plan.dst, self.rank, devices)
        self._buffers = plan.buffers(self.rank)
        self._arrays: list[list[Any]] = [[], []]
        self._regions: list[list[Any]] = [[], []]
        for di, l in self._buffers:
            t = plan.dst.tensors[di]
            box = next(b for r, ll, b in t.shards if r == self.rank and ll == l)
            shape = tuple(b - a for a, b in box)
            for s in (0, 1):
                a = jnp.zeros(shape, t.dtype, device=self._devices[l])
                a.block_until_ready()
                self._arrays[s].append(a)
                self._regions[s].append(self.engine.register(a))
        ptrs = [r.base for rs in self._regions for r in rs]
        if len(set(ptrs)) != len(ptrs):
            raise RuntimeError("weights: two destination buffers share memory; cannot write into them separately")
        self._sources = plan.sources_of(self.rank)
        self._cond = threading.Condition()
        self._serving_slot: int | None = None
        self._serving_version: int | None = None
        self._attempt: Attempt | None = None
        self._pubs: dict[int, PublisherInfo] = {}
        self._next_epoch: dict[int, int] = {}
        self._fence_until: dict[int, float] = {}
        self._offers: dict[int, StandingGrant] = {}  # source rank -> its outstanding standing grant
        self._requests: list[PendingRequest] = []
        self._leases = [0, 0]
        self._errors: list[str] = []
        self._peers: list[Contact | None] | None = None
        self._round = 0
        self._done_round = 0
        self._pending_round: int | None = None
        self._statuses: dict[int, dict[int, RankStatus]] = {}
        self._last_statuses: dict[int, RankStatus] = {}
        self._params_cache: dict[int, Any] = {}
        self._dead_sources: dict[int, str] = {}  # source rank -> why (cleared by its next hello)
        self._closed = False
        self._auto_round: int | None = None  # a round this rank answered on its own (nothing to switch to)
        self._router = WeightsRouter.attach(self.engine, self, "subscriber")
        self._router.tick_for(self.liveness_s)
        _lifetime.close_at_exit(self)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what}: the Subscriber is closed")

    # -- bootstrap --------------------------------------------------------------------------------
    @property
    def address(self) -> bytes:
        """This rank's contact (engine address and mailbox) as bytes: give it (all ranks', in rank
        order) to publishers' ``connect`` and to every subscriber rank's :meth:`set_peers`."""
        return bytes(self._router.contact)

    def set_peers(self, addresses: Sequence[Any]) -> None:
        """Addresses of all subscriber ranks (index = rank), for the switch-over rounds."""
        if isinstance(addresses, (str, bytes)) or not hasattr(addresses, "__iter__"):
            raise TypeError(f"set_peers takes a sequence of addresses, got {type(addresses).__name__}")
        addresses = list(addresses)
        if len(addresses) != self.plan.num_dst_ranks:
            raise ValueError(f"set_peers needs {self.plan.num_dst_ranks} addresses (one per subscriber rank), "
                             f"got {len(addresses)}")
        peers = [None if r == self.rank else as_contact(a, f"addresses[{r}]") for r, a in enumerate(addresses)]
        self._check_open("set_peers")
        self._peers = peers

    def announce(self, kv: str, timeout: float = 60.0) -> None:
        """Bootstrap through ``jax.distributed``'s key-value store: publish this rank's address
        under ``kv`` and read the other subscriber ranks' (publishers then ``connect(kv=kv)``)."""
        check_instance("kv", kv, str)
        timeout = check_timeout("timeout", timeout)
        self._check_open("announce")
        boot = Bootstrap()
        boot.publish(bootstrap_key(kv, self.rank), self.address)
        addrs = [self.address if r == self.rank else boot.fetch(bootstrap_key(kv, r), timeout)
                 for r in range(self.plan.num_dst_ranks)]
        self.set_peers(addrs)

    # -- what the model sees ------------------------------------------------------------------------
    @property
    def current_version(self) -> int | None:
        """The version in service (None before the first one)."""
        return self._serving_version

    def params(self) -> Any:
        """The parameters of the version in service, as a pytree shaped like ``specs``: global
        ``jax.Array`` for real shardings, else this rank's shard (a list if it holds several)."""
        self._check_open("params")
        with self._cond:
            if self._serving_slot is None:
                raise RuntimeError("no version is in service yet (wait for one first)")
            return self._slot_params(self._serving_slot)

    @contextlib.contextmanager
    def hold(self) -> Iterator[tuple[int, Any]]:
        """``with sub.hold() as (version, params):`` keeps that version's buffers from being
        rewritten until the block ends, even if :meth:`refresh` switches meanwhile."""
        self._check_open("hold")
        with self._cond:
            if self._serving_slot is None:
                raise RuntimeError("no version is in service yet (wait for one first)")
            slot = self._serving_slot
            self._leases[slot] += 1
            v, p = self._serving_version, self._slot_params(slot)
        try:
            yield v, p
        finally:
            with self._cond:
                self._leases[slot] -= 1
                self._serve_requests()  # a push waiting for this buffer may go now
                self._make_offers()

    def _slot_params(self, slot: int) -> Any:
        cached = self._params_cache.get(slot)
        if cached is not None:
            return cached
        import jax

        def assemble(path: str, spec: Any) -> Any:
            di = self.plan.dst.index(path)
            t = self.plan.dst.tensors[di]
            mine = [(l, self.plan.buffer_id(self.rank, di, l)) for r, l, _ in t.shards if r == self.rank]
            arrays = [self._arrays[slot][b] for _, b in mine]
            sh = getattr(spec, "sharding", None)
            if sh is not None and not isinstance(sh, MeshSharding) and not is_abstract(sh) and arrays:
                return jax.make_array_from_single_device_arrays(t.shape, sh, arrays)
            if not arrays:
                return None
            return arrays[0] if len(arrays) == 1 else arrays

        def build(kp: Any, leaf: Any) -> Any:
            path = jax.tree_util.keystr(kp)
            if isinstance(leaf, Fp8):
                return Fp8(assemble(path, leaf.weight), assemble(path + ".scale", leaf.scale), leaf.block)
            return assemble(path, leaf)

        out = jax.tree_util.tree_map_with_path(build, self._specs, is_leaf=lambda x: isinstance(x, (Fp8, TensorSpec)))
        self._params_cache[slot] = out
        return out

    # -- switching versions -------------------------------------------------------------------------
    def refresh(self, timeout: float = 30.0) -> int | None:
        """Take the newest version that landed on every subscriber rank into service; returns the
        version in service. With several subscriber ranks the switch is decided in a round of
        status messages, so every rank switches at the same call: a rank holding a landed version
        that is newer than the one in service starts a round and waits (at most ``timeout``) for
        every other rank's status; a rank with nothing to switch to answers a round at once on its
        own (its status cannot lead to a switch), so calls need not match one for one. A round that
        timed out is finished by the next call. Errors noticed in the background (a publisher with
        another plan said hello) are raised here, after the round."""
        timeout = check_timeout("timeout", timeout)
        self._check_open("refresh")
        return self._refresh(timeout, raise_errors=True)

    def _refresh(self, timeout: float, *, raise_errors: bool) -> int | None:
        if self.plan.num_dst_ranks <= 1:
            with self._cond:
                self._poll_attempt(time.monotonic())
                a = self._attempt
                if a is not None and a.complete_at is not None:
                    self._switch(a)
            if raise_errors:
                self._raise_errors()
            return self._serving_version
        if self._peers is None:
            raise RuntimeError("this subscriber has peers: call set_peers() or announce() first")
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._pending_round is None:
                self._poll_attempt(time.monotonic())
                k = self._done_round + 1
                if self._candidate() is None and not self._statuses.get(k):
                    pass  # nothing to decide and no peer asked: no round
                else:
                    self._pending_round = k
                    self._send_status(k)
            k = self._pending_round
        if k is not None:
            self._finish_round(k, deadline, timeout)
        if raise_errors:
            self._raise_errors()
        return self._serving_version

    def _candidate(self) -> int | None:
        """The landed version this rank could switch to (callers hold the lock)."""
        a = self._attempt
        return a.version if a is not None and a.complete_at is not None else None

    def _send_status(self, k: int) -> None:
        """Record and send this rank's status for round ``k`` (callers hold the lock)."""
        mine = RankStatus(self._serving_version, self._candidate(), self._missing_summary())
        self._statuses.setdefault(k, {})[self.rank] = mine
        msg = P.Status(k, self.rank, mine.serving, mine.candidate, mine.missing)
        for c in self._peers or ():
            if c is not None:
                try:
                    self._router.send(c, msg)
                except PeerDead:
                    pass  # its status never comes: the round times out naming the rank

    def _finish_round(self, k: int, deadline: float, timeout: float) -> None:
        with self._cond:
            while self._pending_round == k and len(self._statuses.get(k, {})) < self.plan.num_dst_ranks:
                left = deadline - time.monotonic()
                if left <= 0:
                    have = sorted(self._statuses.get(k, {}))
                    raise TimeoutError(f"weights subscriber rank {self.rank}: refresh round {k}: no status from "
                                       f"ranks {sorted(set(range(self.plan.num_dst_ranks)) - set(have))} within "
                                       f"{timeout} s (they hold the same landed version and must call refresh/wait "
                                       "too)")
                self._cond.wait(min(left, 0.05))
            if self._pending_round == k:  # not decided meanwhile (an answered round ends on its own)
                self._decide_round(k)

    def _decide_round(self, k: int) -> None:
        """Every status of round ``k`` is in: take the round's decision (callers hold the lock)."""
        with self._cond:
            st = self._statuses.pop(k)
            self._last_statuses = st
            for old in [x for x in self._statuses if x < k]:
                del self._statuses[old]
            sets = [{s.serving, s.candidate} - {None} for s in st.values()]
            common = set.intersection(*sets) if sets else set()
            target = max(common) if common else None
            a = self._attempt
            if target is not None and target != self._serving_version and a is not None \
                    and a.version == target and a.complete_at is not None:
                self._switch(a)
            self._pending_round = self._auto_round = None
            self._done_round = k
            self._serve_requests()  # a request waiting for this round's decision
            self._make_offers()
            self._cond.notify_all()

    def _answer_round(self, k: int) -> None:
        """A peer started round ``k`` while this rank is in no round: answer it at once when this rank
        has nothing to switch to (the round then decides no switch everywhere). Callers hold the lock."""
        if self._pending_round is not None or k != self._done_round + 1 or self._peers is None:
            return
        self._poll_attempt(time.monotonic())
        if self._candidate() is not None:
            return  # this rank's application joins the round at its next refresh/wait
        self._send_status(k)
        self._pending_round = self._auto_round = k
        self._maybe_end_answered_round()

    def _maybe_end_answered_round(self) -> None:
        k = self._auto_round
        if k is not None and self._pending_round == k and len(self._statuses.get(k, {})) == self.plan.num_dst_ranks:
            self._decide_round(k)

    def _switch(self, a: Attempt) -> None:
        self._serving_slot, self._serving_version = a.slot, a.version
        self._attempt = None
        for src in a.sources:  # its publishers learn that their version is in service
            pub = self._pubs.get(src)
            if pub is not None:
                self._reply(pub.contact, P.InService(self.rank, a.version))
        self._cond.notify_all()
        self._make_offers()  # the copy now out of service can take the next push at once

    def wait(self, version: int, timeout: float = 30.0) -> int:
        """Block until ``version`` (or a newer one) is in service; returns the version in service.
        Collective like :meth:`refresh`. ``TimeoutError`` names what is missing: the sources whose
        writes did not all arrive (with counts) and the tensors they carry; ``PeerDead`` (within
        ``liveness_s``) when a source of the version being collected died. Errors noticed in the
        background are left for :meth:`refresh`."""
        version = check_int("version", version)
        timeout = check_timeout("timeout", timeout)
        self._check_open("wait")
        if self._serving_version is not None and self._serving_version >= version:
            return self._serving_version  # no round needed: never waits on the other ranks
        deadline = time.monotonic() + timeout
        while True:
            self._raise_dead(version, timeout)
            left = deadline - time.monotonic()
            try:
                v = self._refresh(max(left, 0.0), raise_errors=False)
            except TimeoutError as e:
                raise TimeoutError(self._missing_report(version, timeout, str(e))) from None
            if v is not None and v >= version:
                return v
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(self._missing_report(version, timeout))
            self._await_change(min(left, 0.02))

    def _raise_dead(self, version: int, timeout: float) -> None:
        """PeerDead when a source this rank still needs for the version being collected is dead."""
        with self._cond:
            a = self._attempt
            if a is None or a.complete_at is not None:
                return
            dead = {p: why for p, why in self._dead_sources.items()
                    if p in self._sources and (a.sources.get(p) is None or a.sources[p].complete_at is None)}
        if dead:
            who = "; ".join(f"source {p} at {self._pubs[p].contact.address} is dead ({why})" for p, why in dead.items())
            raise PeerDead(self._missing_report(version, timeout, who))

    def _await_change(self, span: float) -> None:
        """Up to ``span`` seconds: while a push is being collected, block on the counter of a source
        whose writes are not all in (for at most ``poll_s``, so that messages are looked at too);
        otherwise wait for a message. Returns early once the push is complete or a message changed
        something (the condition is notified)."""
        end = time.monotonic() + span
        with self._cond:
            while True:
                now = time.monotonic()
                a = self._attempt
                collecting = a is not None and a.complete_at is None
                if collecting:
                    self._poll_attempt(now)
                    if a.complete_at is not None:
                        return
                if now >= end:
                    return
                st = None
                if collecting:  # a source granted and not complete that nobody blocks on yet
                    st = next((x for x in a.sources.values() if x.complete_at is None and not x.waiter), None)
                if st is None:
                    if self._cond.wait(min(end - now, self._poll if collecting else end - now)):
                        return
                    continue
                st.waiter = True
                break
        # Blocking in the engine's counter wakes this thread as the last write lands (the engine
        # polls at full rate meanwhile), instead of a poll_s tick later; the lock stays free for
        # the mailbox's handlers.
        took = False
        try:
            st.counter.wait(st.expected, max(1e-4, min(end - now, self._poll)))
            took = True
        except (TimeoutError, fabric.TransferError):
            pass  # not all in yet; an engine error is reported by the checks around the wait
        finally:
            with self._cond:
                st.waiter = False
                if took:
                    self._source_complete(a, st, time.monotonic())

    def _missing_summary(self) -> str:
        a = self._attempt
        if a is None:
            return "no push in progress"
        parts = []
        for p in self._sources:
            st = a.sources.get(p)
            if st is None:
                parts.append(f"source {p}: no request for version {a.version}")
            elif st.complete_at is None:
                parts.append(f"source {p}: {st.arrived()} of {st.expected} writes")
        return f"version {a.version}: " + ("; ".join(parts) if parts else "complete")

    def _missing_report(self, version: int, timeout: float, extra: str = "") -> str:
        now = time.monotonic()
        with self._cond:
            lines = [f"weights: version {version} not in service at subscriber rank {self.rank} after {timeout} s "
                     f"(serving {self._serving_version})"]
            a = self._attempt
            if a is None:
                lines.append(f"no push is in progress here (sources: {self._sources}; none asked for a version "
                             f"newer than {self._serving_version})")
            else:
                lines.append(f"collecting version {a.version} into buffer {a.slot}")
                for p in self._sources:
                    st = a.sources.get(p)
                    tensors = self.plan.tensors_between(p, self.rank)
                    shown = "; ".join(tensors[:6]) + (f"; and {len(tensors) - 6} more" if len(tensors) > 6 else "")
                    if st is None:
                        lines.append(f"source {p} has not asked to push version {a.version} (what it writes here: "
                                     f"{shown})")
                    elif st.complete_at is None:
                        lines.append(f"source {p}: {st.arrived()} of {st.expected} writes arrived (epoch {st.epoch}, "
                                     f"granted {now - st.granted_at:.1f} s ago, last arrival "
                                     f"{now - st.last_progress:.1f} s ago); what it writes here: {shown}")
            for r, s in sorted(self._last_statuses.items()):
                if r != self.rank:
                    lines.append(f"peer rank {r}: serving {s.serving}, {s.missing}")
            if extra:
                lines.append(extra)
        return "\n  ".join(lines)

    def status(self) -> dict:
        """Snapshot: version in service, the push being collected and each source's progress."""
        self._check_open("status")
        with self._cond:
            self._poll_attempt(time.monotonic())
            a = self._attempt
            out = {"rank": self.rank, "serving": self._serving_version, "leases": list(self._leases)}
            out["offers"] = {p: {"slot": o.slot, "epoch": o.epoch} for p, o in self._offers.items()}
            if a is not None:
                out["collecting"] = {"version": a.version, "slot": a.slot, "complete": a.complete_at is not None,
                                     "sources": {p: {"epoch": st.epoch, "expected": st.expected,
                                                     "arrived": st.arrived(), "complete": st.complete_at is not None}
                                                 for p, st in a.sources.items()}}
            return out

    def _raise_errors(self) -> None:
        with self._cond:
            if self._errors:
                e, self._errors = self._errors[0], self._errors[1:]
                raise ValueError(e)

    # -- messages (mailbox reader thread) and ticks ------------------------------------------------------
    def _reply(self, to: Contact, msg: Any) -> None:
        try:
            self._router.send(to, msg)
        except (PeerDead, fabric.TransferError, ValueError):
            pass  # the publisher is gone; it will time out on its side

    def _on_message(self, sender: Contact, m: Any) -> None:
        if isinstance(m, P.Hello):
            self._on_hello(sender, m)
        elif isinstance(m, P.PushRequest):
            with self._cond:
                self._requests.append(PendingRequest(sender, m))
                self._serve_requests()
        elif isinstance(m, P.PushClaim):
            with self._cond:
                self._reply(sender, self._claim(m))
        elif isinstance(m, P.Status):
            with self._cond:
                if m.round > self._done_round:  # older rounds were decided already
                    self._statuses.setdefault(m.round, {})[m.rank] = RankStatus(m.serving, m.candidate, m.missing)
                    self._answer_round(m.round)
                    self._maybe_end_answered_round()
                self._cond.notify_all()

    def _on_hello(self, sender: Contact, m: P.Hello) -> None:
        fp = self.plan.fingerprint
        if m.fingerprint != fp:
            reason = (f"plan fingerprint mismatch: publisher rank {m.src} runs plan {m.fingerprint}, subscriber rank "
                      f"{self.rank} runs {fp}")
            with self._cond:
                self._errors.append(reason)
            self._reply(sender, P.Refuse(fp, self.rank, reason))
            return
        if not 0 <= m.src < self.plan.num_src_ranks:
            self._reply(sender, P.Refuse(fp, self.rank, f"bad source rank {m.src}"))
            return
        with self._cond:
            old = self._pubs.get(m.src)
            offer = self._offers.get(m.src)
            if offer is not None and offer.session != m.session:
                # An earlier session (a restarted or reconnecting publisher) may have written under
                # it: fence, as for an abandoned grant, before this source is granted again.
                del self._offers[m.src]
                self._fence_until[m.src] = max(self._fence_until.get(m.src, 0.0), time.monotonic() + self.fence_s)
            if old is None or old.session != m.session:
                self._pubs[m.src] = PublisherInfo(sender, max(1, m.domains), PeerProbe(sender, self.liveness_s),
                                                  m.session)
            self._dead_sources.pop(m.src, None)  # a (re)started publisher
        # Descriptors of every buffer this source writes here, both copies; in parts that fit the
        # engine's control-message size (a big model has thousands of buffers).
        ids = self.plan.buffer_ids_between(m.src, self.rank)
        entries = [(b, bytes(self._regions[0][b].descriptor), bytes(self._regions[1][b].descriptor)) for b in ids]
        per = max(1, P.WELCOME_BYTES // max(1, max((len(d0) + len(d1) + 16 for _, d0, d1 in entries), default=1)))
        parts = [entries[i:i + per] for i in range(0, len(entries), per)] or [[]]
        for i, part in enumerate(parts):
            self._reply(sender, P.Welcome(fp, self.rank, i, len(parts), [b for b, _, _ in part],
                                          tuple(d for _, d0, d1 in part for d in (d0, d1))))
        with self._cond:
            self._make_offers()  # the first push needs no grant round trip either

    def _tick(self, now: float) -> None:
        with self._cond:
            if self._closed:
                return
            self._poll_attempt(now)
            self._serve_requests()
            self._make_offers()  # e.g. a fence ended
            a = self._attempt
            watch = {} if a is None or a.complete_at is not None else {
                p: self._pubs[p].probe for p in self._sources
                if p in self._pubs and p not in self._dead_sources
                and (a.sources.get(p) is None or a.sources[p].complete_at is None)}
        for p, probe in watch.items():
            why = probe.check(self._router.mailbox, now)
            if why:
                with self._cond:
                    self._dead_sources[p] = why
                    self._cond.notify_all()

    # -- collecting a version and granting pushes (callers hold self._cond) ------------------------------
    def _poll_attempt(self, now: float) -> None:
        """Take note of what arrived for the version being collected (when, for the fence) and
        whether every source's writes are in."""
        a = self._attempt
        if a is None or a.complete_at is not None:
            return
        for p, st in a.sources.items():
            if st.complete_at is not None:
                continue
            total = st.counter.total
            if total != st.last_total:
                st.last_total, st.last_progress = total, now
                pub = self._pubs.get(p)
                if pub is not None:
                    pub.probe.heard(now)  # its writes arrive: it is alive
            if not st.waiter and st.counter.credits >= st.expected:  # (a waiter takes them itself)
                st.counter.wait(st.expected, 1.0)
                self._source_complete(a, st, now)

    def _source_complete(self, a: Attempt, st: SourceProgress, now: float) -> None:
        """Every write of one source is in (its credits taken): the attempt is complete once every
        source's are. Callers hold the lock."""
        st.complete_at = now
        if a.complete_at is None and all(p in a.sources and a.sources[p].complete_at is not None
                                         for p in self._sources):
            a.complete_at = now
            self._cond.notify_all()

    def _serve_requests(self) -> None:
        if not self._requests or self._closed:
            return
        keep = []
        wake: float | None = None
        for req in self._requests:
            try:
                answer = self._decide(req.msg)
            except Exception as e:  # noqa: BLE001
                answer = P.Reject(self.rank, req.msg.request, f"{type(e).__name__}: {e}")
            if isinstance(answer, P.Pending):
                if req.told != answer.reason:
                    req.told = answer.reason
                    self._reply(req.sender, answer)
                keep.append(req)
                fence = self._fence_until.get(req.msg.src, 0.0) - time.monotonic()
                if fence > 0:
                    wake = fence if wake is None else min(wake, fence)
                continue
            self._reply(req.sender, answer)
        self._requests = keep
        if wake is not None:  # a fence ends: answer then, not at the next tick
            self._router.mailbox.call_later(wake + 1e-3, self._kick)

    def _kick(self) -> None:
        with self._cond:
            self._serve_requests()

    def _decide(self, m: P.PushRequest) -> Any:
        """Answer one push request: Grant / Done / Reject / Pending."""
        src, version, req = m.src, m.version, m.request
        if src not in self._pubs:
            return P.Reject(self.rank, req, f"source rank {src} did not connect (hello) first")
        if src not in self._sources:
            return P.Reject(self.rank, req, f"source rank {src} has nothing to write to subscriber rank {self.rank}")
        if self._serving_version is not None and version <= self._serving_version:
            return P.Reject(self.rank, req, f"version {version} is not newer than version {self._serving_version} in "
                                            f"service at subscriber rank {self.rank}")
        now = time.monotonic()
        self._poll_attempt(now)
        a = self._attempt
        if a is not None and version < a.version:
            return P.Reject(self.rank, req, f"subscriber rank {self.rank} is collecting the newer version {a.version}")
        if a is not None and version > a.version:
            if a.complete_at is not None and self._pending_round is not None:
                return P.Pending(self.rank, req, f"version {a.version} landed and a refresh round is deciding on it")
            self._abandon(a, version)
            a = None
        if a is None:
            slot = self._standby_slot()
            if self._leases[slot]:
                return P.Pending(self.rank, req, f"buffer {slot} (version before the one in service) is held by "
                                                 f"{self._leases[slot]} reader(s) (Subscriber.hold)")
            a = self._attempt = Attempt(version, slot, now)
            self._params_cache.pop(slot, None)
        st = a.sources.get(src)
        if st is not None and st.complete_at is not None:
            return P.Done(self.rank, req, version)
        if st is not None:  # a re-push of this version by this source: fence its earlier writes
            self._fence_until[src] = max(self._fence_until.get(src, 0.0), st.last_progress + self.fence_s)
        wait_s = self._fence_until.get(src, 0.0) - now
        if wait_s > 0:
            return P.Pending(self.rank, req, f"fencing source {src} for {wait_s:.1f} s more (its previous push did "
                                             "not complete)")
        offer = self._offers.get(src)
        if offer is not None and offer.slot == a.slot:
            # The publisher asked before our offer reached it (or it does not use offers): grant
            # the offer's epoch; the grant's serial tells the publisher that the offer is used.
            del self._offers[src]
        else:
            offer = self._reserve_epoch(src, a.slot)
        return self._join(a, src, offer, req, version, now)

    def _standby_slot(self) -> int:
        """The copy not in service: where the next version lands (callers hold the lock)."""
        return 0 if self._serving_slot is None else 1 - self._serving_slot

    def _reserve_epoch(self, src: int, slot: int) -> StandingGrant:
        """The next epoch of ``src``, its counter drained of arrivals from 4096 epochs ago."""
        serial = self._next_epoch.get(src, 0)
        self._next_epoch[src] = serial + 1
        epoch = serial % P.EPOCH_MOD
        imm = P.imm_value(self.imm_tag, epoch, src)
        c = self.engine.imm_counter(imm)
        stale = c.credits
        if stale > 0:
            c.wait(stale, 1.0)
        return StandingGrant(self._pubs[src].session, serial, slot, epoch, imm, c, c.total)

    def _join(self, a: Attempt, src: int, g: StandingGrant, req: int, version: int, now: float) -> P.Grant:
        """``src`` takes part in attempt ``a`` under epoch reservation ``g`` (writes counted from its base)."""
        a.sources[src] = SourceProgress(g.epoch, g.imm, g.counter,
                                        self.plan.expected_imms(src, self.rank, self._pubs[src].domains),
                                        now, g.base_total, g.base_total, now)
        # A wait() that started before this push must now block on the new source's counter (it
        # would otherwise sleep out its span and notice the push only then).
        self._cond.notify_all()
        return P.Grant(self.rank, req, version, a.slot, g.epoch, g.serial)

    def _make_offers(self) -> None:
        """Offer every connected source a standing grant for its next push, while nothing is being
        collected into the copy not in service and no reader holds it. Until the source uses it,
        that copy cannot go into service (that takes every source's writes), so the offer stays
        valid however long it waits. Callers hold the lock."""
        if self._closed or self._attempt is not None:
            return
        slot = self._standby_slot()
        if self._leases[slot]:
            return
        now = time.monotonic()
        for src in self._sources:
            pub = self._pubs.get(src)
            if pub is None or src in self._dead_sources or src in self._offers:
                continue
            if self._fence_until.get(src, 0.0) > now:
                continue  # the tick offers once the fence ends
            g = self._offers[src] = self._reserve_epoch(src, slot)
            self._reply(pub.contact, P.Offer(self.rank, pub.session, g.serial, slot, g.epoch, self._serving_version))

    def _claim(self, m: P.PushClaim) -> Any:
        """A push under a standing grant: its writes are already on their way. Grant (the same
        slot and epoch, as a receipt) or Reject; a rejected claim fences the source, since its
        writes may still land in the copy not in service. Callers hold the lock."""
        src, version, req = m.src, m.version, m.request
        now = time.monotonic()
        g, pub = self._offers.get(src), self._pubs.get(src)
        why = None
        if g is None or pub is None or g.session != m.session or g.serial != m.serial:
            why = (f"standing grant {m.serial} of source {src} is no longer valid at subscriber rank {self.rank} "
                   "(the publisher reconnected or restarted since); push again")
        else:
            del self._offers[src]
            self._poll_attempt(now)
            a = self._attempt
            if self._serving_version is not None and version <= self._serving_version:
                why = (f"version {version} is not newer than version {self._serving_version} in service at subscriber "
                       f"rank {self.rank}")
            elif a is not None and version < a.version:
                why = f"subscriber rank {self.rank} is collecting the newer version {a.version}"
            elif a is not None and version > a.version and a.complete_at is not None and self._pending_round is not None:
                why = f"version {a.version} landed and a refresh round is deciding on it"
            else:
                if a is not None and version > a.version:
                    self._abandon(a, version)
                    a = None
                if a is None:
                    a = self._attempt = Attempt(version, g.slot, now)
                    self._params_cache.pop(g.slot, None)
                if a.slot != g.slot or src in a.sources:  # cannot happen while the offer was outstanding
                    why = f"internal: offer for buffer {g.slot} does not match the version being collected"
                else:
                    return self._join(a, src, g, req, version, now)
        self._fence_until[src] = max(self._fence_until.get(src, 0.0), now + self.fence_s)
        return P.Reject(self.rank, req, why)

    def _abandon(self, a: Attempt, newer: int) -> None:
        for p, st in a.sources.items():
            if st.complete_at is None:
                self._fence_until[p] = max(self._fence_until.get(p, 0.0), st.last_progress + self.fence_s)
            pub = self._pubs.get(p)
            if pub is not None:  # its publishers learn that this version will never be in service here
                self._reply(pub.contact, P.Refused(self.rank, a.version, f"replaced by version {newer} at subscriber "
                                                                          f"rank {self.rank} before it was complete"))
        if self._attempt is a:
            self._attempt = None

    def close(self) -> None:
        """Detach from the engine's mailbox and (if it made it) close the engine. Buffers are released."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            _lifetime.closed(self)
            self._cond.notify_all()
        self._router.detach(self)
        if self._own_engine:
            self.engine.close()
        self._regions = [[], []]
        self._params_cache.clear()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
