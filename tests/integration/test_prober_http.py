"""HTTP probes against real local servers; the exact events read back from NATS."""

from __future__ import annotations

from nats.aio.client import Client

from autoserve_events import ErrorKind
from autoserve_probes.outcome import RESPONSE_BODY_LIMIT

from .conftest import LOCALHOST, HttpTarget, Received, apply_yaml, check, config_for, wait_for


def app(port: int, **hc: object) -> dict:
    return {"health_check": check(**hc), "instances": [{"id": "i-1", "host": LOCALHOST, "port": port}]}


async def test_http_outcomes(
    prober, nc: Client, probes: Received, http_target: HttpTarget, black_hole: int, closed_port: int
) -> None:
    port = http_target.port
    apps = {
        "ok": app(port, path="/ok"),
        "fail": app(port, path="/fail"),
        "slow": app(port, path="/slow"),
        "blackhole": app(black_hole, path="/health"),
        "refused": app(closed_port, path="/health"),
        "redirect-kept": app(port, path="/redirect"),
        "redirect-followed": app(port, path="/redirect", follow_redirects=True),
        "redirect-away": app(port, path="/redirect-away", follow_redirects=True),
        "redirect-loop": app(port, path="/redirect-loop", follow_redirects=True),
        "huge": app(port, path="/huge"),
        "fresh-connection": app(port, path="/ok", keep_alive=False),
    }
    await apply_yaml(nc, config_for(apps))
    await wait_for(
        lambda: all(probes.count(name, "i-1") >= 2 for name in apps), timeout=30, what="two probes of every app"
    )

    def first(name: str):
        return probes.of(name, "i-1")[0]

    ok = first("ok")
    assert (ok.is_healthy, ok.status_code, ok.check_type, ok.error, ok.error_kind) == (True, 200, "http", None, None)
    assert ok.response_body == '{"status":"ok"}'
    assert "Set-Cookie" not in ok.headers and ok.headers["Content-Type"].startswith("text/plain")
    assert ok.scheduled_at is not None and ok.timestamp >= ok.scheduled_at
    assert ok.attempts == 1
    subjects = {subject for subject, event in probes.messages if event.app_name == "ok"}
    assert subjects == {"autoserve.probe.completed.ok.i-1"}

    fail = first("fail")
    assert (fail.is_healthy, fail.status_code, fail.error_kind) == (False, 500, ErrorKind.UNEXPECTED_STATUS)
    assert fail.error == "Unexpected status code: 500"
    assert fail.response_body == "boom"

    for name in ("slow", "blackhole"):
        timed_out = first(name)
        assert (timed_out.is_healthy, timed_out.error_kind, timed_out.status_code) == (False, ErrorKind.TIMEOUT, None)
        assert timed_out.error == "Request timeout: no response within 1s"
        # It waited for its timeout, and no longer: one timeout, never a stuck worker.
        assert 1000 <= timed_out.response_time_ms < 3000

    refused = first("refused")
    assert (refused.error_kind, refused.error) == (ErrorKind.CONNECTION_REFUSED, "Connection refused")

    kept = first("redirect-kept")
    assert (kept.is_healthy, kept.status_code, kept.error_kind) == (False, 302, ErrorKind.UNEXPECTED_STATUS)

    followed = first("redirect-followed")
    assert (followed.is_healthy, followed.status_code, followed.response_body) == (True, 200, '{"status":"ok"}')

    away = first("redirect-away")
    assert (away.is_healthy, away.error_kind, away.status_code) == (False, ErrorKind.REDIRECT_BLOCKED, 302)
    assert f"http://localhost:{port}/ok leaves the target" in away.error
    assert not [r for r in http_target.requests if r.host.startswith("localhost")], "followed a redirect off-target"

    loop = first("redirect-loop")
    assert (loop.error_kind, loop.error) == (ErrorKind.REDIRECT_BLOCKED, "Redirect blocked: more than 10 redirects")

    huge = first("huge")
    assert (huge.is_healthy, huge.status_code) == (True, 200)
    assert huge.response_body == "x" * RESPONSE_BODY_LIMIT
    assert huge.error_kind is None  # it hung up after a small read instead of timing out

    assert first("fresh-connection").is_healthy


async def test_every_request_field_is_sent(prober, nc: Client, probes: Received, http_target: HttpTarget) -> None:
    apps = {
        "posty": app(
            http_target.port,
            path="/ok",
            method="POST",
            body="ping",
            headers={"Authorization": "Bearer t0ken", "X-Env": "test"},
        )
    }
    await apply_yaml(nc, config_for(apps))
    await wait_for(lambda: probes.count("posty", "i-1") >= 1, what="a probe")
    index = next(i for i, r in enumerate(http_target.requests) if r.headers.get("X-App-Name") == "posty")
    request, body = http_target.requests[index], http_target.bodies[index]
    assert (request.method, request.path, body) == ("POST", "/ok", b"ping")
    assert request.headers["X-Health-Check"] == "true"
    assert request.headers["X-Instance-ID"] == "i-1"
    assert request.headers["User-Agent"] == "AutoServe-HealthChecker/1.0"
    assert request.headers["Authorization"] == "Bearer t0ken"
    assert request.headers["X-Env"] == "test"
    assert probes.of("posty", "i-1")[0].is_healthy


async def test_max_retries_gives_a_flaky_target_more_attempts(
    prober, nc: Client, probes: Received, http_target: HttpTarget
) -> None:
    flaky = {"path": "/flaky?fail=2", "period_seconds": 4, "timeout_seconds": 1}
    apps = {
        "retried": {"health_check": check(**flaky, max_retries=2), "instances": [{"id": "r-1", "host": LOCALHOST, "port": http_target.port}]},
        "not-retried": {"health_check": check(**flaky), "instances": [{"id": "n-1", "host": LOCALHOST, "port": http_target.port}]},
    }  # fmt: skip
    await apply_yaml(nc, config_for(apps))
    await wait_for(lambda: probes.count("retried", "r-1") >= 1 and probes.count("not-retried", "n-1") >= 1)
    retried = probes.of("retried", "r-1")[0]
    assert (retried.is_healthy, retried.attempts, retried.status_code) == (True, 3, 200)
    not_retried = probes.of("not-retried", "n-1")[0]
    assert (not_retried.is_healthy, not_retried.attempts, not_retried.status_code) == (False, 1, 503)


async def test_verify_ssl_is_honoured(prober, nc: Client, probes: Received, https_target: int) -> None:
    apps = {
        "verified": app(https_target, scheme="https"),
        "unverified": app(https_target, scheme="https", verify_ssl=False),
    }
    await apply_yaml(nc, config_for(apps))
    await wait_for(lambda: probes.count("verified", "i-1") >= 1 and probes.count("unverified", "i-1") >= 1)
    verified = probes.of("verified", "i-1")[0]
    assert (verified.is_healthy, verified.error_kind) == (False, ErrorKind.TLS)
    assert verified.error.startswith("TLS error")
    unverified = probes.of("unverified", "i-1")[0]
    assert (unverified.is_healthy, unverified.response_body) == (True, "secure ok")
