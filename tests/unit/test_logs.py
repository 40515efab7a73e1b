"""Libraries' stdlib ``logging`` comes out as our own JSON lines, at a sane level, secrets masked.

Each case runs in a fresh interpreter: ``configure_logging`` sets process-wide state (the
root logger, structlog's configuration) that must not leak into other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

from autoserve_runtime.logs import mask_secrets


def logged(body: str, level: str = "info") -> list[dict[str, Any]]:
    """What ``body`` writes to stderr after ``configure_logging("detector", level)``: every
    line must be one JSON object."""
    script = "from autoserve_runtime.logs import configure_logging\n"
    script += f"configure_logging('detector', level={level!r}, json=True)\n" + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = done.stderr.splitlines()
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(line, dict) for line in parsed), lines
    return parsed


def test_aiohttp_and_asyncio_records_are_json_lines_like_ours() -> None:
    lines = logged(
        """
        import asyncio, logging, structlog
        logging.getLogger("aiohttp.access").warning("GET %s 502", "/healthz")
        asyncio.new_event_loop().call_exception_handler({"message": "Task exception was never retrieved"})
        structlog.get_logger("autoserve.detector").info("ours", seq=3)
        """
    )
    assert [(line["level"], line["logger"], line["event"]) for line in lines] == [
        ("warning", "aiohttp.access", "GET /healthz 502"),
        ("error", "asyncio", "Task exception was never retrieved"),
        ("info", "autoserve.detector", "ours"),
    ]
    keys = {"event", "level", "logger", "service", "timestamp"}
    assert all(keys <= line.keys() and line["service"] == "detector" for line in lines)


def test_libraries_log_from_warning_and_ours_at_our_level() -> None:
    lines = logged(
        """
        import logging
        for name in ("aiohttp.client", "aiodocker", "clickhouse_connect", "nats", "autoserve.feed"):
            logging.getLogger(name).info("info from %s", name)
            logging.getLogger(name).warning("warning from %s", name)
        logging.getLogger("autoserve.feed").debug("debug: below our level")
        """
    )
    assert [line["event"] for line in lines] == [
        "warning from aiohttp.client",
        "warning from aiodocker",
        "warning from clickhouse_connect",
        "warning from nats",
        "info from autoserve.feed",
        "warning from autoserve.feed",
    ]
    quiet = logged('import logging; logging.getLogger("nats").warning("below error")', level="error")
    assert quiet == []  # our level is higher than WARNING: libraries follow it


def test_a_library_traceback_is_one_line_and_its_secrets_are_masked() -> None:
    (line,) = logged(
        """
        import logging
        try:
            raise ConnectionError("nats://alice:s3cret@nats:4222 refused")
        except ConnectionError:
            logging.getLogger("nats.aio.client").exception("connect failed, password=hunter2")
        """
    )
    assert line["event"] == "connect failed, password=***"
    assert "Traceback" in line["exception"] and "nats://***@nats:4222 refused" in line["exception"]
    assert "s3cret" not in json.dumps(line) and "hunter2" not in json.dumps(line)


def test_mask_secrets_keeps_what_is_not_a_secret() -> None:
    assert mask_secrets("GET http://user:pw@web:8080/health?x=1") == "GET http://***@web:8080/health?x=1"
    assert mask_secrets("Authorization: Bearer abc.def, token=t0k") == "Authorization: ***, token=***"
    assert mask_secrets('{"password": "p4ss"}') == '{"password": "***"}'
    assert mask_secrets("GET /healthz 200 in 3ms") == "GET /healthz 200 in 3ms"
