"""The alerter's core with several members: each group is notified by its owner only, the
others fold its log entries; a member taking a group over sends what is due and nothing the
log shows sent; the handover fold says which sends may repeat an unlogged one; a receiver's
idempotency keys drop repeats. Time passed in."""

from __future__ import annotations

from autoserve_alerter.core.handover import Handover
from autoserve_alerter.core.idempotency import SeenKeys
from autoserve_alerter.core.notify import TIDY_AFTER
from autoserve_events import Event, NotificationLogged
from autoserve_runtime.ownership import owner_of

from .test_alerter_core import T0, Harness, alerting, failure, health

GROUP = "0:{app=web}"


def members(*names: str) -> dict[str, Harness]:
    """One core per member, each owning by rendezvous over ``names``."""
    cores = {name: Harness(alerting(resolve_timeout="1h")) for name in names}
    for name, h in cores.items():
        h.core.owns = lambda key, me=name: owner_of(key, names) == me
    return cores


def feed_all(cores: dict[str, Harness], *events: Event) -> None:
    for h in cores.values():
        for event in events:
            h.feed(event)


def logs(h: Harness) -> list[NotificationLogged]:
    return [e for e in h.stream if isinstance(e, NotificationLogged) and e.outcome == "sent"]


def test_only_the_owner_of_a_group_notifies_and_the_other_folds_its_log() -> None:
    cores = members("a", "b")
    owner = owner_of(GROUP, ("a", "b"))
    other = "b" if owner == "a" else "a"
    feed_all(cores, failure())
    assert cores[other].tick(T0) == []
    assert cores[other].core.next_due(T0) > T0 + 30  # another's group is no due time here: no spinning
    assert cores[other].tick(T0 + 30) == []
    [sent] = cores[owner].tick(T0 + 30)
    feed_all({other: cores[other]}, *logs(cores[owner]))  # the owner's log entry, through the stream
    group = cores[other].core.groups[GROUP]
    assert (group.seq, group.sent_firing) == (1, frozenset(a.alert_id for a in sent.firing))


def test_a_member_taking_a_group_over_sends_what_is_due_once_and_nothing_logged() -> None:
    cores = members("a", "b")
    owner = owner_of(GROUP, ("a", "b"))
    other = "b" if owner == "a" else "a"
    feed_all(cores, failure())
    [first] = cores[owner].tick(T0 + 30)
    feed_all({other: cores[other]}, *logs(cores[owner]))
    feed_all(cores, failure(instance="web-2", ts=T0 + 40))  # the group has news; then the owner dies
    survivor = cores[other]
    survivor.core.owns = lambda _key: True
    [second] = survivor.tick(T0 + 400)  # due since T0 + 330 (group_interval after the first)
    assert second.seq == 2 and second.notification_id != first.notification_id
    assert [a.instance for a in second.firing] == ["web-1", "web-2"]
    assert survivor.tick(T0 + 401) == []  # nothing again


def test_the_same_history_gives_both_members_the_same_notification_id() -> None:
    """What makes a repeat droppable: the member that takes over sends the same id."""
    cores = members("a", "b")
    feed_all(cores, failure())
    for h in cores.values():
        h.core.owns = lambda _key: True
    ids = {name: h.tick(T0 + 30)[0].notification_id for name, h in cores.items()}
    assert ids["a"] == ids["b"]


def test_a_non_owner_drops_alerts_resolved_long_ago_never_announced() -> None:
    cores = members("a", "b")
    other = "b" if owner_of(GROUP, ("a", "b")) == "a" else "a"
    h = Harness(alerting(route={"group_wait": "30s"}))
    h.core.owns = cores[other].core.owns
    h.feed(failure(ft="health_check_failed", severity="low"))  # waits for an unhealthy verdict
    h.feed(health(False, ts=T0 + 1))
    h.feed(health(True, ts=T0 + 5))  # resolved within group_wait: the owner never announced it
    assert GROUP in h.core.groups
    h.tick(T0 + 10)
    assert GROUP in h.core.groups  # too soon: a late log entry could still say it was announced
    h.tick(T0 + 10 + TIDY_AFTER + 61)  # the next memory prune
    assert h.core.groups == {} and h.core.alerts == {}


def test_handover_counts_what_fell_due_while_the_previous_owner_could_still_send() -> None:
    handover = Handover(me="b", started_at=T0)
    cores = members("a", "b")
    feed_all(cores, failure(ts=T0 + 10), failure(app="api", ts=T0 + 10))
    groups = cores["b"].core.groups
    before = {key: owner_of(key, ("a", "b")) for key in groups}
    taken = handover.moved(groups, before.get, lambda key: "b", lambda member: T0 + 45)  # a alive until T0+45
    assert taken == sum(1 for owner in before.values() if owner == "a")
    cores["b"].core.owns = lambda _key: True
    sent = cores["b"].tick(T0 + 50)  # both groups due at T0 + 40
    repeated = {n.group_key for n in sent if handover.maybe_repeated(n)}
    assert repeated == {key for key, owner in before.items() if owner == "a"}  # b's own: never a's

    late = Handover(me="b", started_at=T0)
    late.moved(groups, before.get, lambda key: "b", lambda member: T0 + 35)  # a died before the flush
    assert not any(late.maybe_repeated(n) for n in sent)


def test_handover_counts_what_fell_due_before_this_process_started() -> None:
    h = Harness()
    h.feed(failure())
    [n] = h.tick(T0 + 60)
    assert n.due_at == T0 + 30
    assert Handover(me="a", started_at=T0 + 40).maybe_repeated(n)  # a previous life may have sent it
    assert not Handover(me="a", started_at=T0 + 20).maybe_repeated(n)


def test_a_receivers_keys_drop_repeats_within_their_capacity() -> None:
    seen = SeenKeys(capacity=2)
    assert seen.first("n1") and not seen.first("n1") and seen.repeats == 1
    seen.forget("n1")  # the first copy could not be handled: the retry is taken
    assert seen.first("n1")
    assert seen.first("n2") and seen.first("n3")  # n1, the oldest, is forgotten
    assert seen.first("n1") and len(seen) == 2
