"""The kv state machines as pure transitions: no engine, no threads, no clock of their own.

**Decode request.** A :class:`Progress` (frozen) is the whole protocol state of one request; each
transition takes it and the facts of the moment (the time, the credits visible on its two imm
counters) and returns the next :class:`Progress` and the :data:`Effect` s the caller must carry out,
in order: take credits, send CANCEL, check the payload, end (free or quarantine the pages).
``DecodeSide`` is the only caller in production; ``tests/test_kv_state.py`` drives the transitions
directly.

    PENDING --all writes counted, payload ok--> READY
    PENDING --begin_end, stream never opened--> CANCELLED/FAILED (pages free at once)
    PENDING --begin_end, stream open--> ending: CANCEL sent, waiting for FENCED
    ending --FENCED, every posted write counted--> CANCELLED/FAILED (pages free)
    ending --fence says writes failed / unknown stream, extra arrivals, no fence in time--> quarantined
    PENDING --FENCED unasked (abort)--> ending, as above, ending FAILED
    PENDING --peer dead, payload invalid--> FAILED, quarantined

**Prefill stream.** :data:`STREAM_TRANSITIONS` maps (state, event) to the next state; events that
are not in the table change nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Union

from jax_garden.kv.protocol import FenceFlags

KIND_DATA, KIND_PAYLOAD = 0, 1


class State(enum.Enum):
    """A decode request's state."""

    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@dataclasses.dataclass(frozen=True)
class Fence:
    """What a FENCED message proves: the prefill side posted these many imm-carrying writes (data,
    payload) for the stream and will post nothing more."""

    posted: tuple[int, int]
    flags: FenceFlags = FenceFlags.NONE
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Progress:
    """The protocol state of one decode request."""

    deadline: float = math.inf
    state: State = State.PENDING
    reason: str = ""
    opened: bool = False                          # a prefill stream was accepted
    expected: tuple[int, int] | None = None       # imm writes to count: data, payload
    taken: tuple[int, int] = (0, 0)               # counted so far
    ending: tuple[State, str] | None = None       # cancel / timeout / abort under way: final state
    end_deadline: float = 0.0                     # the fence and drain must be done by then
    fence: Fence | None = None
    quarantined: bool = False

    def describe(self) -> str:
        if self.expected is None:
            return "no prefill stream opened yet"
        return (f"{self.taken[0]} of {self.expected[0]} data writes and {self.taken[1]} of {self.expected[1]} "
                "payload writes counted")


# ---- effects: what the caller does, in order --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Take:
    """Take ``n`` credits (they are there) from the counter of ``kind``."""

    kind: int
    n: int


@dataclasses.dataclass(frozen=True)
class SendCancel:
    """Send CANCEL to the prefill side of the stream; if that fails, apply :func:`cancel_failed`."""


@dataclasses.dataclass(frozen=True)
class CheckPayload:
    """Every write was counted: check the payload slot, then apply :func:`payload_checked`."""


@dataclasses.dataclass(frozen=True)
class Ready:
    """The request is READY: its slot is free; its pages stay with it until ``release()``."""


@dataclasses.dataclass(frozen=True)
class Ended:
    """The request ended otherwise. ``clean``: every posted write was accounted for, pages and slot
    are free now. ``quarantine``: they are held for the quarantine time, then freed. Neither: the
    engine is gone, nothing is freed."""

    clean: bool
    quarantine: bool = False


Effect = Union[Take, SendCancel, CheckPayload, Ready, Ended]
Step = tuple[Progress, tuple]


# ---- transitions -------------------------------------------------------------------------------------

def finish(p: Progress, state: State, reason: str, *, clean: bool) -> Step:
    """End a request whose posted writes are all accounted for (clean) or cannot matter (engine gone)."""
    if p.state is not State.PENDING:
        return p, ()
    return dataclasses.replace(p, state=state, reason=reason), (Ended(clean=clean),)


def quarantine(p: Progress, state: State, reason: str) -> Step:
    """End a request whose writes cannot all be accounted for: pages and slot are held."""
    if p.state is not State.PENDING:
        return p, ()
    return dataclasses.replace(p, state=state, reason=reason, quarantined=True), (Ended(clean=False, quarantine=True),)


def opened(p: Progress, expected: tuple[int, int]) -> Progress:
    """The decode side accepted a stream that will post ``expected`` imm writes."""
    return dataclasses.replace(p, opened=True, expected=(int(expected[0]), int(expected[1])))


def begin_end(p: Progress, final: State, reason: str, now: float, fence_timeout: float) -> Step:
    """Start ending a PENDING request: without an open stream it ends at once (any later OPEN is
    rejected); with one, CANCEL goes to the prefill side and the end waits for its fence."""
    if p.state is not State.PENDING or p.ending is not None:
        return p, ()
    if not p.opened:
        return finish(p, final, reason, clean=True)
    return dataclasses.replace(p, ending=(final, reason), end_deadline=now + fence_timeout), (SendCancel(),)


def cancel_failed(p: Progress, error: str) -> Step:
    """CANCEL could not be sent: no fence can come."""
    reason = p.ending[1] if p.ending else "cancelled"
    return quarantine(p, State.FAILED, f"{reason}; CANCEL could not be sent ({error}), pages quarantined")


def fenced(p: Progress, fence: Fence, now: float, fence_timeout: float) -> Progress:
    """FENCED arrived (asked for, or unasked: the prefill side aborted the stream)."""
    if p.state is not State.PENDING:
        return p
    if p.ending is None:
        p = dataclasses.replace(p, ending=(State.FAILED, f"the prefill side aborted the stream: {fence.reason}"),
                                end_deadline=now + fence_timeout)
    return dataclasses.replace(p, fence=fence)


