"""Receivers: a generic JSON webhook (HMAC-signed), a Slack-compatible incoming webhook,
email over SMTP, and a Prometheus Alertmanager (its v2 API).

Each ``send`` makes one attempt and raises ``DeliveryError`` (``permanent`` when trying
again cannot help: a 4xx other than 408/429, a redirect, a missing secret); the dispatcher
retries. Delivery is at least once: every message carries the notification's id
(``X-Autoserve-Notification-Id`` and ``Idempotency-Key``, the email's ``Message-ID``), the
same on every retry, after a restart and from whichever member sends it, so a receiver can
drop a copy (``inbox.py`` is a webhook receiver that does).

Secrets (the HMAC key, the SMTP password) are read from the named environment variable or
file when the receiver is built, and never logged or echoed. URLs can hold secrets too (a
Slack token is the path, ``user:pass@`` the userinfo), so an error names only
``scheme://host:port``; errors end up in logs and in ``NotificationLogged.error``.

HTTP redirects are not followed: a 307/308 would re-send the signed body to wherever the
``Location`` points. SMTP STARTTLS verifies the server's certificate and name against the
system's CAs (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` name others).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import smtplib
import socket
import ssl
import threading
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from autoserve_config import ReceiverConfig, parse_duration

from ..core.alerts import AlertView
from ..core.notification import Notification

SIGNATURE_HEADER = "X-Autoserve-Signature"
TIMESTAMP_HEADER = "X-Autoserve-Timestamp"
ID_HEADER = "X-Autoserve-Notification-Id"
# The same id under the name HTTP APIs use for it (Stripe's, the IETF draft's): a receiver
# that drops repeats of a key drops ours without knowing our header.
IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = "AutoServe-Alerter/1.0"


class DeliveryError(Exception):
    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Receiver(Protocol):
    name: str
    timeout: float
    retry_for: float

    async def send(self, notification: Notification) -> None: ...


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``<timestamp>.<body>``: the timestamp is signed
    too, so a receiver can refuse an old message replayed at it."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def _secret(env: str | None, file: str | None, what: str) -> tuple[bytes | None, str | None]:
    """(secret, problem): the value is never part of the problem text."""
    if env:
        value = os.environ.get(env)
        return (value.encode(), None) if value else (None, f"{what}: environment variable {env} is not set")
    if file:
        try:
            return Path(file).read_text().strip().encode(), None
        except OSError as exc:
            return None, f"{what}: cannot read {file}: {exc.strerror}"
    return None, None


def where(url: str) -> str:
    """``scheme://host:port`` of a URL: what an error may show of it (no userinfo, path, query)."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    except ValueError:
        return "<invalid url>"
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def scrub(text: str, url: str) -> str:
    """``text`` (an exception's message) without the parts of ``url`` that may be secret."""
    try:
        parts = urlsplit(url)
        secret = [url, parts.netloc.rpartition("@")[0], parts.password, parts.path, parts.query]
    except ValueError:
        secret = [url]
    for value in sorted((v for v in secret if v and len(v) > 1), key=len, reverse=True):
        text = text.replace(value, "...")
    return text


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _alert_json(a: AlertView) -> dict[str, Any]:
    return {
        "status": "resolved" if a.status == "resolved" else "firing",
        "labels": {"alertname": a.failure_type, **a.labels},
        "annotations": {
            "summary": f"{a.app}/{a.instance}: {a.failure_type} ({a.severity})",
            "description": a.message,
            **({"recovery": a.recovery} if a.recovery else {}),
            **({"acknowledged_by": a.acknowledged_by} if a.acknowledged_by else {}),
        },
        "startsAt": _iso(a.starts_at),
        "endsAt": _iso(a.ends_at) or "0001-01-01T00:00:00Z",
        "fingerprint": a.fingerprint,
        "alertId": a.alert_id,
        "ackStatus": a.status,
    }


def _common(alerts: list[AlertView]) -> dict[str, str]:
    if not alerts:
        return {}
    first = {"alertname": alerts[0].failure_type, **alerts[0].labels}
    return {
        k: v for k, v in first.items() if all({"alertname": a.failure_type, **a.labels}.get(k) == v for a in alerts)
    }


