"""Each breaker's transitions are stored as one chain, whoever decides them.

A ``BreakerStateChanged`` is published with ``Nats-Expected-Last-Subject-Sequence``: the stream
sequence of the breaker's last transition that its decider had seen stored (0: none). JetStream
stores it only if nothing was stored on that breaker's subject since, so two members can never
both extend the same transition: a member paused past its lease (a zombie) that resumes with
transitions still in its buffers, or sends one again, is refused once its successor has stored
one, and a successor is refused if the zombie's came first. The refused member starts that
breaker again from the log (``Breakers.resync``) and follows the winner.

A member's next transition of a breaker waits (here, not in the core, which has applied it)
until the stream has shown it the previous one, since its sequence is what it must name. A
trial admitted meanwhile waits behind it, so a trial is never stored before the half-open it
belongs to.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import structlog

from autoserve_events import BreakerStateChanged, BreakerTrialAdmitted, encode, headers_for, subject_for
from autoserve_runtime import EventPublisher
from autoserve_runtime.membership import EXPECTED_LAST_SUBJECT_SEQUENCE

from ..core.breakers import Breakers, Key

log = structlog.get_logger("autoserve.breaker.outbox")


Item = tuple[BreakerStateChanged | BreakerTrialAdmitted, asyncio.Future[bool]]


class Outbox:
    def __init__(self, publisher: EventPublisher, core: Breakers, on_refused: Callable[[Key], None]) -> None:
        self._publisher = publisher
        self._core = core
        self._on_refused = on_refused
        self._waiting: dict[Key, deque[Item]] = {}  # per breaker, in decision order
        self._unseen: dict[Key, BreakerStateChanged] = {}  # sent, not yet seen stored
        self.refused = 0  # transitions the log refused: another member's came first

    def submit(self, event: BreakerStateChanged | BreakerTrialAdmitted) -> asyncio.Future[bool]:
        """Queue ``event``; the future resolves True once stored, False if refused or dropped."""
        key = (event.app_name, event.instance_id)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append((event, future))
        self._send_ready(key)
        return future

    def logged(self, key: Key) -> None:
        """The stream delivered a transition of ``key``: what waited for it may go."""
        if key in self._waiting:
            self._send_ready(key)
        elif (sent := self._unseen.get(key)) is not None and self._core.logged(key)[0] >= sent.generation:
            del self._unseen[key]  # stored, or refused (its publish says so)

    def _send_ready(self, key: Key) -> None:
        queue = self._waiting[key]
        while queue:
            event, future = queue[0]
            if isinstance(event, BreakerStateChanged):
                generation, seq, event_id = self._core.logged(key)
                sent = self._unseen.get(key)
                if sent is not None:
                    if generation < sent.generation:
                        return  # our previous transition is not seen stored yet: its seq is unknown
                    del self._unseen[key]
                    if (generation, event_id) != (sent.generation, sent.event_id):
                        self._refuse(key, "another member's transition was stored before ours")
                        return
                if generation != event.generation - 1:
                    self._refuse(key, f"the log is at generation {generation}, this one follows {event.generation - 1}")
                    return
                headers = {**headers_for(event), EXPECTED_LAST_SUBJECT_SEQUENCE: str(seq)}
                self._unseen[key] = event
            else:
                headers = headers_for(event)
            queue.popleft()
            stored = self._publisher.submit_raw(subject_for(event), encode(event), headers, track=True)
            assert stored is not None
            expected = int(headers.get(EXPECTED_LAST_SUBJECT_SEQUENCE, -1))
            stored.add_done_callback(lambda done, k=key, f=future, e=event, x=expected: self._settled(k, e, x, f, done))
        del self._waiting[key]

    def _settled(
        self,
        key: Key,
        event: BreakerStateChanged | BreakerTrialAdmitted,
        expected: int,
        future: asyncio.Future[bool],
        done: asyncio.Future[bool],
    ) -> None:
        ok = not done.cancelled() and done.result()
        if not future.done():
            future.set_result(ok)
        if ok or not isinstance(event, BreakerStateChanged):
            return
        if self._unseen.get(key) is event:
            del self._unseen[key]
        if self._core.logged(key)[1] == expected:
            # Nothing newer seen: either it is on its way, or the transition we named aged
            # out of the stream (max age). Name none next time: if one is there, that is
            # refused too, and by then the stream has shown it.
            self._core.log_aged_out(key)
        self._refuse(key, "the log holds another transition")

    def _refuse(self, key: Key, why: str) -> None:
        """Drop what waits for ``key`` (it built on the refused transition) and resync it."""
        self.refused += 1
        for _, future in self._waiting.pop(key, ()):
            if not future.done():
                future.set_result(False)
        log.warning("breaker transition refused; following the log", app=key[0], instance=key[1], why=why)
        self._on_refused(key)