def counted(p: Progress, kind: int, n: int) -> Progress:
    """``n`` credits of ``kind`` were taken by a blocking wait (outside :func:`advance`)."""
    t = list(p.taken)
    t[kind] += n
    return dataclasses.replace(p, taken=(t[0], t[1]))


def _take(p: Progress, credits: tuple[int, int], limit: tuple[int, int]) -> tuple[Progress, tuple, tuple[int, int]]:
    taken, effects, left = list(p.taken), [], list(credits)
    for k in (KIND_DATA, KIND_PAYLOAD):
        n = min(max(credits[k], 0), limit[k] - taken[k])
        if n > 0:
            taken[k] += n
            left[k] -= n
            effects.append(Take(k, n))
    return dataclasses.replace(p, taken=(taken[0], taken[1])), tuple(effects), (left[0], left[1])


def advance(p: Progress, now: float, credits: tuple[int, int], fence_timeout: float, *,
            can_take: bool = True) -> Step:
    """Count what arrived (``credits`` visible on the data and payload counters; ``can_take=False``
    while another thread is taking them) and move on: READY once everything expected was counted,
    the end of an ending request once its fence is drained, timeouts."""
    if p.state is not State.PENDING:
        return p, ()
    usable = credits if can_take else (0, 0)
    if p.ending is None:
        effects: tuple = ()
        if p.expected is not None:
            p, effects, _ = _take(p, usable, p.expected)
            if p.taken == p.expected:
                return p, effects + (CheckPayload(),)
        if now >= p.deadline:
            p, more = begin_end(p, State.FAILED, f"not READY within its deadline ({p.describe()})", now, fence_timeout)
            return p, effects + more
        return p, effects
    final, reason = p.ending
    effects = ()
    if p.fence is not None:
        fence = p.fence
        if fence.flags & (FenceFlags.FAILED_WRITES | FenceFlags.UNKNOWN):
            what = ("some writes failed at the sender" if fence.flags & FenceFlags.FAILED_WRITES
                    else "the prefill side lost the stream")
            return quarantine(p, final, f"{reason}; {what}, pages quarantined")
        p, effects, left = _take(p, usable, fence.posted)
        if p.taken == fence.posted:
            extra = left if can_take else credits
            if any(extra):
                p, end = quarantine(p, final, f"{reason}; {list(extra)} more writes than posted arrived, pages "
                                              "quarantined")
            else:
                p, end = finish(p, final, reason, clean=True)
            return p, effects + end
    if now >= p.end_deadline:
        if p.fence is None:
            why = f"{reason}; the prefill side did not confirm the fence within {fence_timeout} s"
        else:
            why = (f"{reason}; {p.taken[0]}/{p.fence.posted[0]} data and {p.taken[1]}/{p.fence.posted[1]} payload "
                   "writes arrived before the drain deadline")
        p, end = quarantine(p, State.FAILED, why + ", pages quarantined")
        return p, effects + end
    return p, effects


def payload_checked(p: Progress, problem: str | None) -> Step:
    """After :class:`CheckPayload`: READY, or FAILED (quarantined) when the payload slot is invalid."""
    if p.state is not State.PENDING:
        return p, ()
    if problem:
        return quarantine(p, State.FAILED, f"payload header invalid ({problem}): pages quarantined")
    return dataclasses.replace(p, state=State.READY), (Ready(),)


def peer_dead(p: Progress, peer: str, why: str, quarantine_s: float) -> Step:
    """The stream's prefill side (``peer``: its address) is unreachable: what it posted can no longer
    be accounted for."""
    return quarantine(p, State.FAILED, f"prefill side {peer} unreachable: {why}; pages quarantined for "
                                       f"{quarantine_s} s")


# ---- prefill streams ------------------------------------------------------------------------------------

class StreamState(enum.StrEnum):
    """A prefill stream's state (a str: ``stream.state == "done"`` works)."""

    OPENING = "opening"
    STREAMING = "streaming"
    FINISHED = "finished"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (StreamState.DONE, StreamState.CANCELLED, StreamState.FAILED)


class StreamEvent(enum.Enum):
    ACCEPT = "the decode side accepted the stream"
    REJECT = "the decode side rejected the stream"
    FINISH = "finish() posted everything"
    ALL_WRITTEN = "every write completed at the sender"
    CANCEL = "the decode side cancelled the stream"
    FAIL = "the stream failed here"


S, E = StreamState, StreamEvent
STREAM_TRANSITIONS: dict[tuple[StreamState, StreamEvent], StreamState] = {
    (S.OPENING, E.ACCEPT): S.STREAMING,
    (S.OPENING, E.REJECT): S.FAILED,
    (S.STREAMING, E.FINISH): S.FINISHED,
    (S.FINISHED, E.ALL_WRITTEN): S.DONE,
    **{(s, E.CANCEL): S.CANCELLED for s in (S.OPENING, S.STREAMING, S.FINISHED)},
    **{(s, E.FAIL): S.FAILED for s in (S.OPENING, S.STREAMING, S.FINISHED)},
}
del S, E


def stream_next(state: StreamState, event: StreamEvent) -> StreamState | None:
    """The state after ``event``, or None when the event changes nothing in ``state``."""
    return STREAM_TRANSITIONS.get((state, event))
