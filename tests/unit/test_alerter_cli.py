"""``autoserve events`` with the alerting events: names, aliases, subject filters, the
checks the subjects cannot make, and one readable line each."""

from __future__ import annotations

from autoserve_cli.events import describe, filters, parse_types, render, wanted
from autoserve_events import AlertAcknowledged, AlertChanged, NotificationLogged, SilenceCreated, subject_for

FIRED = AlertChanged(alert_id="a1b2c3", app_name="web", instance_id="w-1", status="firing", previous_status=None,
                     failure_type="container_stopped", severity="critical", message="exit code 137", timestamp=0.0,
                     starts_at=0.0, reason="critical container_stopped")  # fmt: skip
ACK = AlertAcknowledged(alert_id="a1b2c3", app_name="web", instance_id="w-1", acknowledged_by="alice", timestamp=1.0,
                        comment="on it")  # fmt: skip
SILENCE = SilenceCreated(silence_id="s1", app_name="web", starts_at=0.0, ends_at=3600.0, created_by="bob",
                         reason="db migration", timestamp=0.0)  # fmt: skip
SENT = NotificationLogged(receiver="team", group_key="0:{app=web}", outcome="failed", timestamp=2.0, app_name="web",
                          seq=1, firing=["a1b2c3"], attempts=7, error="HTTP 503 from http://127.0.0.1:9")  # fmt: skip


def test_alerting_types_and_their_aliases() -> None:
    assert parse_types(["alert,ack", "silence", "nflog", "NotificationLogged"]) == (
        "AlertChanged",
        "AlertAcknowledged",
        "SilenceCreated",
        "NotificationLogged",
    )


def test_alerting_filters_match_the_published_subjects() -> None:
    names = ["AlertChanged", "AlertAcknowledged", "SilenceCreated", "NotificationLogged"]
    assert filters(names, None, None) == {"AUTOSERVE_EVENTS": [
        "autoserve.event.alert.*", "autoserve.event.alert.ack.*", "autoserve.event.alert.silence.*",
        "autoserve.event.alert.nflog.*",
    ]}  # fmt: skip
    [by_app] = filters(names, "web", "w-1").values()
    assert by_app[:3] == [subject_for(FIRED), subject_for(ACK), subject_for(SILENCE)]
    assert subject_for(SENT) == "autoserve.event.alert.nflog.team"  # the receiver's: --app is checked here


def test_what_the_subjects_cannot_filter_is_checked_on_the_event() -> None:
    assert wanted(FIRED, "web", "w-1") and not wanted(FIRED, "web", "w-2")
    assert wanted(SENT, "web", None) and not wanted(SENT, "api", None)
    assert wanted(SILENCE, "web", "w-2")  # a silence of every instance covers w-2
    assert not wanted(SENT, "web", "w-1")  # a log entry is about a group, not an instance


def test_one_readable_line_per_alerting_event() -> None:
    assert render(FIRED) == (
        "1970-01-01T00:00:00.000Z  AlertChanged         web/w-1  firing (was none) container_stopped "
        "severity=critical alert=a1b2c3: critical container_stopped"
    )
    assert describe(ACK) == "alert a1b2c3 acknowledged by alice: on it"
    assert render(SILENCE) == (
        "1970-01-01T00:00:00.000Z  SilenceCreated       web  silence s1 from 1970-01-01T00:00:00.000Z until "
        "1970-01-01T01:00:00.000Z by bob: db migration"
    )
    assert render(SENT).split(None, 1)[1] == (
        "NotificationLogged   web  failed to team tier=0 seq=1 firing=1 resolved=0 attempts=7: "
        "HTTP 503 from http://127.0.0.1:9"
    )
    held = NotificationLogged(receiver="team", group_key="g", outcome="suppressed", timestamp=0.0,
                              suppressed={"a1": "dependency db is failing"})  # fmt: skip
    assert render(held).split(None, 2)[2] == "*  suppressed for team tier=0: a1 dependency db is failing"
