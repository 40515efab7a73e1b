"""The alerter's pure core, silences and maintenance windows: silences, windows from the
config (in a time zone, across DST), dependency suppression; time passed in."""

from __future__ import annotations

from datetime import UTC, datetime

from autoserve_config import AppSpec
from autoserve_events import NotificationLogged, SilenceCreated

from .test_alerter_core import T0, Harness, alerting, failure, health, silence

# -- silences, maintenance windows, dependency suppression ---------------------------------------


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


def test_a_maintenance_window_in_a_time_zone_follows_cron_across_dst() -> None:
    config = alerting(maintenance_windows=[
        {"name": "sundays", "schedule": "0 2 * * SUN", "timezone": "Europe/Berlin", "duration": "1h", "apps": ["web"]}
    ])  # fmt: skip
    h = Harness(config)
    # 2026-03-29: 02:00 does not exist in Berlin; the window opens at the change, 03:00 CEST (01:00 UTC)
    spring = datetime(2026, 3, 29, 1, 0, tzinfo=UTC).timestamp()
    h.tick(spring - 60)
    assert [e for e in h.stream if isinstance(e, SilenceCreated)] == []
    h.tick(spring + 30)
    [opened] = [e for e in h.stream if isinstance(e, SilenceCreated)]
    assert (opened.starts_at, opened.ends_at) == (spring, spring + 3600)
    # 2026-10-25: 02:00 happens twice (00:00 and 01:00 UTC); the window opens once, at the first
    autumn = datetime(2026, 10, 25, 0, 0, tzinfo=UTC).timestamp()
    for minute in range(0, 150, 5):
        h.tick(autumn + minute * 60)
    windows = [e for e in h.stream if isinstance(e, SilenceCreated)]
    assert [(w.starts_at, w.ends_at) for w in windows[1:]] == [(autumn, autumn + 3600)]
