"""TCP probes: open, closed, probe/expect match and mismatch, a black hole."""

from __future__ import annotations

from nats.aio.client import Client

from autoserve_events import ErrorKind

from .conftest import LOCALHOST, Received, apply_yaml, check, config_for, wait_for


def tcp_app(port: int, **hc: object) -> dict:
    return {"health_check": check(protocol="TCP", **hc), "instances": [{"id": "t-1", "host": LOCALHOST, "port": port}]}


async def test_tcp_outcomes(
    prober, nc: Client, probes: Received, tcp_pong: int, black_hole: int, closed_port: int
) -> None:
    apps = {
        "open": tcp_app(tcp_pong),
        "closed": tcp_app(closed_port),
        "match": tcp_app(tcp_pong, probe_data="PING\r\n", expected_response="+PONG"),
        "mismatch": tcp_app(tcp_pong, probe_data="HELLO\r\n", expected_response="+PONG"),
        "silent": tcp_app(black_hole, probe_data="PING\r\n", expected_response="+PONG"),
        "accepts-only": tcp_app(black_hole),
    }
    await apply_yaml(nc, config_for(apps))
    await wait_for(
        lambda: all(probes.count(name, "t-1") >= 1 for name in apps), timeout=30, what="a probe of every app"
    )

    def first(name: str):
        return probes.of(name, "t-1")[0]

    assert (first("open").is_healthy, first("open").check_type, first("open").error) == (True, "tcp", None)
    assert (first("closed").is_healthy, first("closed").error_kind) == (False, ErrorKind.CONNECTION_REFUSED)
    assert first("closed").error == "Connection refused"
    assert first("match").is_healthy
    mismatch = first("mismatch")
    assert (mismatch.is_healthy, mismatch.error_kind) == (False, ErrorKind.UNEXPECTED_RESPONSE)
    assert mismatch.error == "Unexpected response content: expected '+PONG', got b'-ERR unknown\\r\\n'"
    silent = first("silent")
    assert (silent.is_healthy, silent.error_kind) == (False, ErrorKind.TIMEOUT)
    # The response time covers the whole exchange: it waited for the answer until the timeout.
    assert 1000 <= silent.response_time_ms < 3000
    # With nothing to exchange, an accepted connection is enough.
    assert first("accepts-only").is_healthy