def webhook_payload(n: Notification) -> dict[str, Any]:
    """Alertmanager's webhook format (version 4), so existing consumers read it, plus the
    notification id, the escalation tier and the alerts held back under this root cause."""
    alerts = [*n.firing, *n.resolved]
    return {
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": 0,
        "status": n.status,
        "receiver": n.receiver,
        "groupLabels": n.group_labels,
        "commonLabels": _common(alerts),
        "commonAnnotations": {},
        "externalURL": "",
        "alerts": [_alert_json(a) for a in alerts],
        "notificationId": n.notification_id,
        "tier": n.tier,
        "suppressedDependents": [
            {**_alert_json(a), "rootCause": root, "reason": f"suppressed: depends on {root}, which is failing"}
            for a, root in n.dependents
        ],
    }


def summary_text(n: Notification) -> str:
    head = f"[{n.status.upper()}{f' · escalation tier {n.tier}' if n.tier else ''}] {n.group_key}"
    lines = [head]
    for a in n.firing:
        extra = f" (recovery: {a.recovery})" if a.recovery else ""
        lines.append(f"FIRING {a.alert_id} {a.app}/{a.instance} {a.failure_type} {a.severity}: {a.message}{extra}")
    for a in n.resolved:
        lines.append(f"RESOLVED {a.alert_id} {a.app}/{a.instance} {a.failure_type}")
    for a, root in n.dependents:
        lines.append(f"  held back under root cause {root}: {a.app}/{a.instance} {a.failure_type}")
    if n.tier == 0 and n.firing:
        lines.append(f"acknowledge: autoserve alerts ack {n.firing[0].alert_id}")
    return "\n".join(lines)


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], timeout: float) -> None:
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
        ) as resp:
            await resp.read()
            if resp.status < 300:
                return
            if resp.status < 400:
                raise DeliveryError(
                    f"HTTP {resp.status} (a redirect) from {where(url)}: not followed, the url must be the final one",
                    permanent=True,
                )
            permanent = 400 <= resp.status < 500 and resp.status not in (408, 429)
            raise DeliveryError(f"HTTP {resp.status} from {where(url)}", permanent=permanent)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {scrub(str(exc), url)} ({where(url)})") from None


