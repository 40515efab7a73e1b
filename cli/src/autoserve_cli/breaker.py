"""``autoserve breaker open|close|reset APP INSTANCE``: a manual override.

The request goes to the breaker member that owns the instance; it records the override as
a ``BreakerStateChanged`` (trigger ``manual``) and answers once that is stored. ``open``
and ``close`` hold the breaker until another override; ``reset`` returns it to automatic
operation, closed, with its counts cleared.
"""

from __future__ import annotations

import getpass
import socket
import sys

import nats.errors

from autoserve_events import (
    BREAKER_OVERRIDE_RPC,
    OverrideRequest,
    decode_override_reply,
    encode_message,
    is_valid_name,
)
from autoserve_runtime import connect

EXIT_USAGE = 2


def _requested_by() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()} (autoserve breaker)"
    except Exception:  # no user name in a bare container: still say where it came from
        return "autoserve breaker"


async def override(nats_url: str, action: str, app: str, instance: str, timeout: float = 10.0) -> int:
    for what, value in (("APP", app), ("INSTANCE", instance)):
        if not is_valid_name(value):
            print(f"autoserve breaker: {what} {value!r} is not a name of [A-Za-z0-9_-]", file=sys.stderr)
            return EXIT_USAGE
    request = OverrideRequest(app_name=app, instance_id=instance, action=action, requested_by=_requested_by())  # type: ignore[arg-type]
    nc = await connect(nats_url, "autoserve-breaker-cli", timeout=10)
    try:
        msg = await nc.request(BREAKER_OVERRIDE_RPC, encode_message(request), timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        print(
            f"autoserve breaker: no breaker member answered for {app}/{instance} within {timeout:g}s "
            "(is `autoserve run breaker` running?)",
            file=sys.stderr,
        )
        return 1
    finally:
        await nc.close()
    reply = decode_override_reply(msg.data)
    if not reply.ok:
        print(f"autoserve breaker: {reply.error}", file=sys.stderr)
        return 1
    held = " (held until `autoserve breaker reset`)" if reply.forced else ""
    print(f"{app}/{instance}: {reply.state}{held}; recorded as event {reply.event_id}")
    return 0
