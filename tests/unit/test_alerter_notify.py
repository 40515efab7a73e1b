"""The alerter's pure core, notification: escalation, failed and undelivered deliveries,
Alertmanager re-sends, the timer's next due time and held-back escalations; time passed in."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from autoserve_config import AppSpec
from autoserve_events import AlertAcknowledged, Event, NotificationLogged

from .test_alerter_core import T0, Harness, alerting, escalating, failure, health, silence

# -- acknowledgement and escalation --------------------------------------------------------------


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


# -- failed and undelivered notifications --------------------------------------------------------


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
