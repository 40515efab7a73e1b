"""The recovery service's composition root: config from KV, the state feed (replayed,
then live), the shared work feed, claims, runtimes and the load balancer.

Per input on the work feed: wait until the fold has reached it, decide (pure core), take
the instance lease, catch up with what other replicas did to that instance, decide again,
then run each action under its own at-most-once claim and publish ``RecoveryExecuted``
(stored before the input is acknowledged). A deferred remediation (backoff, rate limit)
is a negative acknowledgement with that delay: JetStream keeps the incident, not memory.

SIGTERM drains: no more fetches, the actions in flight get ``drain_seconds`` to finish, and
what is still running then is cut off and its input negatively acknowledged (``_drain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from autoserve_config import AppSpec, env_number, parse_switch
from autoserve_events import (
    APPS_BUCKET,
    EVENTS_STREAM,
    Event,
    FailureDetected,
    HealthChanged,
    MalformedEvent,
    RecoveryExecuted,
    RecoveryStrategy,
    deadletter,
    decode,
    subject,
)
from autoserve_runtime import (
    EventPublisher,
    cancel_all,
    close_nats,
    connect,
    count_published,
    follow_apps,
    provision,
    watch_publisher,
)
from autoserve_runtime.consumer import dead_letter_headers
from autoserve_runtime.observability import EVENTS_IN, HANDLER_SECONDS, PullConsumer, dead_lettered

from .adapters.claims import ClaimHeld, Claims, claims_bucket
from .adapters.docker import DockerRuntime, PortPolicy, docker_socket_available
from .adapters.health import HealthChecks
from .adapters.nginx import NginxSettings, NginxUpstreams
from .adapters.process import ProcessRuntime
from .adapters.runtime import Member, Outcome, RecoveryError, Runtime
from .core import (
    AppPolicy,
    Limits,
    RecoveryState,
    decide,
    left_out,
    panic_announcement,
    panic_restores,
    record,
    restore_plan,
    rolling_member,
)
from .core.strategies import DEFAULT_STRATEGY_MAP, LADDER, TRAFFIC
from .feeds import WORK_DURABLE, state_feed, work_subscription

log = structlog.get_logger("autoserve.recovery")
S = RecoveryStrategy
SERVICE = "recovery"


@dataclass(frozen=True)
class RecoverySettings:
    """Service-wide settings: host-local paths and global bounds (env or flags)."""

    replica: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    docker: bool | None = None  # None: use Docker if its socket is there
    docker_url: str | None = None
    nginx: NginxSettings | None = None
    process_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    lease_seconds: float = 15.0
    history_seconds: float = 3600.0
    concurrency: int = 64
    # SIGTERM: how long actions in flight may run on; ``serve`` cancels 3 s after it.
    drain_seconds: float = 7.0

    @classmethod
    def from_env(cls) -> RecoverySettings:
        env = os.environ
        nginx = None
        if env.get("AUTOSERVE_NGINX_UPSTREAM_DIR"):
            reload = tuple(env.get("AUTOSERVE_NGINX_RELOAD", "nginx -s reload").split())
            nginx = NginxSettings(Path(env["AUTOSERVE_NGINX_UPSTREAM_DIR"]), reload)
        data_dir = Path(env.get("AUTOSERVE_DATA_DIR", ".autoserve"))
        # A bad value raises ValueError naming the variable; ``run_service`` says it and stops.
        return cls(
            replica=env.get("AUTOSERVE_RECOVERY_REPLICA") or f"{socket.gethostname()}-{os.getpid()}",
            docker=parse_switch("AUTOSERVE_RECOVERY_DOCKER", env.get("AUTOSERVE_RECOVERY_DOCKER", "")),
            nginx=nginx,
            process_dir=data_dir / "processes",
            limits=Limits(max_actions_per_minute=int(env_number("AUTOSERVE_RECOVERY_MAX_ACTIONS_PER_MINUTE", 30, 1))),
            lease_seconds=env_number("AUTOSERVE_RECOVERY_LEASE_SECONDS", 15, 0.1),
            drain_seconds=env_number("AUTOSERVE_RECOVERY_DRAIN_SECONDS", 7),
        )


def policy_for(spec: AppSpec) -> AppPolicy:
    return AppPolicy(spec.recovery, spec.health_check.failure_threshold, spec.scaling.max_replicas)


class RecoveryService:
    def __init__(self, nats_url: str, settings: RecoverySettings | None = None) -> None:
        self.nats_url = nats_url
        self.settings = settings or RecoverySettings()
        self.state = RecoveryState()
        self.apps: dict[str, AppSpec] = {}
        self.ready = asyncio.Event()
        self.live = False
        self.state_seq = 0
        self.executed: list[RecoveryExecuted] = []  # what this replica did (tests, logs)
        self.docker: DockerRuntime | None = None
        self.process = ProcessRuntime(self.settings.process_dir) if self.settings.process_dir else None
        self.lb = NginxUpstreams(self.settings.nginx) if self.settings.nginx else None
        self.health = HealthChecks()  # the app's own health check, run directly (rolling restart)
        self._apps_loaded = asyncio.Event()
        self._advanced = asyncio.Event()
        self._healthy_waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = defaultdict(list)
        self._locks: dict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._rolling: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # one rolling restart per app
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._handlers: dict[asyncio.Task[None], Msg] = {}  # in flight, with the input each handles
        self._events_in = EVENTS_IN.child(SERVICE)
        self._observe = HANDLER_SECONDS.labels(SERVICE).observe
        self._watchers: set[asyncio.Task[None]] = set()  # left-out members waiting to answer

    # -- configuration -------------------------------------------------------------------

    def _on_apps(self, apps: dict[str, AppSpec], _written_at: float | None) -> None:
        self.apps = apps
        if self.docker is not None:
            self.docker.selectors = {name: s.docker.label for name, s in apps.items() if s.docker}
            self.docker.ports = {
                name: PortPolicy(
                    s.docker.port,
                    s.health_check.port,
                    tuple(s.docker.replica_ports) if s.docker.replica_ports else None,
                )
                for name, s in apps.items()
                if s.docker
            }
        self._apps_loaded.set()

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        nc = await connect(self.nats_url, f"autoserve-recovery-{self.settings.replica}")
        js = nc.jetstream()
        await provision(js)
        self._js = js
        self.work = PullConsumer(SERVICE, js, EVENTS_STREAM, WORK_DURABLE)  # /metrics: counts and lag
        self.claims = Claims(await claims_bucket(js), self.settings.replica, self.settings.lease_seconds)
        use_docker = self.settings.docker if self.settings.docker is not None else docker_socket_available()
        if use_docker:
            self.docker = await DockerRuntime(url=self.settings.docker_url).start()
        watcher = asyncio.create_task(follow_apps(await js.key_value(APPS_BUCKET), self._on_apps))
        await self._apps_loaded.wait()
        self.publisher = EventPublisher(js).start()
        watch_publisher(SERVICE, self.publisher)
        self._submit = count_published(SERVICE, self.publisher.submit)  # outputs by type
        started = time.monotonic()
        state = await state_feed(js, self._on_state).start(since=time.time() - self.settings.history_seconds)
        if not await state.caught_up(timeout=120.0):
            log.warning("replay did not finish in time; continuing", seq=self.state_seq)
        self.live = True
        log.info("state rebuilt", seq=self.state_seq, seconds=round(time.monotonic() - started, 3),
                 instances=len(self.state.instances), replica=self.settings.replica)  # fmt: skip
        work = await work_subscription(js, self.settings.lease_seconds)
        self.work.bound(work)
        worker = asyncio.create_task(self._work(work, stop))
        self.ready.set()
        try:
            await stop.wait()
        finally:
            log.info("recovery stopping", replica=self.settings.replica, in_flight=len(self._handlers))
            await self._drain(worker)
            await cancel_all([watcher, *self._watchers])
            await self.health.close()
            # Every step is bounded: NATS may be going away at the same moment (``up`` stops
            # everything at once), and a drain against a dead server waits for its timeout.
            await state.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(work.unsubscribe(), 2)
            await self.publisher.close()
            if self.docker is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.docker.close(), 5)
            try:
                await asyncio.wait_for(close_nats(nc), 5)
            except TimeoutError:
                await nc.close()
            log.info("recovery stopped", executed=len(self.executed))

    # -- the state feed ------------------------------------------------------------------

    async def _on_state(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        try:
            event = decode(msg.data)
        except MalformedEvent:
            event = None
        if event is not None:
            self.state.apply(event)
            if isinstance(event, HealthChanged):
                self._on_health_folded(event)
        self.state_seq = max(self.state_seq, seq)
        self._advanced.set()
        self._advanced = asyncio.Event()

    def _on_health_folded(self, event: HealthChanged) -> None:
        if event.healthy:
            for future in self._healthy_waiters.pop((event.app_name, event.instance_id), []):
                if not future.done():
                    future.set_result(None)
        spec = self.apps.get(event.app_name)
        if not self.live or spec is None:
            return  # replayed announcements were published the first time
        announcement = panic_announcement(self.state, event, policy_for(spec))
        if announcement is not None:
            self.state.panic_announced[event.app_name] = bool(announcement.details["panic"])
            log.warning("panic mode", app=event.app_name, **announcement.details)
            self._submit(announcement)

    async def _caught_up(self, seq: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.state_seq < seq:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), left)
        return True

    async def _last_recovery_seq(self, app_name: str, *instance_ids: str) -> int:
        seqs = [0]
        for instance_id in dict.fromkeys(instance_ids):
            with contextlib.suppress(NotFoundError):
                seqs.append(
                    (await self._js.get_last_msg(EVENTS_STREAM, subject(RecoveryExecuted, app_name, instance_id))).seq
                )
        return max(seqs)

    async def _await_healthy(self, app_name: str, instance_id: str, timeout: float) -> bool:
        if self.state.health.get(app_name, {}).get(instance_id):
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._healthy_waiters[(app_name, instance_id)].append(future)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False

    # -- the work feed -------------------------------------------------------------------

    async def _work(self, sub: object, stop: asyncio.Event) -> None:
        """Fetch until ``stop``. A fetch is not cut off by the stop: it ends within its 1 s
        long poll (a message the server hands to an abandoned fetch would wait out its
        ``ack_wait`` before anyone saw it)."""
        while not stop.is_set():
            try:
                # One at a time: nats-py's fetch of a batch, once its long poll has one
                # message, waits for the rest of the batch until the timeout, so the first
                # failure of a quiet period sat up to 1 s in the client (the hang bench's
                # decision p95 was 1.0 s). Inputs are few; a round trip each is cheap.
                msgs = await sub.fetch(batch=1, timeout=1.0)  # type: ignore[attr-defined]
            except (nats.errors.TimeoutError, TimeoutError):
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise asyncio.CancelledError from None  # nats-py turns a cancelled fetch into a timeout
                continue
            except nats.errors.Error as exc:
                log.warning("work fetch failed", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)  # disconnected: nats-py reconnects by itself
                continue
            for msg in msgs:
                self.work.stats.received += 1
                if stop.is_set():  # fetched as the drain began: another replica takes it now
                    await self._give_back([msg])
                    continue
                try:
                    await self._slots.acquire()
                except asyncio.CancelledError:
                    await self._give_back([msg])
                    raise
                task = asyncio.create_task(self._timed(msg))
                self._handlers[task] = msg
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._handlers.pop(task, None)
        self._slots.release()

    async def _drain(self, worker: asyncio.Task[None]) -> None:
        """SIGTERM: fetch no more, let the actions in flight finish within
        ``drain_seconds``, then cut off what still runs and give its inputs back (a
        negative acknowledgement: redelivered at once, to another replica or to this one
        restarted). At most once still holds for a cut-off action: its claim
        ``f.<failure>.<action>`` stays held, not done, so whoever gets the input again
        waits for the claim's lease and asks the runtime whether the action happened
        before doing it (the path of a crashed replica); a finished one is recorded and
        its claim done, so its redelivery does nothing."""
        deadline = time.monotonic() + self.settings.drain_seconds
        await asyncio.wait([worker], timeout=2.0)  # its last long poll (1 s) ends by itself
        await cancel_all([worker])  # unless NATS is away and it is retrying
        if self._handlers:
            log.info("draining: waiting for the actions in flight", count=len(self._handlers),
                     seconds=self.settings.drain_seconds)  # fmt: skip
            await asyncio.wait(list(self._handlers), timeout=max(0.0, deadline - time.monotonic()))
        left = dict(self._handlers)
        if not left:
            return
        log.warning("drain time ran out: actions cut off, their inputs given back", count=len(left),
                    seconds=self.settings.drain_seconds)  # fmt: skip
        for task in left:
            task.cancel()
        await asyncio.wait(list(left), timeout=2.0)  # their ``finally`` blocks release the instance leases
        await self._give_back(list(left.values()))

    async def _give_back(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(msg.nak(), 1.0)

    async def _timed(self, msg: Msg) -> None:
        """Every input's handling is timed (inputs are few, and their actions take seconds)."""
        started = time.perf_counter()
        await self._handle(msg)
        self._observe(time.perf_counter() - started)

    async def _ack(self, msg: Msg) -> None:
        await msg.ack()
        self.work.acked(msg.metadata.sequence.stream)

    async def _handle(self, msg: Msg) -> None:
        try:
            event = decode(msg.data)
        except MalformedEvent as exc:
            await self._dead_letter(msg, str(exc))
            return
        if msg.metadata.num_delivered == 1:  # each input once; a deferred one comes back
            kind = type(event)
            self._events_in[kind] = self._events_in.get(kind, 0) + 1
        try:
            if not await self._caught_up(msg.metadata.sequence.stream, 10):
                await msg.nak(delay=1.0)
                return
            if isinstance(event, FailureDetected):
                delay = await self._on_failure(event, msg)
            elif isinstance(event, HealthChanged):
                delay = await self._on_health(event, msg)
            else:
                delay = None
            await (msg.nak(delay=delay) if delay is not None else self._ack(msg))
        except ClaimHeld as held:
            log.info("action claimed by a replica that stopped renewing; retrying when it runs out", reason=str(held))
            with contextlib.suppress(Exception):
                await msg.nak(delay=held.retry_in)
        except Exception as exc:  # a bug or an outage must not kill the worker: try later
            log.exception("recovery handler failed; will retry", error=str(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.settings.lease_seconds)

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        self.work.stats.dead_lettered += 1
        dead_lettered(SERVICE, reason)
        log.warning("message dead-lettered", subject=msg.subject, reason=reason[:200])
        with contextlib.suppress(Exception):
            await self._js.publish(
                deadletter(SERVICE), msg.data[:65536], headers=dead_letter_headers(SERVICE, msg, reason)
            )
        await self._ack(msg)

    async def _publish(self, event: Event) -> None:
        self.work.stats.outputs += 1
        stored = await self._submit(event, track=True)
        if not stored:
            raise RecoveryError(f"could not store {type(event).__name__} {event.event_id}")

    # -- decisions and actions -----------------------------------------------------------

    async def _on_failure(self, failure: FailureDetected, msg: Msg | None = None) -> float | None:
        if failure.details.get("panic") is not None:
            return None
        spec = self.apps.get(failure.app_name)
        if spec is None:
            await self._unknown_app(failure)
            return None
        policy = policy_for(spec)
        with contextlib.suppress(RecoveryError):  # the escalation ends where the instance's runtime does
            policy = policy.for_runtime(self._runtime(failure.app_name, failure.instance_id, spec))
        if spec.docker is not None and self.docker is not None:
            # A container recovery created belongs to the slot it replaced, even before the
            # action that created it is recorded (a replacement that crashes while awaited).
            lineage = await self.docker.lineage(failure.instance_id)
            if lineage and lineage != failure.instance_id:
                self.state.aliases.setdefault((failure.app_name, failure.instance_id), lineage)
        plan = decide(self.state, failure, policy, self.settings.limits, time.time())
        if plan.empty:
            if plan.notes:
                log.debug("no action", app=failure.app_name, instance=failure.instance_id, notes=plan.notes)
            return None
        lineage = self.state.instance(failure.app_name, failure.instance_id).lineage
        async with self._locks[(failure.app_name, lineage)]:
            key = f"i.{failure.app_name}.{lineage}"
            lease = await self.claims.acquire(key, failure.event_id, reusable=True)
            if lease is None:
                return 0.25  # another replica is acting on this instance: look again shortly
            try:
                seen = await self._last_recovery_seq(failure.app_name, failure.instance_id, lineage)
                await self._caught_up(seen, 5)
                plan = decide(self.state, failure, policy, self.settings.limits, time.time())
                for note in plan.notes:
                    log.debug("recovery bounded", app=failure.app_name, instance=failure.instance_id, note=note)
                traffic = plan.traffic if self.lb is not None else ()
                async with self._renewing(key, failure.event_id, msg):
                    for strategy in traffic:
                        await self._act(failure, strategy, policy, spec)
                    if plan.remediation is not None:
                        await self._act(failure, plan.remediation, policy, spec)
            finally:
                await self.claims.finish(key, failure.event_id)
        return max(0.05, plan.retry_at - time.time()) if plan.retry_at is not None else None

    async def _on_health(self, event: HealthChanged, msg: Msg | None = None) -> float | None:
        """Back into the LB: a healthy instance that was ejected, and, when this change
        puts the app into panic mode, every ejected instance (``panic_restores``)."""
        spec = self.apps.get(event.app_name)
        if spec is None or self.lb is None:
            return None
        policy = policy_for(spec)
        targets = list(panic_restores(self.state, event, policy))
        if restore_plan(self.state, event) and event.instance_id not in targets:
            targets.insert(0, event.instance_id)
        for target in targets:
            lineage = self.state.instance(event.app_name, target).lineage
            async with self._locks[(event.app_name, lineage)]:
                key = f"i.{event.app_name}.{lineage}"
                lease = await self.claims.acquire(key, event.event_id, reusable=True)
                if lease is None:
                    return 0.25  # another replica acts on it: the restores left are done on redelivery
                try:
                    await self._caught_up(await self._last_recovery_seq(event.app_name, target, lineage), 5)
                    own = target == event.instance_id and restore_plan(self.state, event)
                    if own or target in panic_restores(self.state, event, policy):
                        extra: dict[str, object] = {} if own else {"panic": True}
                        async with self._renewing(key, event.event_id, msg):
                            await self._act(event, S.REMOVE_FROM_LB, policy, spec, operation="restore",
                                            target=target, extra=extra)  # fmt: skip
                finally:
                    await self.claims.finish(key, event.event_id)
        return None

    async def _unknown_app(self, failure: FailureDetected) -> None:
        if self.state.handled(failure.event_id):
            return
        listed = DEFAULT_STRATEGY_MAP.get(failure.failure_type, (S.RESTART_CONTAINER,))
        strategy = next((s for s in listed if s not in TRAFFIC), listed[0])
        key = f"f.{failure.event_id}.{strategy}"
        claim = await self.claims.claim_action(key, failure.event_id, str(strategy))
        if claim is None:
            return  # a copy of this failure was answered
        error = f"unknown app {failure.app_name!r}: not in the {APPS_BUCKET} bucket; nothing to act on"
        event = record(self.state, AppPolicy(), failure, strategy, success=False, started_at=time.time(),
                       duration_ms=0.0, error=error)  # fmt: skip
        log.warning("recovery failed", app=failure.app_name, instance=failure.instance_id, error=error)
        await self._publish(event)
        self.state.apply(event)
        await self.claims.finish(key, failure.event_id)

    @contextlib.asynccontextmanager
    async def _renewing(self, key: str, cause: str, msg: Msg | None):  # type: ignore[no-untyped-def]
        """Keep the instance lease and the input's ack deadline alive while actions run;
        a crash lets both expire, and another replica takes the incident over."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.settings.lease_seconds / 3)
                with contextlib.suppress(Exception):
                    await self.claims.renew(key, cause)
                if msg is not None:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            await cancel_all([task])

    async def _act(
        self,
        cause: FailureDetected | HealthChanged,
        strategy: RecoveryStrategy,
        policy: AppPolicy,
        spec: AppSpec,
        operation: str | None = None,
        target: str | None = None,
        extra: dict[str, object] | None = None,
    ) -> RecoveryExecuted | None:
        """One action under its own claim ``f.<cause event_id>.<action>``: at most once.
        The claim names the action and when it began, before anything is done; a replica
        that takes an expired claim over asks the runtime whether the action already
        happened (the owner died after acting, before recording) and records it if so."""
        op = operation or str(strategy)
        target = target or cause.instance_id
        if self.state.is_done(cause.event_id, op, target):
            return None
        key = f"f.{cause.event_id}.{op}" + (f".{target}" if target != cause.instance_id else "")
        claim = await self.claims.claim_action(key, cause.event_id, op)
        if claim is None:
            return None  # done
        held = claim[1]
        started, t0 = time.time(), time.monotonic()
        details: dict[str, object] = {"replica": self.settings.replica, **(extra or {})}
        error = None
        try:
            outcome = None
            if held is not None and held.action == op and strategy not in TRAFFIC:
                outcome = await self._took_effect(cause, strategy, spec, held.since)
                if outcome is not None:
                    log.warning("action already done by a crashed replica; recorded, not repeated", key=key,
                                crashed=held.owner, since=held.since)  # fmt: skip
                    outcome.details |= {"taken_over_from": held.owner, "already_done": True}
            if outcome is None:
                outcome = await asyncio.wait_for(
                    self._execute(cause, strategy, policy, spec, operation, target),
                    policy.recovery.action_timeout_seconds,
                )
            if strategy in (S.RECREATE_CONTAINER, S.REPLACE_INSTANCE, S.SCALE_OUT):
                await self._sync_lb(cause.app_name, spec)
            details |= outcome.details
        except RecoveryError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"{op} did not finish within action_timeout_seconds ({policy.recovery.action_timeout_seconds:g}s)"
        except Exception as exc:  # an adapter's surprise is a failed action, not a dead service
            error = f"{type(exc).__name__}: {exc}"
        event = record(self.state, policy, cause, strategy, success=error is None, started_at=started,
                       duration_ms=(time.monotonic() - t0) * 1000, error=error, details=details,
                       operation=operation, instance_id=target)  # fmt: skip
        await self._publish(event)
        self.state.apply(event)
        self.executed.append(event)
        await self.claims.finish(key, cause.event_id)
        log.info("recovery executed", app=cause.app_name, instance=event.instance_id, strategy=op,
                 success=event.success, ms=event.duration_ms, error=error)  # fmt: skip
        return event

    async def _took_effect(
        self, cause: FailureDetected | HealthChanged, strategy: RecoveryStrategy, spec: AppSpec, since: float
    ) -> Outcome | None:
        app, instance = cause.app_name, cause.instance_id
        lineage = self.state.instance(app, instance).lineage
        try:
            runtime = self._runtime(app, instance, spec)
            return await runtime.took_effect(app, instance, lineage, str(strategy), since, cause.event_id)
        except Exception as exc:  # cannot tell: the action runs (again)
            log.warning("could not check a taken-over action", strategy=str(strategy), error=str(exc))
            return None

    async def _sync_lb(self, app_name: str, spec: AppSpec) -> None:
        """The upstream follows the members: a recreated, replacing or added container in,
        a removed one out (marks of the others kept)."""
        if self.lb is None or not self.lb.manages(app_name):
            return
        try:
            await self.lb.set_down(app_name, await self._members(app_name, spec), None, False)
        except RecoveryError as exc:
            log.warning("upstream not updated after a membership change", app=app_name, error=str(exc))

    def _runtime(self, app_name: str, instance_id: str, spec: AppSpec) -> Runtime:
        if spec.docker is not None:
            if self.docker is None:
                raise RecoveryError(
                    "docker engine unavailable: this recovery service runs without Docker "
                    f"(no socket; DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')})"
                )
            return self.docker
        if self.process is not None and self.process.owns(app_name, instance_id):
            return self.process
        if instance_id not in {i.id for i in spec.instances}:
            raise RecoveryError(f"unknown instance {instance_id!r} of app {app_name!r}: not in its instances")
        raise RecoveryError(
            f"instance {instance_id!r} of {app_name!r} has no runtime: not a container (no docker.label) "
            "and no local process record"
        )

    async def _members(self, app_name: str, spec: AppSpec) -> list[Member]:
        members = [Member(i.id, i.host, i.port or spec.health_check.port) for i in spec.instances]
        if spec.docker is not None and self.docker is not None:
            members += await self.docker.members(app_name)
        return members

    async def _execute(
        self,
        cause: FailureDetected | HealthChanged,
        strategy: RecoveryStrategy,
        policy: AppPolicy,
        spec: AppSpec,
        operation: str | None,
        target: str,
    ) -> Outcome:
        app, instance = cause.app_name, target
        timeout = policy.recovery.action_timeout_seconds
        if strategy in TRAFFIC:
            if self.lb is None:
                raise RecoveryError("no load balancer configured (AUTOSERVE_NGINX_UPSTREAM_DIR)")
            details = await self.lb.set_down(app, await self._members(app, spec), instance, operation != "restore")
            if strategy is S.DRAIN_INSTANCE:
                await asyncio.sleep(policy.recovery.drain_seconds)  # in-flight requests finish
                stopped = await self._runtime(app, instance, spec).stop(app, instance, timeout)
                details |= stopped.details
            return Outcome(details)
        runtime = self._runtime(app, instance, spec)
        if strategy is S.RESTART_CONTAINER:
            return await runtime.restart(app, instance, timeout)
        if strategy is S.RECREATE_CONTAINER:
            return await runtime.recreate(app, instance, timeout)
        if strategy is S.REPLACE_INSTANCE:
            return await runtime.replace(app, instance, timeout, self._await_healthy, cause.event_id)
        if strategy is S.SCALE_OUT:
            return await runtime.scale_out(app, instance, policy.max_replicas, timeout, cause.event_id)
        if strategy is S.ROLLING_RESTART and isinstance(cause, FailureDetected):
            return await self._rolling_restart(cause, runtime, spec, timeout)
        raise RecoveryError(f"strategy {strategy} is not implemented by the recovery service")

    async def _rolling_restart(
        self, cause: FailureDetected, runtime: Runtime, spec: AppSpec, timeout: float
    ) -> Outcome:
        """Every instance of the app, one at a time, the failing one first: out of the LB,
        restart, answering its health check again, back into the LB, then the next one.
        Each other member is restarted under its own instance lease and recorded (a
        ``RecoveryExecuted`` with ``details.member_of``) before the lease is released, so
        its death during the restart is known as ours and not acted on again."""
        app = cause.app_name
        if self._rolling[app].locked():
            raise RecoveryError(f"rolling_restart: a rolling restart of {app} is already running")
        async with self._rolling[app]:
            # A little before ``_act``'s own limit: a member that does not come back is
            # recorded (and left out of the LB) by us, not cut off by that cancellation.
            deadline = time.monotonic() + timeout - min(1.0, timeout / 10)
            members = {m.instance_id: m for m in await self._members(app, spec)}
            order = sorted(await runtime.instances(app), key=lambda i: i != cause.instance_id)
            restarted: list[str] = []
            own: dict[str, object] = {}
            for member in order:
                if self.state.is_done(cause.event_id, S.ROLLING_RESTART, member):
                    restarted.append(member)  # recorded before a takeover
                    continue
                left = time_left(deadline, time.monotonic(), timeout, member, restarted)
                async with contextlib.AsyncExitStack() as stack:
                    if member != cause.instance_id:
                        await stack.enter_async_context(self._member_lease(app, member, cause.event_id, left, timeout))
                    details = await self._roll_one(cause, runtime, spec, members, member, deadline, timeout, restarted)
                    if member == cause.instance_id:
                        own = details
                restarted.append(member)
            return Outcome({**own, "restarted": restarted})

    async def _roll_one(
        self,
        cause: FailureDetected,
        runtime: Runtime,
        spec: AppSpec,
        members: dict[str, Member],
        member: str,
        deadline: float,
        timeout: float,
        restarted: list[str],
    ) -> dict[str, object]:
        """One member of a rolling restart. Taken out of the LB unless an ejection of its
        own has it out (that one is undone by its own restore); put back once it answers.
        One that fails is recorded, and stays out only as a recorded ejection."""
        app = cause.app_name
        started, t0 = time.time(), time.monotonic()
        # Down in nginx without a recorded ejection is a rolling restart's mark (one that a
        # crashed replica left): ours to put back, as much as a server that is up.
        ours = self.lb is not None and self.lb.manages(app) and not self.state.instance(app, member).ejected
        marked: dict[str, object] = {}
        done: Outcome | None = None
        stopped_there = f"stopped there (restarted: {', '.join(restarted) or 'none'})"
        ran_out = f"rolling_restart: action_timeout_seconds ({timeout:g}s) ran out while restarting {member}"
        left = time_left(deadline, time.monotonic(), timeout, member, restarted)  # (its lease took time)
        try:
            if ours:
                marked = await self.lb.set_down(app, list(members.values()), member, True)  # type: ignore[union-attr]
            try:
                done = await runtime.restart(app, member, left)
            except Exception as exc:
                if time.monotonic() < deadline:
                    raise
                raise RecoveryError(f"{ran_out} ({exc or type(exc).__name__}); {stopped_there}") from None
            if time.monotonic() >= deadline:  # restarted, but no time is left to see it answer
                raise RecoveryError(f"{ran_out} (before its health check); {stopped_there}")
            if member in members:
                error = await self.health.answers(app, members[member], spec, deadline)
                if error is not None:
                    raise RecoveryError(
                        f"rolling_restart: {member} does not answer its health check within action_timeout_seconds "
                        f"({timeout:g}s): {error}; {stopped_there}"
                    )
            if ours:  # a failed reload here leaves it out, recorded: the watcher tries again
                await self.lb.set_down(app, list(members.values()), member, False)  # type: ignore[union-attr]
        except Exception as exc:
            # Shielded: a cancellation now (``_act``'s timeout) must not cut the record of
            # a member left out of the LB, or nothing would ever put it back.
            await asyncio.shield(self._member_failed(cause, members, member, ours, marked, started, t0, done,
                                                     str(exc)))  # fmt: skip
            raise
        if member != cause.instance_id:
            event = rolling_member(cause, member, started_at=started, duration_ms=(time.monotonic() - t0) * 1000,
                                   details={"replica": self.settings.replica, **done.details})  # fmt: skip
            await self._record(event)
        return done.details

    async def _member_failed(
        self,
        cause: FailureDetected,
        members: dict[str, Member],
        member: str,
        ours: bool,
        marked: dict[str, object],
        started: float,
        t0: float,
        done: Outcome | None,
        error: str,
    ) -> None:
        """A member that failed: recorded like one that succeeded (its death during the
        restart was ours), and, if we took it out of the LB, left out as a recorded
        ejection, so the normal restore puts it back when it is healthy (``restore_plan``
        on ``HealthChanged``), or, while the detector still calls it healthy (then no such
        change will come), a watcher when it answers. Never raises: the member's own error
        is what the rolling restart reports."""
        app = cause.app_name
        try:
            if member != cause.instance_id:
                details = {"replica": self.settings.replica, **(done.details if done else {})}
                await self._record(rolling_member(cause, member, started_at=started, details=details,
                                                  duration_ms=(time.monotonic() - t0) * 1000, error=error))  # fmt: skip
            if not ours or not marked:
                return
            details = {"replica": self.settings.replica, **marked}
            await self._record(left_out(cause, member, at=time.time(), details=details, reason=error))
        except Exception as exc:  # not recorded: put it back rather than lose it out of the LB
            log.warning("rolling restart member not recorded", app=app, member=member, error=str(exc))
            if ours and marked and not self.state.instance(app, member).ejected:
                with contextlib.suppress(Exception):
                    await self.lb.set_down(app, list(members.values()), member, False)  # type: ignore[union-attr]
            return
        log.warning("rolling restart member left out of the LB until it answers", app=app, member=member)
        if member in members and self.state.health.get(app, {}).get(member) is not False:
            task = asyncio.create_task(self._watch_left_out(cause, members[member]))
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)

    async def _watch_left_out(self, cause: FailureDetected, member: Member) -> None:
        """Back into the LB once it answers its health check, for a left-out member the
        detector does not call unhealthy (no ``HealthChanged(healthy)`` will come for it).
        Ends when it is back, when the detector calls it unhealthy (its recovery restores
        it then), when something else restored it, or after ``history_seconds``."""
        app, instance = cause.app_name, member.instance_id
        end = time.monotonic() + self.settings.history_seconds
        while time.monotonic() < end:
            spec = self.apps.get(app)
            if spec is None or not self.state.instance(app, instance).ejected:
                return
            if self.state.health.get(app, {}).get(instance) is False:
                return
            try:
                answers = await self.health.check(app, member, spec) is None
                if answers and await self._restore_left_out(cause, spec, instance):
                    return
            except Exception as exc:  # NATS away, say: look again next period
                log.warning("left-out member not restored yet", app=app, member=instance, error=str(exc))
            await asyncio.sleep(max(0.5, spec.health_check.period_seconds))  # the prober's pace

    async def _restore_left_out(self, cause: FailureDetected, spec: AppSpec, instance: str) -> bool:
        """The normal restore, under the instance's lease: False if another holds it."""
        lineage = self.state.instance(cause.app_name, instance).lineage
        async with self._locks[(cause.app_name, lineage)]:
            key = f"i.{cause.app_name}.{lineage}"
            lease = await self.claims.acquire(key, cause.event_id, reusable=True)
            if lease is None:
                return False
            try:
                await self._caught_up(await self._last_recovery_seq(cause.app_name, instance, lineage), 5)
                if self.state.instance(cause.app_name, instance).ejected:
                    async with self._renewing(key, cause.event_id, None):
                        await self._act(cause, S.REMOVE_FROM_LB, policy_for(spec), spec, operation="restore",
                                        target=instance, extra={"after": str(S.ROLLING_RESTART)})  # fmt: skip
            finally:
                await self.claims.finish(key, cause.event_id)
        return True

    async def _record(self, event: RecoveryExecuted) -> None:
        await self._publish(event)
        self.state.apply(event)
        self.executed.append(event)

    @contextlib.asynccontextmanager
    async def _member_lease(self, app: str, member: str, cause: str, left: float, timeout: float):  # type: ignore[no-untyped-def]
        """Another instance's lease, for one member of a rolling restart: waited for (its
        own action may be running), bounded by what is ``left`` of the action's time."""
        lineage = self.state.instance(app, member).lineage
        key = f"i.{app}.{lineage}"
        busy = f"until action_timeout_seconds ({timeout:g}s) ran out"
        try:
            await asyncio.wait_for(self._locks[(app, lineage)].acquire(), left)
        except TimeoutError:
            raise RecoveryError(f"rolling_restart: {member} stayed busy with another action {busy}") from None
        try:
            deadline = time.monotonic() + left
            while await self.claims.acquire(key, cause, reusable=True) is None:
                if time.monotonic() > deadline:
                    raise RecoveryError(f"rolling_restart: {member} was leased by another replica {busy}")
                await asyncio.sleep(0.1)  # its holder is acting; bounded by the deadline
            try:
                async with self._renewing(key, cause, None):
                    yield
            finally:
                await self.claims.finish(key, cause)
        finally:
            self._locks[(app, lineage)].release()


def time_left(deadline: float, now: float, timeout: float, member: str, restarted: list[str]) -> float:
    """What a rolling restart has left for ``member``. None left is a timeout that says
    so, instead of a step given no time failing with a misleading error of its own."""
    left = deadline - now
    if left <= 0:
        raise RecoveryError(
            f"rolling_restart: action_timeout_seconds ({timeout:g}s) ran out before {member} was restarted; "
            f"stopped there (restarted: {', '.join(restarted) or 'none'})"
        )
    return left


__all__ = ["LADDER", "RecoveryService", "RecoverySettings"]
