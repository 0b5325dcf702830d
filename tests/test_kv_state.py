"""The kv state machines as pure transitions (jax_garden.kv.state), driven without an engine: every
path of a decode request to READY, CANCELLED or FAILED (fenced, quarantined), and the prefill
stream's transition table."""

from __future__ import annotations

import pytest

from jax_garden.kv import protocol as P
from jax_garden.kv import state as sm
from jax_garden.kv.state import State, StreamEvent, StreamState

T0 = 100.0
FENCE = 5.0


def opened(expected=(6, 1), deadline=T0 + 10):
    return sm.opened(sm.Progress(deadline=deadline), expected)


def test_ready_after_every_write_is_counted():
    p = opened()
    p, eff = sm.advance(p, T0, (4, 0), FENCE)
    assert eff == (sm.Take(0, 4),) and p.taken == (4, 0) and p.state is State.PENDING
    p, eff = sm.advance(p, T0, (5, 1), FENCE)  # more arrived than expected: only what is expected is taken
    assert eff == (sm.Take(0, 2), sm.Take(1, 1), sm.CheckPayload())
    p, eff = sm.payload_checked(p, None)
    assert p.state is State.READY and eff == (sm.Ready(),)
    assert sm.advance(p, T0 + 100, (9, 9), FENCE) == (p, ())  # an ended request never changes


def test_invalid_payload_quarantines():
    p, _ = sm.advance(opened((1, 1)), T0, (1, 1), FENCE)
    p, eff = sm.payload_checked(p, "magic 0x0")
    assert p.state is State.FAILED and p.quarantined and eff == (sm.Ended(clean=False, quarantine=True),)
    assert "payload header invalid (magic 0x0)" in p.reason


def test_cancel_before_the_stream_opened_frees_at_once():
    p, eff = sm.begin_end(sm.Progress(deadline=T0 + 10), State.CANCELLED, "cancelled", T0, FENCE)
    assert p.state is State.CANCELLED and eff == (sm.Ended(clean=True),)


def test_cancel_with_an_open_stream_waits_for_the_fence_and_the_drain():
    p, _ = sm.advance(opened(), T0, (2, 0), FENCE)
    p, eff = sm.begin_end(p, State.CANCELLED, "cancelled", T0, FENCE)
    assert eff == (sm.SendCancel(),) and p.state is State.PENDING and p.end_deadline == T0 + FENCE
    assert sm.begin_end(p, State.FAILED, "again", T0, FENCE) == (p, ())  # one ending at a time
    p, eff = sm.advance(p, T0 + 1, (1, 0), FENCE)
    assert eff == () and p.taken == (2, 0)  # no fence yet: nothing is taken, nothing ends
    p = sm.fenced(p, sm.Fence((4, 0)), T0 + 1, FENCE)
    p, eff = sm.advance(p, T0 + 1, (1, 0), FENCE)
    assert eff == (sm.Take(0, 1),) and p.state is State.PENDING  # 3 of 4 posted writes counted
    p, eff = sm.advance(p, T0 + 1, (1, 0), FENCE)
    assert eff == (sm.Take(0, 1), sm.Ended(clean=True)) and p.state is State.CANCELLED and p.reason == "cancelled"


def test_more_arrivals_than_posted_quarantine():
    p, _ = sm.begin_end(opened(), State.CANCELLED, "cancelled", T0, FENCE)
    p = sm.fenced(p, sm.Fence((2, 0)), T0, FENCE)
    p, eff = sm.advance(p, T0, (3, 0), FENCE)
    assert eff == (sm.Take(0, 2), sm.Ended(clean=False, quarantine=True))
    assert p.state is State.CANCELLED and p.quarantined and "[1, 0] more writes than posted" in p.reason


@pytest.mark.parametrize("flags,why", [(P.FenceFlags.FAILED_WRITES, "some writes failed"),
                                       (P.FenceFlags.UNKNOWN, "lost the stream")])
