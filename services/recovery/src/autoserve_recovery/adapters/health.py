"""The app's health check, run directly against one member (a rolling restart waits for
each restarted member this way: a restart this fast is often never seen failing by the
prober, so no ``HealthChanged`` would say it is back).

It is the prober's own check (``autoserve_probes.Prober``, shared by both), not a second
implementation: https and ``verify_ssl``, ``headers``, ``method``, ``body``,
``expected_status_codes``, redirects, retries, and TCP ``probe_data`` /
``expected_response`` mean exactly what they mean to the prober. Recovery and the prober
both import the probes library; neither imports the other.
"""

from __future__ import annotations

import asyncio
import time

from autoserve_config import AppSpec
from autoserve_probes import HttpProbe, Prober, Target

from ..ports import Member

RETRY_PAUSE = 0.05  # between failed checks while waiting: a restarted app binds quickly


class HealthChecks:
    """One HTTP session (started on first use) for every check this replica runs."""

    def __init__(self) -> None:
        self._http = HttpProbe(pool_size=64)
        self._prober = Prober(self._http)
        self._started: asyncio.Lock | None = None
        self._running = False

    async def _ready(self) -> None:
        if self._running:
            return
        self._started = self._started or asyncio.Lock()
        async with self._started:
            if not self._running:
                await self._http.start()
                self._running = True

    async def close(self) -> None:
        if self._running:
            self._running = False
            await self._http.close()

    async def check(self, app_name: str, member: Member, spec: AppSpec) -> str | None:
        """One check, as the prober runs it: None when it passes, else the prober's error."""
        await self._ready()
        target = Target(app_name, member.instance_id, member.host, member.port, spec.health_check)
        probe = await self._prober.probe(target)
        return None if probe.is_healthy else (probe.error or "unhealthy")

    async def answers(self, app_name: str, member: Member, spec: AppSpec, deadline: float) -> str | None:
        """Until ``member`` passes the app's health check once, or the ``time.monotonic()``
        ``deadline``: None when it passed, else the last check's error."""
        error = "not checked before the deadline"
        while (left := deadline - time.monotonic()) > 0:
            try:
                error = await asyncio.wait_for(self.check(app_name, member, spec), left)
            except TimeoutError:
                return f"no answer before the deadline (last: {error})"
            if error is None:
                return None
            await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
        return error
