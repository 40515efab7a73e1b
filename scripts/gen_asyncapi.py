"""Write docs/asyncapi.yaml: the event API, generated from the code so it cannot drift.

The services use nats-py directly (FastStream measured too slow on the hot paths; see the
README's design notes), so this builds, per service, a FastStream ``NatsBroker`` whose
publishers and subscribers are the real subjects: what each service publishes (the event
catalogue's subjects), what it consumes (its ``ConsumerSpec`` filters), the breaker's
RPC subjects. FastStream generates the AsyncAPI 3.0 document; the payloads are the
``libs/events`` msgspec structs, rendered with ``msgspec.json.schema``.

    .venv/bin/python scripts/gen_asyncapi.py            # rewrite docs/asyncapi.yaml
    .venv/bin/python scripts/gen_asyncapi.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec
import yaml
from autoserve_detector.service import CONSUMER as DETECTOR_CONSUMER
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

from autoserve_alerter.service import CONSUMER as ALERTER_CONSUMER
from autoserve_breaker.adapters.handlers import SERVICE as BREAKER
from autoserve_events import (
    BREAKER_ALLOW_RPC,
    BREAKER_EVENTS_WILDCARD,
    BREAKER_OVERRIDE_RPC,
    BREAKER_REPORT_WILDCARD,
    EVENT_TYPES,
    AllowReply,
    AllowRequest,
    BreakerReport,
    OverrideReply,
    OverrideRequest,
    ProbeCompleted,
    wildcard,
)
from autoserve_events.durables import RECOVERY_WORK
from autoserve_events.subjects import _ONE_TOKEN, _STEMS, PREFIX  # the catalogue's own stems
from autoserve_reporter.service import ReporterSettings, consumer_specs

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
VERSION = "0.1.0"


def pattern(event: type) -> str:
    """The subject pattern of an event type: ``autoserve.event.failure.*.*``."""
    if event in _ONE_TOKEN:
        return f"{PREFIX}.{_ONE_TOKEN[event][0]}.*"
    return f"{PREFIX}.{_STEMS[event]}.*.*"


def matches(filter_subject: str, subject: str) -> bool:
    f, s = filter_subject.split("."), subject.split(".")
    for i, token in enumerate(f):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(f) == len(s)


def events_on(filter_subject: str) -> list[type]:
    return [e for e in EVENT_TYPES.values() if matches(filter_subject, pattern(e).replace("*", "x"))]


def publishes() -> dict[str, list[type]]:
    """Who publishes each event: the owner of its subject (as deploy/nats permissions)."""
    owners = {
        "prober": ("probe.",),
        "detector": ("event.health", "event.failure"),
        "breaker": ("event.breaker",),
        "recovery": ("event.recovery", "event.failure"),
        "alerter": ("event.alert",),
    }
    result: dict[str, list[type]] = {}
    for service, stems in owners.items():
        result[service] = [e for e in EVENT_TYPES.values() if pattern(e).removeprefix(f"{PREFIX}.").startswith(stems)]
    # An operator's `autoserve alerts ack|silence` records these; the alerter records
    # silences too (its maintenance windows), but never an acknowledgement.
    result["alerter"] = [e for e in result["alerter"] if e.__name__ != "AlertAcknowledged"]
    result["admin"] = [EVENT_TYPES["AlertAcknowledged"], EVENT_TYPES["SilenceCreated"]]
    return result


def consumes() -> dict[str, list[str]]:
    reporter = [spec.filter_subject for spec in consumer_specs(ReporterSettings(clickhouse_url="chdb://"))]
    return {
        "detector": [DETECTOR_CONSUMER.filter_subject],
        "breaker": [wildcard(ProbeCompleted), BREAKER_EVENTS_WILDCARD],
        "recovery": list(RECOVERY_WORK.filter_subjects),
        "reporter": reporter,
        "alerter": [ALERTER_CONSUMER.filter_subject],
    }


def build() -> dict[str, Any]:
    broker = NatsBroker(
        "nats://127.0.0.1:4222", description="NATS JetStream; streams AUTOSERVE_PROBES and AUTOSERVE_EVENTS"
    )
    payloads: dict[str, list[type]] = {}

    def handler() -> Any:
        async def handle(msg: dict) -> None:  # the real handlers are nats-py callbacks
            return None

        return handle

    for service, events in publishes().items():
        for event in events:
            title = f"{service}/publishes/{event.__name__}"
            broker.publisher(pattern(event), title=title, description=(event.__doc__ or "").strip() or None)
            payloads[title] = [event]
    for service, filters in consumes().items():
        for filter_subject in filters:
            title = f"{service}/consumes/{filter_subject}"
            broker.subscriber(filter_subject, title=title, description=f"JetStream consumer of {service}")(handler())
            payloads[title] = events_on(filter_subject)
    for subject, request, reply in (
        (BREAKER_ALLOW_RPC, AllowRequest, AllowReply),
        (BREAKER_OVERRIDE_RPC, OverrideRequest, OverrideReply),
    ):
        title = f"{BREAKER}/answers/{subject}"
        broker.subscriber(
            subject, title=title, description=f"request/reply (core NATS); the reply is {reply.__name__}"
        )(handler())
        payloads[title] = [request]
    title = f"{BREAKER}/consumes/{BREAKER_REPORT_WILDCARD}"
    broker.subscriber(BREAKER_REPORT_WILDCARD, title=title, description="request outcomes (core NATS)")(handler())
    payloads[title] = [BreakerReport]

    spec = AsyncAPI(
        broker,
        title="AutoServe Health events",
        version=VERSION,
        description="Every subject the services publish and consume. Payloads are JSON; the `type` field names "
        "the event. Generated by scripts/gen_asyncapi.py from libs/events and each service's consumers.",
        schema_version="3.0.0",
    ).to_specification()
    doc = spec.to_jsonable()
    return _with_payloads(doc, payloads, [AllowReply, OverrideReply])


def _with_payloads(doc: dict[str, Any], payloads: dict[str, list[type]], extra: list[type]) -> dict[str, Any]:
    """Replace FastStream's untyped payloads with the msgspec structs' JSON schemas."""
    all_types = sorted({t for ts in payloads.values() for t in ts} | set(extra), key=lambda t: t.__name__)
    _, definitions = msgspec.json.schema_components(all_types, ref_template="#/components/schemas/{name}")
    schemas: dict[str, Any] = dict(sorted(definitions.items()))
    messages = doc["components"]["messages"]
    for name, message in list(messages.items()):
        title = name.rsplit(":", 1)[0]
        types = {k.replace("/", "."): v for k, v in payloads.items()}[title.replace("/", ".")]
        ref = [{"$ref": f"#/components/schemas/{t.__name__}"} for t in types]
        message["payload"] = ref[0] if len(ref) == 1 else {"oneOf": ref}
        message.pop("correlationId", None)
    doc["components"]["schemas"] = schemas
    for key in ("channels", "operations"):
        doc[key] = dict(sorted(doc[key].items()))
    doc["components"]["messages"] = dict(sorted(messages.items()))
    return doc


def render() -> str:
    return yaml.safe_dump(build(), sort_keys=False, allow_unicode=True, width=120)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
