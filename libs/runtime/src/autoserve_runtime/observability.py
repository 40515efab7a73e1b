"""Health and metrics for every service: ``/healthz``, ``/readyz`` and ``/metrics``.

``serve()`` starts one small aiohttp server per process (``127.0.0.1:<per-service port>``
by default; see ``endpoint_for``). What it reports is gathered here, process-wide:

- **liveness** (``/healthz``): the event loop answers. It never depends on NATS, so an
  outage of the bus does not make Kubernetes restart every pod.
- **readiness** (``/readyz``): every check passes: NATS connected (``connect`` reports
  each client), the service's own ``ready`` event set (it is set after replay and after
  its consumers are bound), every watched consumer bound, and not draining (SIGTERM
  turns readiness off at once, before the drain).
- **metrics** (``/metrics``, Prometheus text format): read at scrape time.

Hot paths never touch prometheus-client objects: ``Counter.labels(...).inc()`` measured
3.4 µs here and a bound child's ``inc()`` 0.6 µs, against 0.1 µs for a plain dict
increment; at the detector's 20,000 events/s that is the difference between 7 % and
0.2 % of a core. So services and the runtime count in plain ints (``ConsumerStats``,
``PublisherStats``, ``Tally``) and ``_Collector`` turns them into samples when
Prometheus asks. ``instrument`` (inputs and outputs by type, the fold timed on one input
in 64) adds 0.17 µs a message, measured. A service that fetches from a durable pull
consumer itself (recovery) counts into a ``PullConsumer``, exported the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

    from .consumer import EventConsumer
    from .publisher import EventPublisher

log = structlog.get_logger("autoserve.observability")

# One fixed port per service, so a Kubernetes manifest can name it and ``autoserve up``
# runs every service on one host without a clash. 0 turns the endpoint off.
DEFAULT_PORTS: dict[str, int] = {
    "prober": 9461,
    "detector": 9462,
    "breaker": 9463,
    "recovery": 9464,
    "reporter": 9465,
    "alerter": 9466,
}
DEFAULT_HOST = "127.0.0.1"
PORT_ENV = "AUTOSERVE_METRICS_PORT"
HOST_ENV = "AUTOSERVE_METRICS_HOST"
# Prober shards of one ``run prober --workers N`` get port + SHARD_PORT_STEP * shard.
SHARD_PORT_STEP = 100
SAMPLE_EVERY = 64  # handler latency: one input in 64 is timed (a power of two: a mask)


def base_service(name: str) -> str:
    """``prober-3`` -> ``prober``: shards and replicas share their service's defaults."""
    return name.split("-", 1)[0]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int  # 0: off

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


_override: dict[str, Any] = {}


def request_endpoint(host: str | None = None, port: int | None = None) -> None:
    """What the command line asked for (``--metrics-host``/``--metrics-port``): it wins
    over the environment."""
    if host is not None:
        _override["host"] = host
    if port is not None:
        _override["port"] = port


def endpoint_for(name: str, environ: dict[str, str] | None = None) -> Endpoint:
    """Flag, then ``AUTOSERVE_METRICS_PORT``/``AUTOSERVE_METRICS_HOST``, then the defaults."""
    env = os.environ if environ is None else environ
    host = _override.get("host") or env.get(HOST_ENV) or DEFAULT_HOST
    port: Any = _override.get("port")
    if port is None:
        port = env.get(PORT_ENV) or DEFAULT_PORTS.get(base_service(name), 0)
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{PORT_ENV}: expected a port number (0 turns it off), got {port!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{PORT_ENV}: must be between 0 and 65535, got {number}")
    return Endpoint(host, number)


# -- cheap counters ------------------------------------------------------------------------


class Tally:
    """A labelled counter in plain dicts, exported at scrape time. The leading label values
    pick a child dict (``child``), and the hot path increments its last key in place, a
    dict lookup; a class as that key exports as its name, a tuple as several labels."""

    __slots__ = ("children", "documentation", "labelnames", "name")

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], dict[Any, int]] = {}

    def child(self, *leading: str) -> dict[Any, int]:
        return self.children.setdefault(leading, {})

    def add(self, *labels: str, n: int = 1) -> None:
        counts = self.child(*labels[:-1])
        counts[labels[-1]] = counts.get(labels[-1], 0) + n

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        rows: list[tuple[tuple[str, ...], int]] = []
        for leading, counts in list(self.children.items()):
            for key, count in list(counts.items()):
                last = key if isinstance(key, tuple) else (key.__name__ if isinstance(key, type) else str(key),)
                rows.append(((*leading, *last), count))
        for labels, count in sorted(rows):
            family.add_metric(list(labels), count)
        return family


