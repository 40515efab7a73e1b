"""The probe replay of a takeover: the stored probes, from a start time up to the last one this
member's live consumer had taken when it gained the breakers, folded in order. What the live
consumer takes after that is held back by the core and folded once this is done, so each
probe is folded once, and in stream order."""

from __future__ import annotations

from collections.abc import Callable

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from autoserve_events import MalformedEvent, ProbeCompleted, decode, durables
from autoserve_runtime.admission import Admit
from autoserve_runtime.feed import read_window

log = structlog.get_logger("autoserve.breaker.rebuild")

MAX_CACHED = 1_000_000  # subjects remembered during one replay (one per breaker)


async def replay_probes(
    js: JetStreamContext,
    since: float,
    until_seq: int,
    fold: Callable[[ProbeCompleted], object],
    admit: Admit | None = None,
    wanted: Callable[[str, str], bool] | None = None,
    idle_timeout: float = 5.0,
) -> int:
    """Fold the probes stored from wall time ``since`` up to stream sequence ``until_seq``;
    return how many were folded. Only those of breakers ``wanted`` (app, instance, read from
    the subject, so the others are not even decoded); inputs the live consumer refuses
    (``admit``) are skipped."""
    count = 0
    by_subject: dict[str, bool] = {}

    def on_message(seq: int, msg: Msg) -> bool:
        nonlocal count
        try:
            if wanted is None or _wanted(by_subject, msg.subject, wanted):
                event = decode(msg.data)
                if isinstance(event, ProbeCompleted) and not (admit and admit(event)):
                    fold(event)
                    count += 1
        except MalformedEvent:
            pass  # dead-lettered when it was live
        except Exception:  # as live, where it was dead-lettered: skip it, keep rebuilding
            log.exception("fold failed during a takeover replay; input skipped", subject=msg.subject, seq=seq)
        return True

    (subject,) = durables.BREAKER.filter_subjects
    await read_window(js, durables.BREAKER.stream, subject, since, until_seq, on_message, idle_timeout)
    return count


def _wanted(cache: dict[str, bool], subject: str, wanted: Callable[[str, str], bool]) -> bool:
    """``…completed.<app>.<instance>``: asked once per subject (an ownership hash each)."""
    answer = cache.get(subject)
    if answer is None:
        _, app, instance = subject.rsplit(".", 2)
        answer = wanted(app, instance)
        if len(cache) < MAX_CACHED:
            cache[subject] = answer
    return answer