class _Base:
    def __init__(self, name: str, config: ReceiverConfig, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.config = config
        self.session = session
        self.timeout = parse_duration(config.timeout)
        self.retry_for = parse_duration(config.retry_for)
        self.problem: str | None = None

    def _headers(self, n: Notification) -> dict[str, str]:
        return {"Content-Type": "application/json", "User-Agent": USER_AGENT, ID_HEADER: n.notification_id,
                IDEMPOTENCY_HEADER: n.notification_id, **(self.config.headers or {})}  # fmt: skip

    async def send(self, n: Notification) -> None:
        """One attempt; a receiver with a configuration problem fails it at once, whatever its kind."""
        if self.problem is not None:
            raise DeliveryError(f"receiver {self.name}: {self.problem}", permanent=True)
        await self._send(n)

    async def _send(self, n: Notification) -> None:
        raise NotImplementedError


class WebhookReceiver(_Base):
    def __init__(self, name: str, config: ReceiverConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(name, config, session)
        self.secret, self.problem = _secret(config.hmac_secret_env, config.hmac_secret_file, "hmac secret")

    async def _send(self, n: Notification) -> None:
        body = json.dumps(webhook_payload(n), separators=(",", ":")).encode()
        headers = self._headers(n)
        if self.secret is not None:
            stamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = stamp
            headers[SIGNATURE_HEADER] = sign(self.secret, stamp, body)
        await _post(self.session, self.config.url or "", body, headers, self.timeout)


class SlackReceiver(_Base):
    async def _send(self, n: Notification) -> None:
        payload: dict[str, Any] = {"text": summary_text(n)}
        if self.config.channel:
            payload["channel"] = self.config.channel
        await _post(self.session, self.config.url or "", json.dumps(payload).encode(), self._headers(n), self.timeout)


class AlertmanagerReceiver(_Base):
    """Forwards the alerts to ``POST /api/v2/alerts``. Alertmanager then routes, groups and
    notifies with its own configuration. As Prometheus does, a firing alert's ``endsAt`` is
    ``valid_for`` (four resend intervals) after this attempt, and the core re-sends it every
    interval while it fires; a resolved one carries its real ``endsAt``."""

    async def _send(self, n: Notification) -> None:
        alerts = []
        valid_until = _iso(time.time() + n.valid_for) if n.valid_for is not None else None
        for a in (*n.firing, *n.resolved, *(d for d, _ in n.dependents)):
            item = _alert_json(a)
            body = {"labels": {k: v for k, v in item["labels"].items() if v}, "annotations": item["annotations"],
                    "startsAt": item["startsAt"], "generatorURL": ""}  # fmt: skip
            body["annotations"]["autoserve_alert_id"] = a.alert_id
            if a.status == "resolved":
                body["endsAt"] = item["endsAt"]
            elif valid_until is not None:
                body["endsAt"] = valid_until
            alerts.append(body)
        url = (self.config.url or "").rstrip("/") + "/api/v2/alerts"
        await _post(self.session, url, json.dumps(alerts).encode(), self._headers(n), self.timeout)


class _SMTP(smtplib.SMTP):
    """smtplib's client, connected after it is made. STARTTLS checks the certificate against
    the host given to the constructor, which connects at once; so ``connect`` names it."""

    def connect(self, host: str = "localhost", port: int = 0, source_address: Any = None) -> tuple[int, bytes]:
        self._host = host
        return super().connect(host, port, source_address)


class EmailReceiver(_Base):
    """SMTP with the standard library, in a thread (a blocking client must not stall the loop)."""

    def __init__(self, name: str, config: ReceiverConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(name, config, session)
        self.password, self.problem = _secret(config.password_env, config.password_file, "smtp password")
        if self.problem is None and config.username and self.password is None:
            self.problem = "smtp password: username given without password_env or password_file"

    def message(self, n: Notification) -> EmailMessage:
        msg = EmailMessage()
        first = (n.firing or n.resolved or (None,))[0]
        what = f"{first.app}/{first.instance} {first.failure_type}" if first else n.group_key
        count = len(n.firing) + len(n.resolved)
        msg["Subject"] = f"[{n.status.upper()}:{count}] {what}" + (f" (escalation tier {n.tier})" if n.tier else "")
        msg["From"] = self.config.from_ or ""
        msg["To"] = ", ".join(self.config.to)
        msg["Message-ID"] = f"<{n.notification_id}@autoserve>"
        msg[ID_HEADER] = n.notification_id
        msg.set_content(summary_text(n))
        return msg

    async def _send(self, n: Notification) -> None:
        msg = self.message(n)
        await asyncio.to_thread(self._send_sync, msg)

    def _send_sync(self, msg: EmailMessage) -> None:
        """One SMTP session, over within ``timeout`` as a whole. smtplib's own timeout is per
        socket operation, so a server answering a byte at a time could keep this thread (and
        the message it may still accept) alive long after the dispatcher gave up and began a
        retry; a watchdog shuts the socket at the deadline instead. What stays is at least
        once: a server that took the message but whose reply was lost gets it again on the
        retry, with the same ``Message-ID``."""
        host, _, port = (self.config.smarthost or "").rpartition(":")
        smtp = _SMTP(timeout=self.timeout)  # connected below, once the watchdog runs
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            sock = smtp.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns; smtplib raises

        watchdog = threading.Timer(self.timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            smtp.connect(host, int(port))
            if self.config.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.config.username:
                smtp.login(self.config.username, (self.password or b"").decode())
            smtp.send_message(msg)
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()  # the message is taken: a lost goodbye is no failure
        except smtplib.SMTPResponseException as exc:
            raise DeliveryError(
                f"SMTP {exc.smtp_code} from {host}:{port}", permanent=500 <= exc.smtp_code < 600
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            if expired.is_set():
                raise DeliveryError(f"SMTP session not done within {self.timeout:g}s ({host}:{port})") from None
            raise DeliveryError(f"{type(exc).__name__}: {exc} ({host}:{port})") from None
        finally:
            watchdog.cancel()
            smtp.close()


KINDS: dict[str, type[_Base]] = {
    "webhook": WebhookReceiver,
    "slack": SlackReceiver,
    "email": EmailReceiver,
    "alertmanager": AlertmanagerReceiver,
}


def build_receivers(configs: dict[str, ReceiverConfig], session: aiohttp.ClientSession) -> dict[str, Receiver]:
    return {name: KINDS[config.type](name, config, session) for name, config in configs.items()}