def test_a_fence_that_proves_nothing_quarantines(flags, why):
    p, _ = sm.begin_end(opened(), State.CANCELLED, "cancelled", T0, FENCE)
    p, eff = sm.advance(sm.fenced(p, sm.Fence((2, 0), flags), T0, FENCE), T0, (2, 0), FENCE)
    assert p.quarantined and why in p.reason and eff == (sm.Ended(clean=False, quarantine=True),)


def test_unasked_fence_is_an_abort():
    p = sm.fenced(opened(), sm.Fence((2, 1), P.FenceFlags.ABORT, "its program failed"), T0, FENCE)
    assert p.ending == (State.FAILED, "the prefill side aborted the stream: its program failed")
    p, eff = sm.advance(p, T0, (2, 1), FENCE)
    assert p.state is State.FAILED and not p.quarantined and eff[-1] == sm.Ended(clean=True)


def test_deadlines():
    p, eff = sm.advance(opened(deadline=T0), T0, (0, 0), FENCE)  # the request's deadline: cancel, FAILED
    assert eff == (sm.SendCancel(),) and p.ending[0] is State.FAILED and "deadline" in p.ending[1]
    p, eff = sm.advance(p, T0 + FENCE, (0, 0), FENCE)  # no fence by the end deadline: quarantined
    assert p.state is State.FAILED and p.quarantined and "did not confirm the fence" in p.reason
    p, eff = sm.advance(sm.Progress(deadline=T0), T0, (0, 0), FENCE)  # never opened: ends at once
    assert p.state is State.FAILED and eff == (sm.Ended(clean=True),)


def test_a_waiting_thread_keeps_the_credits():
    p, _ = sm.begin_end(opened(), State.CANCELLED, "cancelled", T0, FENCE)
    p = sm.fenced(p, sm.Fence((2, 0)), T0, FENCE)
    p, eff = sm.advance(p, T0, (2, 0), FENCE, can_take=False)
    assert eff == () and p.taken == (0, 0)
    p = sm.counted(p, 0, 2)  # the waiting thread took them
    p, eff = sm.advance(p, T0, (0, 0), FENCE, can_take=False)
    assert p.state is State.CANCELLED and eff == (sm.Ended(clean=True),)


def test_dead_peer_and_failed_cancel_quarantine():
    p, eff = sm.peer_dead(opened(), "tcp://10.0.0.1:5", "probe failed", 3.0)
    assert p.state is State.FAILED and p.quarantined and "prefill side tcp://10.0.0.1:5 unreachable: probe failed" in p.reason
    p, _ = sm.begin_end(opened(), State.CANCELLED, "cancelled", T0, FENCE)
    p, eff = sm.cancel_failed(p, "peer gone")
    assert p.state is State.FAILED and p.quarantined and "CANCEL could not be sent (peer gone)" in p.reason


def test_stream_transition_table():
    S, E = StreamState, StreamEvent
    for s in S:
        for e in E:
            nxt = sm.stream_next(s, e)
            if s.ended:
                assert nxt is None, (s, e)  # an ended stream never changes
    assert sm.stream_next(S.OPENING, E.ACCEPT) is S.STREAMING
    assert sm.stream_next(S.STREAMING, E.ACCEPT) is None
    assert sm.stream_next(S.STREAMING, E.FINISH) is S.FINISHED
    assert sm.stream_next(S.OPENING, E.FINISH) is None  # finish() before ACCEPT changes nothing
    assert sm.stream_next(S.FINISHED, E.ALL_WRITTEN) is S.DONE
    assert all(sm.stream_next(s, E.CANCEL) is S.CANCELLED for s in (S.OPENING, S.STREAMING, S.FINISHED))
    assert all(sm.stream_next(s, E.FAIL) is S.FAILED for s in (S.OPENING, S.STREAMING, S.FINISHED))
    assert S.DONE == "done" and f"{S.CANCELLED}" == "cancelled"  # str-valued, as before