EVENTS_IN = Tally(
    "autoserve_events_in",
    "Live input events folded by the service, by event type (replay not counted)",
    ("service", "type"),
)
EVENTS_OUT = Tally(
    "autoserve_events_out",
    "Output events the service produced for publishing, by event type",
    ("service", "type"),
)
DEAD_LETTERS = Tally(
    "autoserve_dead_letters",
    "Inputs dead-lettered to autoserve.deadletter.<service>, by reason (oversized, malformed, handler_error, unconfigured)",
    ("service", "reason"),
)
PROBES = Tally(
    "autoserve_probes",
    "Probes completed by the prober, by check type and result; rate() gives probes per second",
    ("check_type", "result"),
)


def dead_letter_reason(reason: str) -> str:
    """A bounded label value for a free-text dead-letter reason."""
    if reason.startswith("oversized"):
        return "oversized"
    if reason.startswith("handler error"):
        return "handler_error"
    if reason.startswith("unconfigured"):  # autoserve_runtime.admission
        return "unconfigured"
    return "malformed"


def dead_lettered(service: str, reason: str) -> None:
    """Called once per dead letter (rare: no need to be cheap)."""
    DEAD_LETTERS.add(service, dead_letter_reason(reason))


def instrument(service: str, process: Callable[[Any], Sequence[Any]]) -> Callable[[Any], Sequence[Any]]:
    """Wrap a consumer's live fold: inputs and outputs counted by type, one call in
    ``SAMPLE_EVERY`` timed into ``autoserve_handler_seconds``."""
    from autoserve_events import Event

    ins, outs = EVENTS_IN.child(service), EVENTS_OUT.child(service)
    observe = HANDLER_SECONDS.labels(service).observe
    clock = time.perf_counter
    mask = SAMPLE_EVERY - 1
    calls = 0

    def instrumented(event: Any) -> Sequence[Any]:
        nonlocal calls
        kind = event.__class__
        ins[kind] = ins.get(kind, 0) + 1
        calls += 1
        if calls & mask:
            outputs = process(event)
        else:
            started = clock()
            outputs = process(event)
            observe(clock() - started)
        if outputs:
            for output in outputs:
                if isinstance(output, Event):
                    kind = output.__class__
                    outs[kind] = outs.get(kind, 0) + 1
        return outputs

    return instrumented


