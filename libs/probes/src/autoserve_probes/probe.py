"""One check of one target: the protocol's attempt, retried up to ``max_retries``, as a
``ProbeCompleted``. I/O: it runs the attempts (``http``, ``tcp``); what their outcome
means is decided by the pure ``outcome``.

A protocol is one module with an ``AttemptFn`` and one entry in ``Prober.attempts``.
"""

from __future__ import annotations

import time

from autoserve_events import ProbeCompleted
from autoserve_events.catalogue import CheckType

from .attempt import AttemptFn
from .http import HttpProbe
from .target import Target
from .tcp import tcp_attempt


class Prober:
    def __init__(self, http: HttpProbe) -> None:
        # HealthCheckConfig.protocol -> ProbeCompleted.check_type and the protocol's attempt
        self.attempts: dict[str, tuple[CheckType, AttemptFn]] = {
            "HTTP": ("http", http.attempt),
            "TCP": ("tcp", tcp_attempt),
        }

    async def probe(self, target: Target, scheduled_at: float | None = None) -> ProbeCompleted:
        check = target.check
        check_type, attempt_once = self.attempts[check.protocol]
        for attempt_number in range(1, check.max_retries + 2):  # noqa: B007 - reported below
            started = time.perf_counter()
            attempt = await attempt_once(target)
            if attempt.verdict.healthy:
                break
        elapsed_ms = (time.perf_counter() - started) * 1000
        verdict = attempt.verdict
        return ProbeCompleted(
            instance_id=target.instance_id,
            app_name=target.app_name,
            check_type=check_type,
            is_healthy=verdict.healthy,
            response_time_ms=round(elapsed_ms, 3),
            timestamp=time.time(),
            status_code=attempt.status_code,
            response_body=attempt.body,
            headers=attempt.headers,
            error=verdict.error,
            error_kind=verdict.error_kind,
            scheduled_at=scheduled_at,
            attempts=attempt_number,
        )
