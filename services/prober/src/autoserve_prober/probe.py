"""One probe of one target: the protocol's attempt, retried up to ``max_retries``, as an event."""

from __future__ import annotations

import time

from autoserve_events import ProbeCompleted

from .adapters.http import HttpProbe
from .adapters.tcp import tcp_attempt
from .core.targets import Target


class Prober:
    def __init__(self, http: HttpProbe) -> None:
        self._http = http

    async def probe(self, target: Target, scheduled_at: float | None = None) -> ProbeCompleted:
        check = target.check
        attempt_once = self._http.attempt if check.protocol == "HTTP" else tcp_attempt
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
            check_type="http" if check.protocol == "HTTP" else "tcp",
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
