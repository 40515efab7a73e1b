"""Our webhook receiver: an aiohttp app that takes the alerter's webhook notifications once.

It checks the HMAC signature when given the secret (401 otherwise), reads the idempotency key
(``Idempotency-Key``, else ``X-Autoserve-Notification-Id``), and hands each key's first copy
to ``deliver``; a repeat is answered 200 and dropped, so the sender stops retrying. A key is
taken before ``deliver`` runs: a copy arriving while the first is still being handled is a
repeat too; a key whose ``deliver`` fails is forgotten (503), so the retry gets through.
Integrators can mount it in front of their own handler; the tests use it as the receiver
that "drops repeats of a key".
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..core.idempotency import DEFAULT_CAPACITY, SeenKeys
from .receivers import ID_HEADER, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

Deliver = Callable[[dict[str, Any], str], Awaitable[None]]  # (payload, key)
SEEN_KEY = web.AppKey("seen", SeenKeys)


def webhook_inbox(deliver: Deliver, *, secret: bytes | None = None, path: str = "/hook",
                  capacity: int = DEFAULT_CAPACITY) -> web.Application:  # fmt: skip
    seen = SeenKeys(capacity)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        if secret is not None:
            stamp, signature = request.headers.get(TIMESTAMP_HEADER, ""), request.headers.get(SIGNATURE_HEADER, "")
            if not verify(secret, stamp, body, signature):
                return web.json_response({"error": "bad or missing signature"}, status=401)
        key = request.headers.get(IDEMPOTENCY_HEADER) or request.headers.get(ID_HEADER)
        if not key:
            return web.json_response({"error": f"no {IDEMPOTENCY_HEADER} header"}, status=400)
        try:
            payload = json.loads(body)
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        if not seen.first(key):
            return web.json_response({"repeat": True, "key": key})
        try:
            await deliver(payload, key)
        except Exception:
            seen.forget(key)  # not handled: the sender's retry must get through
            return web.json_response({"error": "not handled; try again"}, status=503)
        return web.json_response({"repeat": False, "key": key})

    app = web.Application()
    app[SEEN_KEY] = seen
    app.router.add_post(path, receive)
    return app