def count_published(service: str, submit: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a publisher's ``submit`` so every event submitted is counted by type (the
    prober's probes also by check type and result)."""
    from autoserve_events import ProbeCompleted

    outs, probes = EVENTS_OUT.child(service), PROBES.child()

    def counted(event: Any, *args: Any, **kwargs: Any) -> Any:
        kind = event.__class__
        outs[kind] = outs.get(kind, 0) + 1
        if kind is ProbeCompleted:
            key = (event.check_type, "healthy" if event.is_healthy else "unhealthy")
            probes[key] = probes.get(key, 0) + 1
        return submit(event, *args, **kwargs)

    return counted


@dataclass
class PullStats:
    """What a service that fetches from a durable pull consumer itself counts (the same
    names as ``ConsumerStats``, so ``/metrics`` exports both alike)."""

    received: int = 0  # deliveries, redeliveries (deferred inputs) included
    duplicates: int = 0
    dead_lettered: int = 0
    outputs: int = 0
    replayed: int = 0
    acked_seq: int = 0  # the highest stream sequence acknowledged


@dataclass(frozen=True)
class _Durable:
    stream: str
    durable: str


class PullConsumer:
    """``/metrics`` and ``/readyz`` for a durable pull consumer a service fetches from by
    itself (the recovery service's work queue, shared by its replicas), as
    ``EventConsumer`` gives them to a push consumer: the service counts into ``stats``
    and marks it ``bound``; its lag is asked of JetStream at scrape time. Watched by weak
    reference: the service keeps it."""

    def __init__(self, service: str, js: JetStreamContext, stream: str, durable: str) -> None:
        self._js = js
        self._spec = _Durable(stream, durable)
        self._sub: object | None = None
        self.stats = PullStats()
        STATE.consumers[id(self)] = (service, weakref.ref(self))
        with contextlib.suppress(AttributeError):
            watch_nats(js._nc)

    def bound(self, sub: object) -> None:
        """The subscription fetches from now on (readiness waits for it)."""
        self._sub = sub

    def acked(self, seq: int) -> None:
        self.stats.acked_seq = max(self.stats.acked_seq, seq)


# -- what the process watches ----------------------------------------------------------------


@dataclass
class _ConsumerInfo:
    pending: int | None = None  # num_pending: stored, not yet delivered
    ack_pending: int | None = None  # delivered, not yet acknowledged


# What a scrape-time gauge or counter reads: one value, or with label names, one per label
# values ({("health_metrics",): 12, ...}).
Reader = Callable[[], float] | Callable[[], Mapping[tuple[str, ...], float]]


@dataclass
class _State:
    service: str = ""
    stopping: bool = False
    ready: list[asyncio.Event] = field(default_factory=list)
    checks: dict[str, Callable[[], bool]] = field(default_factory=dict)
    reasons: dict[str, Callable[[], str | None]] = field(default_factory=dict)
    nats: weakref.WeakValueDictionary[int, Client] = field(default_factory=weakref.WeakValueDictionary)
    consumers: dict[int, tuple[str, weakref.ref[EventConsumer | PullConsumer]]] = field(default_factory=dict)
    publishers: dict[int, tuple[str, weakref.ref[EventPublisher]]] = field(default_factory=dict)
    consumer_info: dict[int, _ConsumerInfo] = field(default_factory=dict)
    gauges: dict[str, tuple[str, tuple[str, ...], Reader]] = field(default_factory=dict)
    counters: dict[str, tuple[str, tuple[str, ...], Reader]] = field(default_factory=dict)
    loop_lag: float = 0.0


STATE = _State()


def watch_nats(nc: Client) -> None:
    """Readiness wants every live client connected (``connect`` and ``watch_publisher`` call this)."""
    STATE.nats[id(nc)] = nc


def watch_publisher(service: str, publisher: EventPublisher) -> None:
    """Export ``publisher.stats``; its NATS connection counts for readiness."""
    STATE.publishers[id(publisher)] = (service, weakref.ref(publisher))
    watch_nats(publisher._js._nc)


def watch_consumer(service: str, consumer: EventConsumer) -> None:
    """Export ``consumer.stats`` and its consumer's lag; readiness waits until it is bound.
    Idempotent. Its publisher is watched too."""
    STATE.consumers[id(consumer)] = (service, weakref.ref(consumer))
    watch_publisher(service, consumer._publisher)


def add_check(name: str, check: Callable[[], bool], reason: Callable[[], str | None] | None = None) -> None:
    """A readiness condition of the service's own (``/readyz`` lists it by name, and while it
    fails, what ``reason`` says under ``reasons``)."""
    STATE.checks[name] = check
    if reason is not None:
        STATE.reasons[name] = reason


def remove_check(name: str) -> None:
    STATE.checks.pop(name, None)
    STATE.reasons.pop(name, None)


def reasons(checks: Mapping[str, bool]) -> dict[str, str]:
    """Why each failing check fails, where the check can say."""
    said = {}
    for name, ok in checks.items():
        explain = STATE.reasons.get(name)
        if not ok and explain is not None:
            with contextlib.suppress(Exception):
                if text := explain():
                    said[name] = text
    return said


def add_gauge(name: str, documentation: str, read: Reader, labelnames: Sequence[str] = ()) -> None:
    """A gauge read at scrape time (``autoserve_`` prefix added if missing)."""
    STATE.gauges[_prefixed(name)] = (documentation, tuple(labelnames), read)


def add_counter(name: str, documentation: str, read: Reader, labelnames: Sequence[str] = ()) -> None:
    """A counter (a value that only grows) read at scrape time; ``_total`` is added."""
    STATE.counters[_prefixed(name)] = (documentation, tuple(labelnames), read)


def _prefixed(name: str) -> str:
    return name if name.startswith("autoserve_") else f"autoserve_{name}"


def _live(refs: dict[int, tuple[str, weakref.ref[Any]]]) -> Iterator[tuple[str, Any]]:
    for key, (service, ref) in list(refs.items()):
        obj = ref()
        if obj is None:
            refs.pop(key, None)
        else:
            yield service, obj


def _bound(consumer: EventConsumer | PullConsumer) -> bool:
    return consumer._sub is not None


def readiness() -> dict[str, bool]:
    """Every check by name; ready when all are true."""
    checks: dict[str, bool] = {"draining": not STATE.stopping}
    clients = [nc for nc in list(STATE.nats.values()) if not nc.is_closed]
    if clients:
        checks["nats connected"] = all(nc.is_connected for nc in clients)
    else:  # no connection watched (yet): a service past its start-up has one, one before has not
        checks["nats connected"] = bool(STATE.ready) and all(event.is_set() for event in STATE.ready)
    for index, event in enumerate(STATE.ready):
        checks["service ready" if index == 0 else f"service ready {index}"] = event.is_set()
    for _, consumer in _live(STATE.consumers):
        checks[f"consumer {consumer._spec.durable} bound"] = _bound(consumer)
    for name, check in list(STATE.checks.items()):
        try:
            checks[name] = bool(check())
        except Exception:  # a broken check reads as not ready, never as a 500
            checks[name] = False
    return checks


# -- the Prometheus side ---------------------------------------------------------------------

REGISTRY = CollectorRegistry(auto_describe=False)
ProcessCollector(registry=REGISTRY)
# The long end is the recovery service's: it times each input's whole handling, the
# Docker or process action included (seconds), where the others time a fold (microseconds).
HANDLER_SECONDS = Histogram(
    "autoserve_handler_seconds",
    f"Time the service's fold takes for one live input (one input in {SAMPLE_EVERY} is timed; "
    "recovery: every input's handling, its actions included)",
    ("service",),
    buckets=(1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0, 5.0, 15.0, 60.0),
    registry=REGISTRY,
)

_CONSUMER_COUNTERS = (
    ("received", "autoserve_consumer_received", "Messages delivered to the durable consumer (duplicates included)"),
    ("duplicates", "autoserve_consumer_duplicates", "Redelivered or duplicated inputs that changed nothing"),
    ("dead_lettered", "autoserve_consumer_dead_lettered", "Inputs dead-lettered (malformed, oversized, handler error)"),
    ("outputs", "autoserve_consumer_outputs", "Outputs the fold produced (events and storage futures)"),
)
_PUBLISHER_COUNTERS = (
    ("submitted", "autoserve_publish_submitted", "Events handed to the publisher"),
    ("acked", "autoserve_publish_stored", "Publishes JetStream acknowledged (stored)"),
    ("retried", "autoserve_publish_retried", "Publishes sent again (no ack in time, or the server was busy)"),
    ("dropped", "autoserve_publish_dropped", "Oldest buffered publishes dropped while NATS was away too long"),
    ("rejected", "autoserve_publish_rejected", "Publishes JetStream refused"),
)


class _Collector:
    def collect(self) -> Iterator[Metric]:
        service = STATE.service or "unknown"
        info = GaugeMetricFamily("autoserve_service_info", "The service this process runs", labels=["service"])
        info.add_metric([service], 1)
        yield info
        checks = readiness()
        ready = GaugeMetricFamily("autoserve_ready", "1 when /readyz answers 200")
        ready.add_metric([], float(all(checks.values())))
        yield ready
        connected = GaugeMetricFamily("autoserve_nats_connected", "1 while connected to NATS", labels=["client"])
        reconnects = CounterMetricFamily("autoserve_nats_reconnects", "Reconnects to NATS", labels=["client"])
        for nc in list(STATE.nats.values()):
            if nc.is_closed:
                continue
            name = str(nc.options.get("name") or "") if hasattr(nc, "options") else ""
            connected.add_metric([name], float(nc.is_connected))
            reconnects.add_metric([name], float(nc.stats.get("reconnects", 0)))
        yield connected
        yield reconnects
        lag = GaugeMetricFamily("autoserve_event_loop_lag_seconds", "How late a 1 s timer fired, last measure")
        lag.add_metric([], STATE.loop_lag)
        yield lag
        yield from self._consumers()
        yield from self._publishers()
        for tally in (EVENTS_IN, EVENTS_OUT, DEAD_LETTERS, PROBES):
            yield tally.family()
        for name, (doc, labelnames, read) in list(STATE.gauges.items()):
            yield _read_into(GaugeMetricFamily(name, doc, labels=labelnames), labelnames, read)
        for name, (doc, labelnames, read) in list(STATE.counters.items()):
            yield _read_into(CounterMetricFamily(name, doc, labels=labelnames), labelnames, read)

    def _consumers(self) -> Iterator[Metric]:
        labels = ["service", "consumer"]
        counters = {attr: CounterMetricFamily(name, doc, labels=labels) for attr, name, doc in _CONSUMER_COUNTERS}
        replayed = GaugeMetricFamily("autoserve_consumer_replayed_events", "Inputs folded at start-up", labels=labels)
        acked = GaugeMetricFamily(
            "autoserve_consumer_acked_sequence", "Stream sequence last acknowledged", labels=labels
        )
        bound = GaugeMetricFamily("autoserve_consumer_bound", "1 once the durable consumer is bound", labels=labels)
        lag = GaugeMetricFamily(
            "autoserve_consumer_lag_messages",
            "Stored messages the durable consumer has not acknowledged yet (num_pending + num_ack_pending)",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            "autoserve_consumer_ack_pending_messages", "Delivered, not yet acknowledged", labels=labels
        )
        for service, consumer in _live(STATE.consumers):
            values = [service, consumer._spec.durable]
            stats = consumer.stats
            for attr, family in counters.items():
                family.add_metric(values, getattr(stats, attr))
            replayed.add_metric(values, stats.replayed)
            acked.add_metric(values, stats.acked_seq)
            bound.add_metric(values, float(_bound(consumer)))
            info = STATE.consumer_info.get(id(consumer))
            if info is not None and info.pending is not None and info.ack_pending is not None:
                lag.add_metric(values, info.pending + info.ack_pending)
                pending.add_metric(values, info.ack_pending)
        yield from counters.values()
        yield from (replayed, acked, bound, lag, pending)

    def _publishers(self) -> Iterator[Metric]:
        counters = {attr: CounterMetricFamily(name, doc, labels=["service"]) for attr, name, doc in _PUBLISHER_COUNTERS}
        waiting = GaugeMetricFamily(
            "autoserve_publish_pending", "Events buffered or in flight, not yet stored", labels=["service"]
        )
        for service, publisher in _live(STATE.publishers):
            for attr, family in counters.items():
                family.add_metric([service], getattr(publisher.stats, attr))
            waiting.add_metric([service], publisher.pending)
        yield from counters.values()
        yield waiting


def _read_into(family: Any, labelnames: tuple[str, ...], read: Callable[[], Any]) -> Metric:
    """A family with what ``read`` returns now; a reader that fails gives no sample (never a 500)."""
    with contextlib.suppress(Exception):
        if labelnames:
            for values, number in sorted(read().items()):
                family.add_metric(list(values), float(number))
        else:
            family.add_metric([], float(read()))
    return family  # type: ignore[no-any-return]


REGISTRY.register(_Collector())  # type: ignore[arg-type]


async def refresh_consumer_info(timeout: float = 1.0) -> None:
    """Ask JetStream for each watched consumer's backlog: one request per consumer per
    scrape, not per message. On a timeout (NATS away) the last known value stays."""

    async def one(consumer: EventConsumer | PullConsumer) -> None:
        with contextlib.suppress(Exception):
            info = await asyncio.wait_for(
                consumer._js.consumer_info(consumer._spec.stream, consumer._spec.durable), timeout
            )
            STATE.consumer_info[id(consumer)] = _ConsumerInfo(info.num_pending or 0, info.num_ack_pending or 0)

    await asyncio.gather(*(one(c) for _, c in _live(STATE.consumers)))


def metrics_text() -> bytes:
    return generate_latest(REGISTRY)


# -- the HTTP server -------------------------------------------------------------------------


class HealthServer:
    """``/healthz``, ``/readyz``, ``/metrics`` on the service's own event loop."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._runner: Any = None
        self._lag_task: asyncio.Task[None] | None = None

    async def start(self) -> bool:
        """Serve; False (and an error logged) if the address is taken: the service runs on
        without it rather than not at all, and its probes fail visibly."""
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.endpoint.host, self.endpoint.port, reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            log.error(
                "health and metrics endpoint off: cannot listen",
                address=f"{self.endpoint.host}:{self.endpoint.port}",
                error=str(exc),
                hint=f"--metrics-port or {PORT_ENV} (0 turns it off)",
            )
            return False
        self._runner = runner
        self._lag_task = asyncio.create_task(_measure_loop_lag(), name="loop-lag")
        log.info("health and metrics endpoint", url=self.endpoint.url, paths="/healthz /readyz /metrics")
        return True

    async def stop(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()

    async def _healthz(self, _request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="ok\n")

    async def _readyz(self, _request: Any) -> Any:
        from aiohttp import web

        checks = readiness()
        ready = all(checks.values())
        body = {"service": STATE.service, "ready": ready, "checks": checks, "reasons": reasons(checks)}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, _request: Any) -> Any:
        from aiohttp import web

        await refresh_consumer_info()
        response = web.Response(body=metrics_text())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


async def _measure_loop_lag(period: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(period)
        STATE.loop_lag = max(0.0, loop.time() - started - period)


def begin(service: str, ready: asyncio.Event | None) -> None:
    """``serve()`` calls this before the service runs."""
    STATE.service = service
    STATE.stopping = False
    if ready is not None and ready not in STATE.ready:
        STATE.ready.append(ready)


def mark_stopping() -> None:
    """SIGTERM: not ready from now on, so traffic and new work go elsewhere while it drains."""
    STATE.stopping = True
