# ruff: noqa: F811  (the secure_nats fixture is imported and used as a parameter)
"""Bus security with a real nats-server running deploy/nats/nats-server.conf: each user may
publish only what its service owns, the operator user only reads, every user reads only its
own replies (its inbox prefix), the breaker answers only the requests it received, the admin
acks and silences alerts, and a service without create rights waits for the admin to
provision. Credentials themselves: test_security_credentials.py."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from autoserve_events import (
    APPS_BUCKET,
    BREAKER_ALLOW_RPC,
    EVENTS_STREAM,
    PROBES_STREAM,
    AlertAcknowledged,
    AlertChanged,
    AllowReply,
    AllowRequest,
    BreakerStateChanged,
    ContainerObserved,
    Event,
    FailureDetected,
    FailureType,
    HealthChanged,
    NotificationLogged,
    ProbeCompleted,
    RecoveryExecuted,
    RecoveryStrategy,
    SilenceCreated,
    decode,
    decode_allow_reply,
    encode,
    encode_message,
    headers_for,
    subject_for,
)
from autoserve_runtime import EventPublisher, free_port, provision, spawn_child, stop_child
from autoserve_runtime.breaker_client import BreakerClient
from autoserve_runtime.bus import NatsAuth, connect, permission_denials
from autoserve_runtime.provisioning import CLAIMS_BUCKET

from ..support.secure_nats import (
    AUTOSERVE,
    ROOT,
    SERVICE_USERS,
    USERS,
    SecureNats,
    clean_env,
    command,
    get,
    inbox,
    provisioned,
    refused,
    secure_nats,  # noqa: F401  (a fixture)
    session,
    stored,
)
from .conftest import LOCALHOST, wait_for

T = 1_700_000_000.0
SAMPLES: dict[str, Event] = {
    "ProbeCompleted": ProbeCompleted(instance_id="w-1", app_name="web", check_type="http", is_healthy=False,
                                     response_time_ms=1.0, timestamp=T),
    "ContainerObserved": ContainerObserved(instance_id="w-1", app_name="web", container_id="c", event="die",
                                           timestamp=T),
    "HealthChanged": HealthChanged(instance_id="w-1", app_name="web", healthy=False, previous=True, consecutive=3,
                                   reason="test", timestamp=T),
    "FailureDetected": FailureDetected(failure_type=FailureType.PORT_NOT_LISTENING, instance_id="w-1",
                                       app_name="web", severity="high", message="planted", timestamp=T),
    "RecoveryExecuted": RecoveryExecuted(strategy=RecoveryStrategy.RESTART_CONTAINER, failure_type=None,
                                         instance_id="w-1", app_name="web", success=True, timestamp=T,
                                         duration_ms=1.0),
    "BreakerStateChanged": BreakerStateChanged(app_name="web", instance_id="w-1", state="open",
                                               previous_state="closed", consecutive_failures=5,
                                               consecutive_successes=0, reason="test", timestamp=T),
    "AlertChanged": AlertChanged(alert_id="a1b2c3d4e5f6", app_name="web", instance_id="w-1", status="firing",
                                 previous_status=None, failure_type="port_not_listening", severity="high",
                                 message="planted", timestamp=T, starts_at=T),
    "NotificationLogged": NotificationLogged(receiver="ops", group_key="web", outcome="sent", timestamp=T,
                                             app_name="web", firing=["a1b2c3d4e5f6"], attempts=1),
    "SilenceCreated": SilenceCreated(silence_id="s1", app_name="web", starts_at=T, ends_at=T + 3600,
                                     created_by="alerting.maintenance_windows", reason="window", timestamp=T,
                                     maintenance=True, window="nightly"),
    "AlertAcknowledged": AlertAcknowledged(alert_id="a1b2c3d4e5f6", app_name="web", instance_id="w-1",
                                           acknowledged_by="someone", timestamp=T),
}  # fmt: skip

# Which events each service's user may publish: what the service owns, nothing else.
OWNS: dict[str, set[str]] = {
    "prober": {"ProbeCompleted", "ContainerObserved"},
    "detector": {"HealthChanged", "FailureDetected"},
    "breaker": {"BreakerStateChanged"},
    "recovery": {"RecoveryExecuted", "FailureDetected"},  # panic mode is a critical FailureDetected
    "reporter": set(),
    # Alerts, its notification log, maintenance-window silences; an ack is an operator's (admin).
    "alerter": {"AlertChanged", "NotificationLogged", "SilenceCreated"},
}


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_each_service_user_publishes_only_the_events_its_service_owns(secure_nats: SecureNats, user: str) -> None:
    await provisioned(secure_nats)
    me = await session(secure_nats, user)
    js = me.nc.jetstream()
    try:
        for name, event in SAMPLES.items():
            subject = subject_for(event)
            if name in OWNS[user]:  # allowed: JetStream stores it
                ack = await js.publish(subject, encode(event), headers=headers_for(event), timeout=5)
                assert ack.stream in ("AUTOSERVE_PROBES", EVENTS_STREAM)
            else:
                errors = await me.refusals(lambda s=subject, e=event: me.nc.publish(s, encode(e)))
                assert errors == [refused("publish", subject)], (user, name, errors)
        if user != "prober":  # every consumer dead-letters what it cannot take; the prober consumes nothing
            ack = await js.publish(f"autoserve.deadletter.{user}", b"{}", timeout=5)
            assert ack.stream == EVENTS_STREAM
        other = "autoserve.deadletter.reporter" if user != "reporter" else "autoserve.deadletter.detector"
        assert await me.refusals(lambda: me.nc.publish(other, b"{}")) == [refused("publish", other)]
        # No service may create, delete or purge streams, nor write the config.
        for api in ("$JS.API.STREAM.CREATE.X", f"$JS.API.STREAM.DELETE.{EVENTS_STREAM}",
                    f"$JS.API.STREAM.PURGE.{EVENTS_STREAM}", "$KV.autoserve-apps.web"):  # fmt: skip
            assert await me.refusals(lambda a=api: me.nc.publish(a, b"{}")) == [refused("publish", api)]
    finally:
        await me.nc.close()


async def test_a_prober_credential_publishing_failure_detected_is_refused_and_nothing_is_stored(
    secure_nats: SecureNats,
) -> None:
    await provisioned(secure_nats)
    prober = await connect(secure_nats.url, "test-prober", timeout=10, auth=secure_nats.auth("prober"))
    event = SAMPLES["FailureDetected"]
    try:
        with pytest.raises(nats.errors.TimeoutError):  # JetStream never sees it, so no ack comes
            await prober.jetstream().publish(subject_for(event), encode(event), headers=headers_for(event), timeout=2)
        assert permission_denials(prober) == [refused("publish", subject_for(event))]
    finally:
        await prober.close()
    admin = await connect(secure_nats.url, "test-admin", timeout=10, auth=secure_nats.auth("admin"))
    try:
        info = await admin.jetstream().stream_info(EVENTS_STREAM)
        assert info.state.messages == 0
    finally:
        await admin.close()
    assert any("user:prober" in line and "autoserve.event.failure.web.w-1" in line for line in secure_nats.violations())


async def test_the_operator_user_reads_failure_events_and_can_do_nothing_else(secure_nats: SecureNats) -> None:
    await provisioned(secure_nats)
    operator = await session(secure_nats, "operator")
    detector = await session(secure_nats, "detector")
    received: list[str] = []

    async def on_failure(msg: Msg) -> None:
        received.append(msg.subject)

    try:
        await operator.nc.subscribe("autoserve.event.failure.>", cb=on_failure)
        await operator.nc.flush()
        await detector.nc.publish(subject_for(SAMPLES["FailureDetected"]), encode(SAMPLES["FailureDetected"]))
        await wait_for(lambda: received == ["autoserve.event.failure.web.w-1"], timeout=10, what="the failure event")
        for subject in ("autoserve.event.failure.web.w-1", "autoserve.probe.completed.web.w-1",
                        "autoserve.rpc.breaker.override", "$JS.API.STREAM.INFO.AUTOSERVE_EVENTS"):  # fmt: skip
            assert await operator.refusals(lambda s=subject: operator.nc.publish(s, b"{}")) == [
                refused("publish", subject)
            ]
        for subject in ("autoserve.probe.>", "_INBOX.>", "autoserve.rpc.breaker.allow", ">"):
            errors = await operator.refusals(lambda s=subject: operator.nc.subscribe(s))
            assert errors == [refused("subscription", subject)], errors
    finally:
        await operator.nc.close()
        await detector.nc.close()


async def test_a_service_without_create_rights_waits_for_the_admin_to_provision(secure_nats: SecureNats) -> None:
    detector = await connect(secure_nats.url, "test-detector", timeout=10, auth=secure_nats.auth("detector"))
    try:
        waiting = asyncio.create_task(provision(detector.jetstream()))
        await wait_for(lambda: bool(permission_denials(detector)), timeout=20, what="the create to be refused")
        assert permission_denials(detector)[0] == refused("publish", "$JS.API.STREAM.CREATE.AUTOSERVE_PROBES")
        assert not waiting.done()
        await provisioned(secure_nats)
        await asyncio.wait_for(waiting, 30)
        # Provisioned now: a second start only reads, and is refused nothing.
        denied = len(permission_denials(detector))
        await asyncio.wait_for(provision(detector.jetstream()), 10)
        assert len(permission_denials(detector)) == denied
    finally:
        await detector.close()


# -- replies are private: each user subscribes only under its own inbox prefix --------------


async def test_each_user_reads_only_its_own_replies(secure_nats: SecureNats) -> None:
    await provisioned(secure_nats)
    users = [u for u in USERS if u != "operator"]  # the operator subscribes to events only
    for user in users:
        me = await session(secure_nats, user)
        try:
            # Its own inbox works: a reply reaches it (JetStream's, or "no responders" for the client).
            if user == "client":
                with pytest.raises(nats.errors.NoRespondersError):
                    await me.nc.request(BREAKER_ALLOW_RPC, b"{}", timeout=5)
            else:
                assert (await me.nc.jetstream().stream_info(EVENTS_STREAM)).config.name == EVENTS_STREAM
            # Anyone else's replies, or everyone's, it may not read.
            for subject in ("_INBOX.>", *(f"{inbox(u)}.>" for u in users if u != user), ">"):
                errors = await me.refusals(lambda s=subject, m=me: m.nc.subscribe(s))
                assert errors == [refused("subscription", subject)], (user, subject, errors)
        finally:
            await me.nc.close()


async def test_with_its_inbox_prefix_a_service_gets_every_kind_of_reply(secure_nats: SecureNats) -> None:
    from autoserve_recovery.feeds import work_subscription

    await provisioned(secure_nats)
    prober = await session(secure_nats, "prober")
    detector = await connect(secure_nats.url, "test-detector", timeout=10, auth=secure_nats.auth("detector"))
    recovery = await connect(secure_nats.url, "test-recovery", timeout=10, auth=secure_nats.auth("recovery"))
    try:
        js, rjs = detector.jetstream(), recovery.jetstream()
        await provision(js)  # JetStream API answers: stream and bucket info
        probe = SAMPLES["ProbeCompleted"]
        await prober.nc.jetstream().publish(subject_for(probe), encode(probe), headers=headers_for(probe), timeout=5)
        work = await work_subscription(rjs, ack_wait=30)  # recovery's pull consumer
        # A publish ack (request/reply), and the publisher's acks on one wildcard inbox.
        health = SAMPLES["HealthChanged"]
        await js.publish(subject_for(health), encode(health), headers=headers_for(health), timeout=5)
        publisher = EventPublisher(js).start()
        assert await asyncio.wait_for(publisher.submit(SAMPLES["FailureDetected"], track=True), 10)  # type: ignore[arg-type]
        await publisher.close()
        # A KV watch (an ordered consumer delivering to an inbox) and an ordered replay.
        watcher = await (await js.key_value(APPS_BUCKET)).watchall()
        assert (await watcher.updates(timeout=5)).key == "web"  # type: ignore[union-attr]
        await watcher.stop()
        replay = await js.subscribe(probe_subject := subject_for(probe), stream=PROBES_STREAM, ordered_consumer=True,
                                    deliver_policy=DeliverPolicy.ALL)  # fmt: skip
        assert (await replay.next_msg(timeout=5)).subject == probe_subject
        await replay.unsubscribe()
        # Recovery: a pull fetch (its replies on an inbox) and its claims bucket (direct gets).
        fetched = await work.fetch(2, timeout=5)
        assert [type(decode(m.data)).__name__ for m in fetched] == ["HealthChanged", "FailureDetected"]
        for msg in fetched:
            await msg.ack()
        claims = await rjs.key_value(CLAIMS_BUCKET)
        await claims.create("web.w-1", b"r1")
        assert (await claims.get("web.w-1")).value == b"r1"
        assert permission_denials(detector) == permission_denials(recovery) == []
    finally:
        for nc in (prober.nc, detector, recovery):
            await nc.close()
    assert secure_nats.violations() == []


async def test_a_client_without_its_inbox_prefix_is_refused_its_replies(secure_nats: SecureNats) -> None:
    """The failure mode of a forgotten AUTOSERVE_NATS_INBOX_PREFIX: loud, and named."""
    await provisioned(secure_nats)
    auth = NatsAuth(user="detector", password=secure_nats.passwords["detector"])  # default _INBOX
    detector = await connect(secure_nats.url, "test-detector", timeout=10, auth=auth)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await detector.jetstream(timeout=2).stream_info(EVENTS_STREAM)
        (denied,) = permission_denials(detector)
        assert denied.startswith('nats: permissions violation for subscription to "_inbox.'), denied
    finally:
        await detector.close()


# -- the breaker answers requests, and nothing else on anyone's inbox -----------------------


def breaker_violations(server: SecureNats) -> list[str]:
    return [line for line in server.violations() if "user:breaker" in line]


async def test_the_breaker_answers_only_the_requests_it_received_once_each(
    tmp_path: Path, secure_nats: SecureNats
) -> None:
    await provisioned(secure_nats)
    client = await session(secure_nats, "client")
    raw = await session(secure_nats, "breaker")  # a breaker credential, used by hand
    breaker: subprocess.Popen[bytes] | None = None
    try:
        # By hand: one answer per request goes through (allow_responses, max 1), a second is refused.
        async def answer_twice(msg: Msg) -> None:
            await raw.nc.publish(msg.reply, b"first")
            await raw.nc.publish(msg.reply, b"second")

        await raw.nc.subscribe(BREAKER_ALLOW_RPC, cb=answer_twice)
        await raw.nc.flush()
        before = len(raw.errors)
        reply = await client.nc.request(BREAKER_ALLOW_RPC, b"{}", timeout=5)
        assert reply.data == b"first" and reply.subject.startswith(inbox("client") + ".")
        await wait_for(lambda: len(raw.errors) > before, timeout=5, what="the second answer refused")
        assert raw.errors[before:] == [refused("publish", reply.subject)]
        # Nobody's inbox is open to it otherwise: it cannot forge a reply to a JetStream call.
        for subject in ("_INBOX.x", f"{inbox('client')}.x", f"{inbox('admin')}.x.y", f"{inbox('recovery')}.x"):
            assert await raw.refusals(lambda s=subject: raw.nc.publish(s, b"{}")) == [refused("publish", subject)]
        await raw.nc.close()
        by_hand = breaker_violations(secure_nats)

        # The real breaker, as deployed, answers a client's allow and an admin's override.
        port = free_port()
        env = clean_env(**secure_nats.env("breaker"), AUTOSERVE_METRICS_PORT=str(port))
        with (tmp_path / "breaker.log").open("wb") as log:
            breaker = spawn_child([AUTOSERVE, "run", "breaker"], env=env, stdout=log, stderr=subprocess.STDOUT)
        await wait_for(lambda: get(f"http://{LOCALHOST}:{port}/readyz") == 200 or breaker.poll() is not None,
                       timeout=60, what="breaker ready")  # fmt: skip
        assert breaker.poll() is None, (tmp_path / "breaker.log").read_text()[-3000:]
        answer = await BreakerClient(client.nc, timeout=5).check("web", "w-1")
        assert (answer.allow, answer.state, answer.known) == (True, "closed", True)
        raw_answer = await client.nc.request(
            BREAKER_ALLOW_RPC, encode_message(AllowRequest(app_name="web", instance_id="w-1")), timeout=5
        )
        assert decode_allow_reply(raw_answer.data) == AllowReply(allow=True, state="closed", known=True)
        opened = await command("breaker", "open", "web", "w-1", env=clean_env(**secure_nats.env("admin")))
        assert opened.returncode == 0, opened.stderr
        assert opened.stdout.startswith("web/w-1: open (held until `autoserve breaker reset`)")
        assert not (await BreakerClient(client.nc, timeout=5).check("web", "w-1")).allow
    finally:
        if breaker is not None:
            stop_child(breaker)
        for nc in (client.nc, raw.nc):
            await nc.close()
    assert breaker_violations(secure_nats) == by_hand  # the service was refused nothing
    log_text = (tmp_path / "breaker.log").read_text()
    assert "permission denied" not in log_text, log_text[-3000:]


# -- operators ack and silence alerts with the admin credential ----------------------------


async def test_the_admin_acks_and_silences_alerts_and_the_operator_may_not(
    tmp_path: Path, secure_nats: SecureNats
) -> None:
    await provisioned(secure_nats)
    alerter = await session(secure_nats, "alerter")
    alert = SAMPLES["AlertChanged"]
    try:
        await alerter.nc.jetstream().publish(subject_for(alert), encode(alert), headers=headers_for(alert), timeout=5)
    finally:
        await alerter.nc.close()
    admin_env = clean_env(**secure_nats.env("admin", tmp_path))
    operator_env = clean_env(**secure_nats.env("operator", tmp_path))

    acked = await command("alerts", "ack", "a1b2", "--by", "ops@example", "--comment", "on it", env=admin_env)
    assert acked.returncode == 0, acked.stderr
    assert acked.stdout.startswith("acknowledged a1b2c3d4e5f6 (web/w-1 port_not_listening) as ops@example")
    silenced = await command("alerts", "silence", "--app", "web", "--for", "2h", "--reason", "planned upgrade",
                             "--by", "ops@example", env=admin_env)  # fmt: skip
    assert silenced.returncode == 0, silenced.stderr
    assert silenced.stdout.startswith("silenced web until ")

    # The events landed in AUTOSERVE_EVENTS, on the subjects the alerter folds.
    (ack_subject, ack), = await stored(secure_nats, "autoserve.event.alert.ack.>")  # fmt: skip
    assert ack_subject == "autoserve.event.alert.ack.web" and isinstance(ack, AlertAcknowledged)
    assert (ack.alert_id, ack.acknowledged_by, ack.comment) == ("a1b2c3d4e5f6", "ops@example", "on it")
    (silence_subject, silence), = await stored(secure_nats, "autoserve.event.alert.silence.>")  # fmt: skip
    assert silence_subject == "autoserve.event.alert.silence.web" and isinstance(silence, SilenceCreated)
    assert (silence.app_name, silence.instance_id, silence.reason) == ("web", "", "planned upgrade")
    assert round(silence.ends_at - silence.starts_at) == 7200
    assert [line for line in secure_nats.violations() if "user:admin" in line] == []

    # The read-only operator may not: neither through the command nor by hand.
    for args in (("alerts", "ack", "a1b2"), ("alerts", "silence", "--app", "web", "--for", "1h", "--reason", "x")):
        refused_run = await command(*args, env=operator_env)
        assert refused_run.returncode != 0, refused_run.stdout
        assert "nats permission denied" in refused_run.stderr and "user operator" in refused_run.stderr
        assert secure_nats.passwords["operator"] not in refused_run.stdout + refused_run.stderr
    operator = await session(secure_nats, "operator")
    try:
        for name in ("AlertAcknowledged", "SilenceCreated"):
            subject = subject_for(SAMPLES[name])
            errors = await operator.refusals(lambda s=subject, n=name: operator.nc.publish(s, encode(SAMPLES[n])))
            assert errors == [refused("publish", subject)]
    finally:
        await operator.nc.close()
    assert len(await stored(secure_nats, "autoserve.event.alert.ack.>")) == 1
    assert len(await stored(secure_nats, "autoserve.event.alert.silence.>")) == 1
    assert any("user:operator" in line for line in secure_nats.violations())


def test_every_deploy_file_gives_each_user_its_own_inbox_prefix() -> None:
    """The prefixes the config grants (proven live above) are the ones the deploy files set."""
    import yaml

    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "compose" / "compose.yaml").read_text())["services"]
    users = {spec["environment"]["AUTOSERVE_NATS_USER"]: spec["environment"] for spec in compose.values()
             if "AUTOSERVE_NATS_USER" in spec.get("environment", {})}  # fmt: skip
    assert set(users) == {*SERVICE_USERS, "admin"}
    assert all(env["AUTOSERVE_NATS_INBOX_PREFIX"] == inbox(user) for user, env in users.items()), users
    pods = [d["spec"]["template"]["spec"] for d in yaml.safe_load_all((deploy / "k8s" / "autoserve.yaml").read_text())
            if d["kind"] == "Deployment"]  # fmt: skip
    envs = [{e["name"]: e.get("value") for e in pod["containers"][0]["env"]} for pod in pods]
    assert sorted(env["AUTOSERVE_NATS_USER"] for env in envs) == sorted(SERVICE_USERS)
    assert all(env["AUTOSERVE_NATS_INBOX_PREFIX"] == inbox(env["AUTOSERVE_NATS_USER"]) for env in envs), envs
    unit = (deploy / "systemd" / "autoserve@.service").read_text()
    assert (
        "Environment=AUTOSERVE_NATS_USER=%i\n" in unit and "Environment=AUTOSERVE_NATS_INBOX_PREFIX=_INBOX_%i\n" in unit
    )
