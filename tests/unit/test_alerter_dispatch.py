"""The dispatcher's retries (tenacity): backoff with jitter up to its cap, ``retry_for`` as a
deadline, permanent errors and bugs failing at once; with in-memory receivers, and a clock
that the dispatcher's sleeps advance (so the waits are checked exactly, without waiting)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from autoserve_alerter.adapters.dispatch import Dispatcher
from autoserve_alerter.adapters.receivers import DeliveryError
from autoserve_alerter.core.notification import Notification

INITIAL, CAP = 0.05, 0.2


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class FlakyReceiver:
    """Fails with ``errors`` in turn, then takes the notification; notes when each try came."""

    errors: list[Exception]
    clock: FakeClock = field(default_factory=FakeClock)
    name: str = "flaky"
    timeout: float = 1.0
    retry_for: float = 5.0
    tries: list[float] = field(default_factory=list)

    async def send(self, notification: Notification) -> None:
        self.tries.append(self.clock())
        if self.errors:
            raise self.errors.pop(0)


def notification(retry_for: float | None = None) -> Notification:
    return Notification(notification_id="n1", receiver="flaky", group_key="0:{app=web}", group_labels={"app": "web"},
                        route_id="0", tier=0, seq=1, app_name="web", firing=(), resolved=(), dependents=(),
                        created_at=0.0, retry_for=retry_for)  # fmt: skip


async def deliver(receiver: FlakyReceiver, n: Notification | None = None) -> tuple[str, int, str | None]:
    done: asyncio.Future[tuple[str, int, str | None]] = asyncio.get_running_loop().create_future()
    dispatcher = Dispatcher(lambda _n, outcome, attempts, error: done.set_result((outcome, attempts, error)),
                            initial_backoff=INITIAL, max_backoff=CAP, clock=receiver.clock,
                            sleep=receiver.clock.sleep)  # fmt: skip
    dispatcher.receivers = {"flaky": receiver}
    dispatcher.submit(n or notification())
    try:
        return await asyncio.wait_for(done, 10)
    finally:
        await dispatcher.close()


async def test_transient_errors_are_retried_with_backoff_and_jitter_up_to_the_cap() -> None:
    receiver = FlakyReceiver([DeliveryError("HTTP 503")] * 4 + [TimeoutError()] * 2)
    assert await deliver(receiver) == ("sent", 7, None)
    gaps = [b - a for a, b in zip(receiver.tries, receiver.tries[1:], strict=False)]
    for number, gap in enumerate(gaps, start=1):  # the wait after try n: INITIAL * 2^(n-1) + jitter, capped
        base = INITIAL * 2 ** (number - 1)
        assert min(base, CAP) - 1e-9 <= gap <= min(base + INITIAL, CAP) + 1e-9, (number, gaps)  # float sums


async def test_a_permanent_error_fails_at_once() -> None:
    receiver = FlakyReceiver([DeliveryError("HTTP 404", permanent=True)])
    assert await deliver(receiver) == ("failed", 1, "HTTP 404")


async def test_a_bug_fails_at_once_without_its_message() -> None:
    receiver = FlakyReceiver([ValueError("https://hooks.example.com/secret-token")])
    outcome, attempts, error = await deliver(receiver)
    assert (outcome, attempts) == ("failed", 1)
    assert error is not None and error.startswith("unexpected ValueError in the alerter at ") and "secret" not in error


@pytest.mark.parametrize("where", ["receiver", "notification"])
async def test_retry_for_is_a_deadline_for_the_next_try(where: str) -> None:
    receiver = FlakyReceiver([DeliveryError("HTTP 503")] * 1000, retry_for=0.6 if where == "receiver" else 5.0)
    outcome, attempts, error = await deliver(receiver, notification(retry_for=0.6 if where == "notification" else None))
    assert (outcome, error) == ("failed", "HTTP 503")
    assert receiver.tries[-1] <= 0.6  # no try starts after the deadline
    assert 3 <= attempts <= 6  # 0.05, 0.1, then 0.2 apart (plus jitter) within 0.6 s


async def test_no_retry_for_means_one_try() -> None:
    receiver = FlakyReceiver([TimeoutError()], retry_for=0.0)
    assert await deliver(receiver) == ("failed", 1, "no answer within 2s")
