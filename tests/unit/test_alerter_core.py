"""The alerter's pure core, alerts and groups: config, routing, firing and resolving,
grouping timers, replay and bounded memory, all with time passed in. The harness here is
shared by the other parts' tests (``test_alerter_suppression.py``, ``test_alerter_notify.py``)."""

from __future__ import annotations

import pytest

from autoserve_alerter.core.alerter import BREAKER_OPEN, Alerter, Notification
from autoserve_alerter.core.routing import compile_routes
from autoserve_config import AppSpec, parse_config, parse_duration
from autoserve_events import (
    AlertChanged,
    BreakerStateChanged,
    Event,
    FailureDetected,
    FailureType,
    HealthChanged,
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


def silence(app="web", start=T0, end=T0 + 7200, maintenance=False) -> SilenceCreated:
    return SilenceCreated(silence_id="s1", app_name=app, starts_at=start, ends_at=end, created_by="alice",
                          reason="db migration", timestamp=start, maintenance=maintenance)  # fmt: skip


def escalating():
    return alerting(
        receivers={"team": {"type": "webhook", "url": "http://127.0.0.1:9/a"}, "oncall": {"type": "webhook", "url": "http://127.0.0.1:9/b"},
                   "boss": {"type": "email", "smarthost": "127.0.0.1:25", "from": "a@x", "to": ["b@x"]}},
        route={"escalation": [{"escalate_after": "10m", "receivers": ["oncall"]}, {"escalate_after": "30m", "receivers": ["boss"]}]},
    )  # fmt: skip


# -- config: durations, cron, validation ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), (45, 45), ("500ms", 0.5)]
)
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == seconds


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


# -- bounded memory ----------------------------------------------------------------------------


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
    assert (len(core.book.resolved_at), len(core.book.unhealthy), len(core.book.pending)) == (50, 53, 50)
    core.set_apps({"web": AppSpec()})  # "old" is no longer configured
    for minute in range(1, 65):
        h.feed(failure(instance="still-failing", ts=T0 + minute * 60))
        h.tick(T0 + minute * 60 + 30)
    assert core.book.resolved_at == {} and core.book.pending == {}
    assert set(core.book.unhealthy) == {("web", "still-failing"), ("web", "recent")}
    # what was pruned behaves as a restarted alerter that replayed one history would
    assert len(h.feed(failure(instance="u1", ft=FailureType.PORT_NOT_LISTENING, severity="low", ts=T0 + 3900))) == 0
