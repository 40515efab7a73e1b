"""The alerter's pure core: routing, grouping timers, escalation, silences, maintenance
windows, dependency suppression and replay, all with time passed in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from autoserve_alerter.core.alerter import BREAKER_OPEN, Alerter, Notification
from autoserve_alerter.core.routing import compile_routes
from autoserve_config import AppSpec, parse_config, parse_cron, parse_duration
from autoserve_events import (
    AlertAcknowledged,
    AlertChanged,
    BreakerStateChanged,
    Event,
    FailureDetected,
    FailureType,
    HealthChanged,
    NotificationLogged,
    RecoveryExecuted,
    RecoveryStrategy,
    SilenceCreated,
)

T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC


def alerting(**section: object):
    base = {"receivers": {"team": {"type": "webhook", "url": "http://127.0.0.1:9/hook"}},
            "route": {"receiver": "team", "group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h"}}  # fmt: skip
    for key, value in section.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value  # type: ignore[index]
    return parse_config({"alerting": base}).alerting


def failure(
    app="web", instance="web-1", ft=FailureType.CONTAINER_STOPPED, severity="critical", ts=T0, **kw
) -> FailureDetected:
    return FailureDetected(failure_type=ft, instance_id=instance, app_name=app, severity=severity,
                           message=f"{ft} on {instance}", timestamp=ts, **kw)  # fmt: skip


def health(healthy: bool, app="web", instance="web-1", ts=T0) -> HealthChanged:
    return HealthChanged(instance_id=instance, app_name=app, healthy=healthy, previous=not healthy, consecutive=3,
                         reason="probe", timestamp=ts)  # fmt: skip


class Harness:
    """The core plus a fake delivery that succeeds; every event is kept, as the stream would."""

    def __init__(self, config=None, apps: dict[str, AppSpec] | None = None) -> None:
        self.core = Alerter(config or alerting())
        if apps:
            self.core.set_apps(apps)
        self.stream: list[Event] = []
        self.sent: list[Notification] = []

    def feed(self, event: Event) -> list[Event]:
        self.stream.append(event)
        out = self.core.handle(event)
        self.stream += out
        return out

    def tick(self, now: float, deliver: bool = True, apps: tuple[str, ...] = ()) -> list[Notification]:
        decisions = self.core.tick(now, apps)
        self.stream += decisions.events
        if deliver:
            for n in decisions.notifications:
                self.sent.append(n)
                if (log := self.core.delivered(n, "sent", now)) is not None:  # a re-send is not logged
                    self.stream.append(log)
        return decisions.notifications

    def alert(self, **match: str):
        found = [a for a in self.core.alerts.values() if all(getattr(a, k) == v for k, v in match.items())]
        assert len(found) == 1, found
        return found[0]


# -- config: durations, cron, validation ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), (45, 45), ("500ms", 0.5)]
)
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == seconds


def test_cron_finds_the_window_start() -> None:
    nightly = parse_cron("0 2 * * *")
    at = datetime(2026, 1, 5, 2, 30, tzinfo=UTC).timestamp()
    assert nightly.last_start(at, 3600) == datetime(2026, 1, 5, 2, 0, tzinfo=UTC).timestamp()
    assert nightly.last_start(at + 3600, 3600) is None  # 03:30: the 02:00 start is more than an hour back
    sundays = parse_cron("*/15 1-3 * * 0")  # 2026-01-04 is a Sunday
    assert (
        sundays.last_start(datetime(2026, 1, 4, 1, 20, tzinfo=UTC).timestamp(), 600)
        == datetime(2026, 1, 4, 1, 15, tzinfo=UTC).timestamp()
    )
    assert sundays.last_start(datetime(2026, 1, 5, 1, 20, tzinfo=UTC).timestamp(), 600) is None


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"route": {"receiver": "nope"}}, "alerting.route.receiver: unknown receiver 'nope' (receivers: team)"),
        ({"route": {"routes": [{"receiver": "x", "match": {"app": "web"}}]}}, "alerting.route.routes[0].receiver: unknown receiver 'x'"),
        ({"route": {"escalation": [{"escalate_after": "5m", "receivers": ["pager"]}]}}, "escalation[0].receivers[0]: unknown receiver 'pager'"),
        ({"route": {"group_wait": "soon"}}, "alerting.route.group_wait: must be a duration"),
        ({"maintenance_windows": [{"name": "n", "schedule": "0 25 * * *", "duration": "1h"}]}, "schedule: hour field '25' must stay within 0-23"),
        ({"receivers": {"team": {"type": "email"}}}, "alerting.receivers.team.smarthost: required for a email receiver"),
        ({"receivers": {"team": {"type": "webhook", "url": "http://127.0.0.1:9/x", "resend_interval": "1m"}}},
         "alerting.receivers.team.resend_interval: only an alertmanager receiver re-sends its alerts"),
        ({"receivers": {"team": {"type": "alertmanager", "url": "http://127.0.0.1:9", "resend_interval": "10ms"}}},
         "alerting.receivers.team.resend_interval: must be at least 0.1s, got '10ms'"),
        ({"route": {"escalation": [{"escalate_after": "10m", "receivers": ["team"]}, {"escalate_after": "5m", "receivers": ["team"]}]}},
         "escalation[1].escalate_after: must be later than the tier before"),
    ],
)  # fmt: skip
def test_alerting_config_problems_have_paths(section, problem) -> None:
    from autoserve_config import ConfigError

    with pytest.raises(ConfigError) as caught:
        alerting(**section)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_depends_on_must_name_known_apps_without_cycles() -> None:
    from autoserve_config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config({"apps": {"web": {"depends_on": ["db", "ghost"]}, "db": {"depends_on": ["web"]}}})
    assert "apps.web.depends_on[1]: unknown app 'ghost'" in caught.value.problems
    assert any("dependency cycle" in p for p in caught.value.problems)


# -- routing ------------------------------------------------------------------------------------


def test_routing_tree_matches_continue_and_inherits() -> None:
    config = alerting(
        receivers={"team": {"type": "webhook", "url": "http://127.0.0.1:9/a"}, "pager": {"type": "webhook", "url": "http://127.0.0.1:9/b"},
                   "db": {"type": "slack", "url": "http://127.0.0.1:9/c"}},
        route={"routes": [
            {"match": {"severity": ["critical", "high"]}, "receiver": "pager", "continue": True, "group_by": ["app", "instance"]},
            {"match": {"app": "db"}, "receiver": "db", "group_wait": "0s"},
            {"match_re": {"failure_type": "health_check_.*"}, "routes": [{"match": {"team": "payments"}, "receiver": "pager"}]},
        ]},
    )  # fmt: skip
    root = compile_routes(config)

    def receivers(**labels: str) -> list[tuple[str, str | None]]:
        return [(r.id, r.receiver) for r in root.route(labels)]

    assert receivers(app="web", severity="low", failure_type="port_not_listening") == [("0", "team")]
    assert receivers(app="db", severity="critical") == [("0.0", "pager"), ("0.1", "db")]  # continue: both
    assert receivers(app="web", severity="low", failure_type="health_check_timeout") == [("0.2", "team")]
    assert receivers(app="pay", severity="low", failure_type="health_check_failed", team="payments") == [
        ("0.2.0", "pager")
    ]
    db = root.routes[1]
    assert (db.group_wait, db.group_interval, db.group_by) == (0.0, 300.0, ("app",))  # inherited but group_wait
    assert root.routes[0].group_by == ("app", "instance")


# -- alerts and grouping timers ------------------------------------------------------------------


def test_group_wait_batches_then_group_interval_then_repeat() -> None:
    h = Harness(alerting(resolve_timeout="1d"))
    h.feed(failure(instance="web-1"))
    assert h.tick(T0 + 29) == []  # group_wait 30 s
    h.feed(failure(instance="web-2", ts=T0 + 10))
    [first] = h.tick(T0 + 30)
    assert {a.instance for a in first.firing} == {"web-1", "web-2"} and first.seq == 1
    h.feed(failure(instance="web-3", ts=T0 + 40))
    h.feed(failure(instance="web-1", ts=T0 + 200))  # still failing: resolve_timeout is 5 minutes
    h.feed(failure(instance="web-2", ts=T0 + 200))
    assert h.tick(T0 + 300) == []  # group_interval: 5 minutes after the last notification
    [second] = h.tick(T0 + 330)
    assert {a.instance for a in second.firing} == {"web-1", "web-2", "web-3"} and second.seq == 2
    assert h.tick(T0 + 630) == []  # nothing new: no notification
    # keep them alive (resolve_timeout 5m), then repeat_interval 4h brings a reminder
    for minute in range(1, 250, 4):
        for i in (1, 2, 3):
            h.feed(failure(instance=f"web-{i}", ts=T0 + minute * 60))
        h.tick(T0 + minute * 60 + 1)
    assert [n.seq for n in h.sent] == [1, 2, 3]
    assert h.sent[2].created_at - h.sent[1].created_at >= 4 * 3600


def test_resolved_notifications_only_when_asked_and_only_for_announced_alerts() -> None:
    h = Harness()
    h.feed(failure())
    h.tick(T0 + 30)
    h.feed(health(True, ts=T0 + 60))
    assert h.alert(instance="web-1").status == "resolved"
    [resolved] = h.tick(T0 + 330)
    assert resolved.status == "resolved" and [a.instance for a in resolved.resolved] == ["web-1"]
    assert h.core.alerts == {} and h.core.groups == {}  # forgotten once announced

    quiet = Harness(
        alerting(receivers={"team": {"type": "webhook", "url": "http://127.0.0.1:9/x", "send_resolved": False}})
    )
    quiet.feed(failure())
    quiet.tick(T0 + 30)
    quiet.feed(health(True, ts=T0 + 60))
    assert quiet.tick(T0 + 330) == [] and quiet.core.alerts == {}
    # resolved before it was ever announced: nobody hears of it
    h2 = Harness()
    h2.feed(failure())
    h2.feed(health(True, ts=T0 + 5))
    assert h2.tick(T0 + 30) == [] and h2.core.groups == {}


def test_low_severity_failures_fire_only_on_an_unhealthy_instance() -> None:
    h = Harness()
    assert h.feed(failure(ft=FailureType.PORT_NOT_LISTENING, severity="low")) == []
    [fired] = h.feed(health(False, ts=T0 + 4))
    assert isinstance(fired, AlertChanged) and fired.status == "firing" and fired.failure_type == "port_not_listening"
    assert len(h.feed(failure(ft=FailureType.HEALTH_CHECK_TIMEOUT, severity="medium", ts=T0 + 5))) == 1
    assert h.feed(failure(ft=FailureType.PORT_NOT_LISTENING, severity="low", ts=T0 + 6)) == []  # already firing


def test_resolve_timeout_and_late_failures() -> None:
    h = Harness()
    h.feed(failure(ft=FailureType.HIGH_ERROR_RATE, severity="low"))
    h.tick(T0 + 299)
    assert h.alert().status == "firing"
    h.tick(T0 + 300)
    assert h.alert().status == "resolved"
    assert h.feed(failure(ft=FailureType.HIGH_ERROR_RATE, severity="low", ts=T0 + 100)) == []  # late copy
    assert len(h.feed(failure(ft=FailureType.HIGH_ERROR_RATE, severity="low", ts=T0 + 400))) == 1  # new episode


def test_breaker_alerts_fire_on_open_and_resolve_on_close() -> None:
    h = Harness()

    def breaker(state, ts):
        return BreakerStateChanged(app_name="web", instance_id="web-1", state=state, previous_state="closed",
                                   consecutive_failures=5, consecutive_successes=0, reason="5 failures", timestamp=ts)  # fmt: skip

    [fired] = h.feed(breaker("open", T0))
    assert fired.failure_type == BREAKER_OPEN and fired.severity == "high"
    h.tick(T0 + 10_000)  # resolve_timeout does not apply: the breaker says when
    assert h.alert().status == "firing"
    [closed] = h.feed(breaker("closed", T0 + 10_001))
    assert closed.status == "resolved"


def test_recovery_is_shown_in_the_notification() -> None:
    h = Harness()
    h.feed(failure())
    h.feed(RecoveryExecuted(strategy=RecoveryStrategy.RESTART_CONTAINER, failure_type=FailureType.CONTAINER_STOPPED,
                            instance_id="web-1", app_name="web", success=True, timestamp=T0 + 1, duration_ms=300))  # fmt: skip
    [n] = h.tick(T0 + 30)
    assert n.firing[0].recovery == "restart_container succeeded"


# -- acknowledgement and escalation --------------------------------------------------------------


def escalating():
    return alerting(
        receivers={"team": {"type": "webhook", "url": "http://127.0.0.1:9/a"}, "oncall": {"type": "webhook", "url": "http://127.0.0.1:9/b"},
                   "boss": {"type": "email", "smarthost": "127.0.0.1:25", "from": "a@x", "to": ["b@x"]}},
        route={"escalation": [{"escalate_after": "10m", "receivers": ["oncall"]}, {"escalate_after": "30m", "receivers": ["boss"]}]},
    )  # fmt: skip


def keep_alive(h: Harness, until: float, step: float = 60) -> None:
    t = T0 + step
    while t <= until:
        h.feed(failure(ts=t))
        h.tick(t)
        t += step


def test_unacknowledged_alerts_escalate_tier_by_tier() -> None:
    h = Harness(escalating())
    h.feed(failure())
    keep_alive(h, T0 + 1800)
    tiers = [(n.tier, n.receiver, round(n.created_at - T0)) for n in h.sent]
    assert tiers == [(0, "team", 60), (1, "oncall", 600), (2, "boss", 1800)]
    keep_alive(h, T0 + 3000)
    assert len(h.sent) == 3  # each tier once


def test_acknowledged_alerts_stop_escalating_and_repeating() -> None:
    h = Harness(escalating())
    h.feed(failure())
    keep_alive(h, T0 + 300)
    alert_id = h.alert().alert_id
    [acked] = h.feed(AlertAcknowledged(alert_id=alert_id, app_name="web", acknowledged_by="alice", timestamp=T0 + 301))
    assert (acked.status, acked.acknowledged_by, acked.previous_status) == ("acknowledged", "alice", "firing")
    assert h.feed(AlertAcknowledged(alert_id=alert_id, app_name="web", acknowledged_by="bob", timestamp=T0 + 302)) == []
    keep_alive(h, T0 + 20_000)
    assert [n.tier for n in h.sent] == [0]
    h.feed(health(True, ts=T0 + 20_001))
    [resolved] = h.tick(T0 + 20_400)
    assert resolved.resolved[0].acknowledged_by == "alice"


def test_an_escalation_that_fell_due_while_down_is_sent_at_once_after_replay() -> None:
    h = Harness(escalating())
    h.feed(failure())
    h.tick(T0 + 30)
    h.feed(failure(ts=T0 + 590))
    restarted = Harness(escalating())
    for event in h.stream:  # the replay
        restarted.core.handle(event)
    # down from T0 + 590 to T0 + 800: the tier-1 escalation fell due at T0 + 600
    sent = restarted.tick(T0 + 800)
    assert [(n.tier, n.receiver) for n in sent] == [(1, "oncall")]


# -- silences, maintenance windows, dependency suppression ---------------------------------------


def silence(app="web", start=T0, end=T0 + 7200, maintenance=False) -> SilenceCreated:
    return SilenceCreated(silence_id="s1", app_name=app, starts_at=start, ends_at=end, created_by="alice",
                          reason="db migration", timestamp=start, maintenance=maintenance)  # fmt: skip


def test_silenced_alerts_are_logged_as_suppressed_then_sent_when_the_silence_ends() -> None:
    h = Harness()
    h.feed(silence())
    h.feed(failure(instance="web-1"))
    h.feed(failure(app="api", instance="api-1"))
    sent = h.tick(T0 + 30)
    assert [n.group_key for n in sent] == ["0:{app=api}"]
    logs = [e for e in h.stream if isinstance(e, NotificationLogged) and e.outcome == "suppressed"]
    assert len(logs) == 1 and logs[0].suppressed == {
        h.alert(app="web").alert_id: "silenced by s1 (alice: db migration)"
    }
    keep = [failure(instance="web-1", ts=T0 + m * 60) for m in range(1, 125)]
    for event in keep:
        h.feed(event)
        h.tick(event.timestamp)
    web = [n for n in h.sent if n.app_name == "web"]
    assert len(web) == 1 and web[0].created_at >= T0 + 7200  # after the silence
    suppressed = [e for e in h.stream if isinstance(e, NotificationLogged) and e.outcome == "suppressed"]
    assert len(suppressed) == 1  # recorded once, not at every flush


def test_maintenance_windows_from_the_config_silence_and_are_recorded() -> None:
    config = alerting(
        maintenance_windows=[{"name": "nightly", "schedule": "0 2 * * *", "duration": "1h", "apps": ["web"]}]
    )
    h = Harness(config)
    at = datetime(2026, 1, 1, 2, 10, tzinfo=UTC).timestamp()
    h.feed(failure(ts=at))
    assert h.tick(at + 30) == []
    [window] = [e for e in h.stream if isinstance(e, SilenceCreated)]
    assert window.maintenance and window.window == "nightly"
    assert (window.starts_at, window.ends_at) == (at - 600, at + 3000)
    h.tick(at + 60)
    assert len([e for e in h.stream if isinstance(e, SilenceCreated)]) == 1  # once per window


def test_dependents_are_suppressed_and_grouped_under_the_failing_dependency() -> None:
    apps = {"db": AppSpec(), "api": AppSpec(depends_on=["db"]), "web": AppSpec(depends_on=["api"])}
    h = Harness(apps=apps)
    h.feed(failure(app="db", instance="db-1"))
    h.feed(failure(app="api", instance="api-1"))
    h.feed(failure(app="web", instance="web-1"))
    sent = h.tick(T0 + 30)
    assert [n.group_key for n in sent] == ["0:{app=db}"]
    assert {(a.app, root) for a, root in sent[0].dependents} == {("api", "db"), ("web", "db")}
    reasons = {k: v for e in h.stream if isinstance(e, NotificationLogged) for k, v in e.suppressed.items()}
    assert set(reasons.values()) == {"dependency db is failing"}  # web's root cause is db, not api
    # db recovers: api and web are still failing, so they are announced now
    h.feed(health(True, app="db", instance="db-1", ts=T0 + 60))
    h.feed(failure(app="api", instance="api-1", ts=T0 + 60))
    h.feed(failure(app="web", instance="web-1", ts=T0 + 60))
    later = h.tick(T0 + 331)
    assert sorted(n.group_key for n in later) == ["0:{app=api}", "0:{app=db}"]  # web: api still fails
    assert [a.app for n in later if n.app_name == "db" for a in n.resolved] == ["db"]


# -- replay -----------------------------------------------------------------------------------------


def test_replay_rebuilds_the_same_state_and_sends_nothing_twice() -> None:
    h = Harness(escalating())
    h.feed(failure(instance="web-1"))
    h.feed(failure(instance="web-2", ts=T0 + 5))
    h.tick(T0 + 30)
    h.feed(health(True, instance="web-2", ts=T0 + 40))
    h.feed(failure(instance="web-1", ts=T0 + 200))
    fresh = Harness(escalating())
    for event in h.stream:
        assert fresh.core.handle(event) == [] or isinstance(event, FailureDetected | HealthChanged)
    assert fresh.core.tick(T0 + 31).notifications == []  # nothing new since the last log
    assert {a.alert_id: a.status for a in fresh.core.alerts.values()} == {
        a.alert_id: a.status for a in h.core.alerts.values()
    }
    # the resolve of web-2 is due in the same flush on both, with the same notification id
    [a] = h.tick(T0 + 330, deliver=False)
    [b] = fresh.tick(T0 + 330, deliver=False)
    assert a.notification_id == b.notification_id and [x.instance for x in a.resolved] == ["web-2"]


def test_an_undelivered_notification_is_decided_again_with_the_same_id() -> None:
    h = Harness()
    h.feed(failure())
    [n] = h.tick(T0 + 30, deliver=False)  # crashed before the receiver answered
    assert h.tick(T0 + 200, deliver=False) == []  # in flight: not decided twice
    fresh = Harness()
    for event in h.stream:
        fresh.core.handle(event)
    [again] = fresh.tick(T0 + 200, deliver=False)
    assert again.notification_id == n.notification_id


def test_a_failed_delivery_is_tried_again_at_the_next_group_interval() -> None:
    h = Harness()
    h.feed(failure())
    [n] = h.tick(T0 + 30, deliver=False)
    h.stream.append(h.core.delivered(n, "failed", T0 + 60, attempts=7, error="HTTP 503"))
    h.feed(failure(ts=T0 + 300))
    assert h.tick(T0 + 300, deliver=False) == []
    [again] = h.tick(T0 + 360, deliver=False)
    assert again.seq == 2 and again.notification_id != n.notification_id


# -- failed escalations and bounded memory -----------------------------------------------------------


def test_a_failed_escalation_is_tried_again_a_group_interval_later() -> None:
    h = Harness(escalating())
    h.feed(failure())
    h.tick(T0 + 30)  # tier 0, sent
    h.feed(failure(ts=T0 + 590))
    [page] = h.tick(T0 + 600, deliver=False)
    assert (page.tier, page.receiver, page.seq) == (1, "oncall", 1)
    h.stream.append(h.core.delivered(page, "failed", T0 + 610, attempts=9, error="HTTP 503"))
    h.feed(failure(ts=T0 + 700))
    assert h.tick(T0 + 700, deliver=False) == []  # not before group_interval (5m) after the failure
    replayed = Harness(escalating())
    for event in h.stream:
        replayed.core.handle(event)
    [again] = h.tick(T0 + 910, deliver=False)
    assert (again.tier, again.receiver, again.seq) == (1, "oncall", 2)
    assert again.notification_id != page.notification_id and [a.instance for a in again.firing] == ["web-1"]
    [same] = replayed.tick(T0 + 910, deliver=False)  # a restarted alerter decides the same retry
    assert same.notification_id == again.notification_id
    h.stream.append(h.core.delivered(again, "sent", T0 + 911))
    h.feed(failure(ts=T0 + 1400))
    assert h.tick(T0 + 1500) == []  # sent: tier 1 is done (tier 2 is due at 30m)


def test_per_instance_memory_is_pruned_after_history() -> None:
    apps = {"web": AppSpec(), "old": AppSpec()}
    h = Harness(alerting(history="1h", resolve_timeout="1d"), apps=apps)
    core = h.core
    for i in range(50):  # containers recreated with new ids: each id is seen once
        h.feed(failure(instance=f"c{i}", ts=T0 + i))
        h.feed(health(True, instance=f"c{i}", ts=T0 + i + 1))  # resolved: remembered against late copies
        h.feed(health(False, instance=f"u{i}", ts=T0 + i))  # unhealthy, then never heard of again
        h.feed(failure(instance=f"p{i}", ft=FailureType.PORT_NOT_LISTENING, severity="low", ts=T0 + i))  # pending
    h.feed(health(False, instance="still-failing", ts=T0))
    h.feed(failure(instance="still-failing", ts=T0 + 1))  # an open alert: still present
    h.feed(health(False, app="old", instance="o-1", ts=T0 + 3500))
    h.feed(health(False, instance="recent", ts=T0 + 3500))
    h.tick(T0 + 100)
    assert (len(core._resolved_at), len(core._unhealthy), len(core._pending)) == (50, 53, 50)
    core.set_apps({"web": AppSpec()})  # "old" is no longer configured
    for minute in range(1, 65):
        h.feed(failure(instance="still-failing", ts=T0 + minute * 60))
        h.tick(T0 + minute * 60 + 30)
    assert core._resolved_at == {} and core._pending == {}
    assert set(core._unhealthy) == {("web", "still-failing"), ("web", "recent")}
    # what was pruned behaves as a restarted alerter that replayed one history would
    assert len(h.feed(failure(instance="u1", ft=FailureType.PORT_NOT_LISTENING, severity="low", ts=T0 + 3900))) == 0


# -- forwarding to Alertmanager: re-sent while firing, as Prometheus does ----------------------------


def forwarding(**receiver: object):
    return alerting(
        receivers={"am": {"type": "alertmanager", "url": "http://127.0.0.1:9", **receiver},
                   "team": {"type": "webhook", "url": "http://127.0.0.1:9/a"}},
        route={"receiver": "am", "routes": [{"match": {"app": "api"}, "receiver": "team"}]},
        resolve_timeout="1d",
    )  # fmt: skip


def test_alerts_forwarded_to_alertmanager_are_resent_while_they_fire_then_sent_resolved() -> None:
    h = Harness(forwarding())
    h.feed(failure())
    h.feed(failure(app="api", instance="api-1"))  # a webhook route: never re-sent
    sent = h.tick(T0 + 30)
    assert sorted((n.receiver, n.valid_for, n.resend) for n in sent) == [("am", 240.0, False), ("team", None, False)]
    assert h.tick(T0 + 89) == []
    [again] = h.tick(T0 + 90)  # the default resend interval: 1m, valid for 4m
    assert (again.receiver, again.resend, again.valid_for, again.retry_for) == ("am", True, 240.0, 60.0)
    assert [a.instance for a in again.firing] == ["web-1"] and again.resolved == ()
    alert_id = h.alert(app="web").alert_id
    h.feed(AlertAcknowledged(alert_id=alert_id, app_name="web", acknowledged_by="alice", timestamp=T0 + 100))
    assert h.tick(T0 + 149) == []
    [acked] = h.tick(T0 + 150)  # acknowledged is still firing for Alertmanager
    assert acked.resend and acked.firing[0].status == "acknowledged"
    h.feed(health(True, ts=T0 + 160))
    [resolved] = h.tick(T0 + 160)  # the resolve goes at once, with its real end
    assert resolved.resend and resolved.firing == () and resolved.resolved[0].ends_at == T0 + 160
    assert h.tick(T0 + 600) != [] and h.core.forwarded == {}  # the group's own resolved notification
    assert h.tick(T0 + 2000) == [] and [a.app for a in h.core.alerts.values()] == ["api"]  # web forgotten
    assert [n for n in h.sent if n.resend and n.receiver != "am"] == []
    logged = [e for e in h.stream if isinstance(e, NotificationLogged)]
    assert len(logged) == 3 and all(e.group_key for e in logged)  # re-sends are not in the log


def test_resend_interval_is_per_receiver_and_a_failed_resend_waits_for_the_next() -> None:
    h = Harness(forwarding(resend_interval="10s"))
    h.feed(failure())
    [first] = h.tick(T0 + 30)
    assert first.valid_for == 40.0
    [again] = h.tick(T0 + 40, deliver=False)
    assert h.tick(T0 + 55, deliver=False) == []  # in flight: one re-send at a time
    assert h.core.delivered(again, "failed", T0 + 50, attempts=3, error="HTTP 503") is None
    assert h.tick(T0 + 59) == []
    [next_one] = h.tick(T0 + 60)
    assert next_one.resend and next_one.notification_id != again.notification_id


def test_resends_survive_a_restart_and_regular_notifications_are_not_repeated() -> None:
    h = Harness(forwarding())
    h.feed(failure(instance="web-1"))
    h.feed(failure(instance="web-2", ts=T0 + 5))
    h.tick(T0 + 30)
    h.tick(T0 + 90)  # a re-send
    h.feed(health(True, instance="web-2", ts=T0 + 100))
    h.tick(T0 + 100)  # web-2's resolve, re-sent at once
    restarted = Harness(forwarding())
    for event in h.stream:
        restarted.core.handle(event)
    assert restarted.core.forwarded == {"am": {h.alert(instance="web-1").alert_id: None,
                                               restarted.alert(instance="web-2").alert_id: None}}  # fmt: skip
    # A re-send is not logged, so the restarted alerter re-sends at once: web-2 resolved again
    # (Alertmanager keeps the first end), web-1 firing; no regular notification comes twice.
    [resend] = restarted.tick(T0 + 120)
    assert resend.resend and [a.instance for a in resend.firing] == ["web-1"]
    assert [a.instance for a in resend.resolved] == ["web-2"]
    assert restarted.tick(T0 + 179) == []
    [later] = restarted.tick(T0 + 180)
    assert later.resend and [a.instance for a in later.firing] == ["web-1"] and later.resolved == ()


# -- the timer's next due time -----------------------------------------------------------------------


def test_next_due_is_the_earliest_timed_decision_and_leaves_out_what_waits_on_an_input() -> None:
    h = Harness(escalating())
    assert h.core.next_due(T0) == float("-inf")  # never pruned yet: tick at once
    h.tick(T0)
    assert h.core.next_due(T0) == T0 + 60  # only the memory prune
    h.feed(failure())
    assert h.core.next_due(T0) == T0 + 30  # group_wait
    [n] = h.tick(T0 + 30, deliver=False)
    # the group waits on its delivery in flight (that wakes the timer), not on a time
    assert h.core.next_due(T0 + 30) == T0 + 60
    h.stream.append(h.core.delivered(n, "sent", T0 + 31))
    h.tick(T0 + 60)
    assert h.core.next_due(T0 + 60) == T0 + 120  # the prune; then tier 1 (T0+600), group_interval (T0+331)
    h.core._next_prune = T0 + 10_000
    assert h.core.next_due(T0 + 60) == T0 + 300  # resolve_timeout: no failure since T0
    h.feed(failure(ts=T0 + 290))
    assert h.core.next_due(T0 + 60) == T0 + 331  # the group's next flush (group_interval after the send)
    h.tick(T0 + 331)
    assert h.core.next_due(T0 + 331) == T0 + 590  # resolve_timeout again, before tier 1 at T0 + 600
    h.feed(failure(ts=T0 + 550))
    assert h.core.next_due(T0 + 331) == T0 + 600  # tier 1's escalation
    h.feed(silence(start=T0 + 560, end=T0 + 900))
    h.tick(T0 + 600)  # tier 1 falls due while silenced: held back
    assert h.core.next_due(T0 + 600) == T0 + 631  # the flush; the held tier waits for the silence's end
    h.feed(failure(ts=T0 + 850))
    h.tick(T0 + 631)
    h.tick(T0 + 850)
    assert h.core.next_due(T0 + 850) == T0 + 900  # the silence ends: the held escalation is decided then


# -- escalations held back, sent when the hold ends (table: inputs in order, time passed in) ---------


def patient_escalating():
    """Tier 0 to team, tier 1 (10m) to oncall, tier 2 (30m) to boss; alerts do not time out."""
    return alerting(
        receivers={"team": {"type": "webhook", "url": "http://127.0.0.1:9/a"}, "oncall": {"type": "webhook", "url": "http://127.0.0.1:9/b"},
                   "boss": {"type": "webhook", "url": "http://127.0.0.1:9/c"}},
        route={"escalation": [{"escalate_after": "10m", "receivers": ["oncall"]}, {"escalate_after": "30m", "receivers": ["boss"]}]},
        resolve_timeout="1d",
    )  # fmt: skip


DEPENDS = {"db": AppSpec(), "web": AppSpec(depends_on=["db"])}


@dataclass(frozen=True)
class Feed:
    event: Event


@dataclass(frozen=True)
class Tick:
    at: float  # seconds after T0
    sent: tuple[tuple[int, str], ...] = ()  # (tier, receiver) of what this tick decides, in order


@dataclass(frozen=True)
class Restart:
    """The alerter restarts: a new core folds the stream so far (the replay)."""


@dataclass(frozen=True)
class Ack:
    at: float


def held_logs(stream: list[Event], tier: int) -> list[NotificationLogged]:
    return [e for e in stream if isinstance(e, NotificationLogged) and e.outcome == "suppressed" and e.tier == tier]


HELD_CASES = [
    ("silence over tier 1: recorded once, sent once when the silence ends", [
        Feed(silence(start=T0, end=T0 + 900)), Feed(failure()),
        Tick(30), Tick(600), Tick(610), Tick(899),
        Tick(900, sent=((0, "team"), (1, "oncall"))),  # tier 0's flush is due too (group_interval after T0+600)
        Tick(960), Tick(1500),
    ], {1: 1}),
    ("silence over tiers 1 and 2: each tier once when it ends", [
        Feed(silence(start=T0, end=T0 + 2400)), Feed(failure()),
        Tick(600), Tick(1800), Tick(2399),
        Tick(2400, sent=((1, "oncall"), (2, "boss"))),
        Tick(2430), Tick(2699, sent=((0, "team"),)), Tick(3000),
    ], {1: 1, 2: 1}),
    ("acknowledged while held: never sent", [
        Feed(silence(start=T0, end=T0 + 900)), Feed(failure()),
        Tick(600), Ack(700), Tick(900), Tick(2000),
    ], {1: 1}),
    ("resolved while held: never sent", [
        Feed(silence(start=T0, end=T0 + 900)), Feed(failure()),
        Tick(600), Feed(health(True, ts=T0 + 700)), Tick(900), Tick(2000),
    ], {1: 1}),
    ("dependency failing at tier 1's time, then healthy: sent then", [
        Feed(failure(app="db", instance="db-1")), Feed(failure()),
        Tick(30, sent=((0, "team"),)),  # db's group; web held under it
        Tick(600, sent=((1, "oncall"),)),  # db escalates; web's tier 1 is held
        Feed(health(True, app="db", instance="db-1", ts=T0 + 700)),
        Tick(700, sent=((1, "oncall"),)),  # web's overdue escalation, once
        Tick(930, sent=((0, "team"), (0, "team"))),  # both groups flush: db resolved, web announced
        Tick(1300),
    ], {1: 1}),
    ("restart while held: the replay keeps it pending, sent once", [
        Feed(silence(start=T0, end=T0 + 900)), Feed(failure()),
        Tick(600), Restart(), Tick(899),
        Tick(900, sent=((1, "oncall"),)),
        Restart(), Tick(960, sent=((0, "team"),)), Tick(1500),
    ], {1: 1}),
    ("down when the silence ends: sent once after the restart", [
        Feed(silence(start=T0, end=T0 + 900)), Feed(failure()),
        Tick(600), Restart(),
        Tick(1200, sent=((0, "team"), (1, "oncall"))), Restart(), Tick(1210), Tick(1600),
    ], {1: 1}),
]  # fmt: skip


@pytest.mark.parametrize(("steps", "held_records"), [c[1:] for c in HELD_CASES], ids=[c[0] for c in HELD_CASES])
def test_held_escalations_are_sent_once_when_the_hold_ends(steps, held_records) -> None:
    h = Harness(patient_escalating(), apps=DEPENDS)
    for step in steps:
        match step:
            case Feed(event=event):
                h.feed(event)
            case Ack(at=at):
                h.feed(AlertAcknowledged(alert_id=h.alert(app="web").alert_id, app_name="web", acknowledged_by="alice",
                                         timestamp=T0 + at))  # fmt: skip
            case Restart():
                restarted = Harness(patient_escalating(), apps=DEPENDS)
                for event in h.stream:
                    restarted.core.handle(event)
                restarted.stream, restarted.sent = h.stream, h.sent
                # the fold rebuilds the same pending escalations and progress
                assert {k: g.tier_held for k, g in restarted.core.groups.items()} == {
                    k: g.tier_held for k, g in h.core.groups.items()
                }
                assert {a.alert_id: a.escalated for a in restarted.core.alerts.values()} == {
                    a.alert_id: a.escalated for a in h.core.alerts.values()
                }
                h = restarted
            case Tick(at=at, sent=expected):
                decided = h.tick(T0 + at)
                assert [(n.tier, n.receiver) for n in decided] == list(expected), f"tick at T0+{at:g}"
                assert all(n.firing for n in decided if n.tier > 0)
    assert {tier: len(held_logs(h.stream, tier)) for tier in held_records} == held_records
    web_escalations = [n for n in h.sent if n.tier > 0 and any(a.app == "web" for a in n.firing)]
    assert len({(n.tier, n.receiver) for n in web_escalations}) == len(web_escalations)  # each tier at most once


def test_a_resolve_alertmanager_never_took_is_given_up_after_history() -> None:
    config = alerting(receivers={"am": {"type": "alertmanager", "url": "http://127.0.0.1:9"}},
                      route={"receiver": "am"}, history="1h", resolve_timeout="1d")  # fmt: skip
    h = Harness(config)
    h.feed(failure())
    h.tick(T0 + 30)  # forwarded
    h.feed(health(True, ts=T0 + 60))
    resends = 0
    for minute in range(1, 70):  # Alertmanager is down from now on: every delivery fails
        now = T0 + 60 * minute + 1
        for n in h.tick(now, deliver=False):
            resends += n.resend
            log = h.core.delivered(n, "failed", now, attempts=3, error="connection refused")
            if log is not None:
                h.stream.append(log)
    assert resends >= 55 and h.core.forwarded == {}  # tried each minute, given up after history
    assert [n for n in h.tick(T0 + 5000, deliver=False) if n.resend] == []
