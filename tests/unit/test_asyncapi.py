"""docs/asyncapi.yaml is generated from the code and committed; this fails when it drifts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import yaml

from autoserve_events import EVENT_TYPES

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "asyncapi.yaml"


def test_the_committed_asyncapi_document_matches_the_code() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_asyncapi.py"), "--check"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"{result.stderr}\ndocs/asyncapi.yaml differs from the code: regenerate it with `make docs` "
        "(.venv/bin/python scripts/gen_asyncapi.py) and commit it"
    )


def test_the_document_describes_every_event_and_where_it_is_published() -> None:
    doc = yaml.safe_load(DOC.read_text())
    assert doc["asyncapi"] == "3.0.0"
    schemas = doc["components"]["schemas"]
    assert set(EVENT_TYPES) <= set(schemas)
    failure = schemas["FailureDetected"]
    assert {"failure_type", "instance_id", "app_name", "severity", "message", "timestamp"} <= set(failure["required"])
    sent = {
        unquote(op["channel"]["$ref"].rsplit("/", 1)[1]) for op in doc["operations"].values() if op["action"] == "send"
    }
    addresses = {doc["channels"][c]["address"] for c in sent}
    assert "autoserve.event.failure.*.*" in addresses and "autoserve.probe.completed.*.*" in addresses
    assert {c.split(".")[0] for c in sent} >= {"prober", "detector", "breaker", "recovery", "alerter"}
    received = [doc["channels"][unquote(op["channel"]["$ref"].rsplit("/", 1)[1])]["address"]
                for op in doc["operations"].values() if op["action"] == "receive"]  # fmt: skip
    assert "autoserve.rpc.breaker.allow" in received
