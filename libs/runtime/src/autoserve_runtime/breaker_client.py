"""A user's service asks the breaker before calling an instance, and reports the outcome.

    breaker = BreakerClient(nc)
    if await breaker.allow("web", "web-1"):
        ok = await call_web_1()
        await breaker.report("web", "web-1", success=ok, duration_ms=elapsed_ms)

``allow`` is one request/reply on ``autoserve.rpc.breaker.allow``; ``report`` is one plain
NATS publish (no reply, no JetStream ack), so it costs the caller next to nothing. When no
breaker answers, ``allow`` returns ``allow_when_unavailable`` (True by default: a missing
breaker must not take the user's service down with it).
"""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client

from autoserve_events import (
    BREAKER_ALLOW_RPC,
    AllowReply,
    AllowRequest,
    BreakerReport,
    breaker_report,
    decode_allow_reply,
    encode_message,
    is_valid_name,
)


class BreakerUnavailable(ConnectionError):
    """No breaker replica answered in time."""


class BreakerClient:
    def __init__(self, nc: Client, *, timeout: float = 0.5, allow_when_unavailable: bool = True) -> None:
        self._nc = nc
        self._timeout = timeout
        self._fallback = allow_when_unavailable

    async def check(self, app_name: str, instance_id: str) -> AllowReply:
        """The breaker's full answer; raises ``BreakerUnavailable`` or ``ValueError``."""
        for field, value in (("app_name", app_name), ("instance_id", instance_id)):
            if not is_valid_name(value):
                raise ValueError(f"{field} {value!r} is not a name of 1-128 characters of [A-Za-z0-9_-]")
        request = encode_message(AllowRequest(app_name=app_name, instance_id=instance_id))
        try:
            msg = await self._nc.request(BREAKER_ALLOW_RPC, request, timeout=self._timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise BreakerUnavailable(f"no breaker answered on {BREAKER_ALLOW_RPC}: {type(exc).__name__}") from None
        reply = decode_allow_reply(msg.data)
        if reply.error is not None:
            raise ValueError(reply.error)
        return reply

    async def allow(self, app_name: str, instance_id: str) -> bool:
        """May a request go to this instance now? In half-open, True admits one trial."""
        try:
            return (await self.check(app_name, instance_id)).allow
        except BreakerUnavailable:
            return self._fallback

    async def report(self, app_name: str, instance_id: str, *, success: bool, duration_ms: float = 0.0) -> None:
        """Tell the breaker how a request to this instance went (fire and forget)."""
        payload = encode_message(BreakerReport(success=success, duration_ms=duration_ms))
        await self._nc.publish(breaker_report(app_name, instance_id), payload)
