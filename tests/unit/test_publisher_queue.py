"""The publisher's pure rules (``autoserve_runtime.publish_queue``): what a JetStream reply
to a publish says, the order events are sent again in, the window and pause after a
transient failure, and backpressure instead of dropping."""

from __future__ import annotations

import json

import pytest

from autoserve_runtime.publish_queue import MAX_PAUSE, MIN_PAUSE, Answer, PublishQueue, classify


def error(code: int, err_code: int, description: str = "x") -> bytes:
    return json.dumps({"error": {"code": code, "err_code": err_code, "description": description}}).encode()


@pytest.mark.parametrize(
    ("data", "status", "answer"),
    [
        (b'{"stream":"S","seq":7}', None, Answer.STORED),
        (b'{"stream":"S","seq":7,"duplicate":true}', None, Answer.STORED),  # stored before: once
        (b"", "503", Answer.RETRY),  # no responders: the stream has no leader
        (error(503, 10008, "JetStream system temporarily unavailable"), None, Answer.RETRY),
        (error(500, 10118, "stream is offline"), None, Answer.RETRY),
        (error(500, 10194, "stream is offline: catching up"), None, Answer.RETRY),
        (error(409, 10158, "duplicate message id is in process"), None, Answer.RETRY),
        (error(400, 10005, "no suitable peers for placement"), None, Answer.RETRY),
        (error(400, 10054, "message size exceeds maximum allowed"), None, Answer.REJECTED),
        (error(400, 10060, "expected stream does not match"), None, Answer.REJECTED),
        (b'{"error": not json', None, Answer.RETRY),
        (b"", None, Answer.RETRY),  # nothing that says stored is taken as stored
        (b"+OK", "200", Answer.RETRY),
    ],
)
def test_only_a_pub_ack_means_stored(data: bytes, status: str | None, answer: Answer) -> None:
    assert classify(data, status)[0] is answer


def test_a_failed_publish_goes_back_to_its_place_ahead_of_newer_ones() -> None:
    queue: PublishQueue[str] = PublishQueue(limit=100, window=10)
    for name in "abcde":
        queue.add(name, 0.0)
    keys: dict[str, int] = {}
    for _ in range(3):
        key, name = queue.take(0.0)
        keys[name] = key
    assert queue.stored(keys["b"]) == "b"
    assert queue.failed(keys["c"], 1.0)
    assert queue.failed(keys["a"], 1.0)
    assert queue.ready(1.0) == pytest.approx(MIN_PAUSE * 2)  # two failures: the pause doubled
    later = 1.0 + MAX_PAUSE
    assert [queue.take(later)[1] for _ in range(4)] == ["a", "c", "d", "e"]
    assert queue.stats.retried == 2
    assert queue.stats.acked == 1


def test_after_a_failure_one_publish_at_a_time_with_a_bounded_pause_until_one_is_stored() -> None:
    queue: PublishQueue[int] = PublishQueue(limit=100, window=4)
    for i in range(10):
        queue.add(i, 0.0)
    keys = [queue.take(0.0)[0] for _ in range(4)]
    assert queue.ready(0.0) is None  # the window of 4 is full
    now = 0.0
    for key in keys:  # the whole window answers 503
        queue.failed(key, now)
    pauses = []
    for _ in range(8):  # the election goes on: each probe fails
        wait = queue.ready(now)
        assert wait is not None and wait <= MAX_PAUSE
        now += wait
        assert queue.ready(now) == 0.0
        key, _ = queue.take(now)
        assert queue.ready(now) is None  # one in flight while failing
        pauses.append(wait)
        queue.failed(key, now)
    assert max(pauses) == pytest.approx(MAX_PAUSE)
    now += queue.ready(now) or 0.0
    key, first = queue.take(now)
    assert first == 0  # the oldest probes
    assert queue.stored(key) == 0
    assert not queue.failing
    assert [queue.take(now)[1] for _ in range(4)] == [1, 2, 3, 4]  # the full window again, no pause


def test_unanswered_publishes_expire_and_are_sent_again_in_order() -> None:
    queue: PublishQueue[int] = PublishQueue(limit=100, window=10)
    for i in range(3):
        queue.add(i, 0.0)
    first = queue.take(0.0)[0]
    queue.take(4.0)
    queue.take(4.0)
    assert queue.expire(5.5, 5.5 - 5.0) == 1  # only the one sent at 0 is 5 s late
    assert queue.stored(first) is None  # its late ack: already sent again
    assert queue.failing
    assert queue.expire(6.0, 6.0, failure=False) == 2  # a reconnect: all in flight again
    assert queue.in_flight == 0 and queue.pending == 3
    now = 6.0 + MAX_PAUSE
    assert [queue.take(now)[1] for _ in range(3)] == [0, 1, 2]


def test_past_its_limit_the_queue_is_full_and_drops_nothing_until_it_has_room_again() -> None:
    queue: PublishQueue[int] = PublishQueue(limit=8, window=100, resume_at=4)
    became_full = [queue.add(i, float(i)) for i in range(12)]
    assert became_full == [False] * 7 + [True] + [False] * 4  # said once, at the limit
    assert queue.full and queue.pending == 12
    assert queue.stats.stalls == 1
    keys = [queue.take(10.0)[0] for _ in range(12)]
    assert queue.stalled_for(10.0) == pytest.approx(3.0)
    for key in keys[:7]:
        queue.stored(key)
        assert queue.reopen(10.0) is None  # 11 .. 5 pending: not yet down to 4
    queue.stored(keys[7])
    assert queue.reopen(12.0) == pytest.approx(5.0)  # full from 7 s to 12 s
    assert not queue.full and queue.stats.stalled_seconds == pytest.approx(5.0)
    assert queue.reopen(12.0) is None


def test_a_rejected_publish_leaves_the_queue() -> None:
    queue: PublishQueue[str] = PublishQueue(limit=10, window=10)
    queue.add("big", 0.0)
    key, _ = queue.take(0.0)
    assert queue.rejected(key) == "big"
    assert queue.pending == 0 and queue.stats.rejected == 1
    assert not queue.failing  # a refusal is not the cluster moving: no pause
