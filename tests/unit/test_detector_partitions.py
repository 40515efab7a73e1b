"""The detector's partition table: which inputs a member folds, which outputs it publishes,
what waits, and which floors it writes, driven by sequences of inputs and membership
changes (in the manner of Kubernetes' worker_test.go)."""

from __future__ import annotations

from collections import Counter

from autoserve_detector.core.partitions import PARTITIONS, PartitionTable, Route, partition_key, partition_of

SKIP, HOLD, SILENT, PUBLISH = Route.SKIP, Route.HOLD, Route.SILENT, Route.PUBLISH
P, Q = 3, 5  # two partitions


def feed(table: PartitionTable[str], inputs: list[tuple[int, int]]) -> list[Route]:
    """Live inputs (partition, seq): the route of each; a held one is held as 's<seq>'."""
    routes = []
    for partition, seq in inputs:
        route = table.route(partition, seq)
        if route is HOLD:
            table.hold(partition, seq, f"s{seq}")
        routes.append(route)
    return routes


def rebuild(table: PartitionTable[str], floors: dict[int, int], replayed: list[tuple[int, int]]) -> tuple[list, dict]:
    """One replay pass: the routes of the replayed inputs, then what each rebuilt partition
    released in order (None: the rebuild was stale)."""
    batch = table.start_rebuilds()
    for partition, r in batch.items():
        table.floor_read(partition, r, floors.get(partition, 0))
    routes = [table.replay_route(partition, seq, batch) for partition, seq in replayed]
    return routes, {partition: table.rebuilt(partition, r) for partition, r in batch.items()}


def test_partitions_are_stable_and_spread() -> None:
    assert partition_of("web", "w-1") == 42  # blake2b, not hash(): the same in every process and version
    spread = Counter(partition_of("web", f"w-{n}") for n in range(6400))
    assert set(spread) == set(range(PARTITIONS)) and max(spread.values()) < 2 * 6400 / PARTITIONS
    assert partition_key(17) == "p17"


def test_a_member_that_starts_rebuilds_then_publishes_above_the_floor() -> None:
    table: PartitionTable[str] = PartitionTable()
    update = table.update({P}, fenced=False, position=10)
    assert (update.gained, update.lost) == ([P], [])
    assert feed(table, [(Q, 11), (P, 12), (P, 13)]) == [SKIP, HOLD, HOLD]  # not ours; ours wait
    routes, released = rebuild(table, {P: 7}, [(P, 5), (Q, 6), (P, 8), (P, 10), (P, 12)])
    assert routes == [SILENT, SKIP, PUBLISH, PUBLISH, SKIP]  # at/below the floor silent; 12 is live, held
    assert released == {P: [(PUBLISH, "s12"), (PUBLISH, "s13")]}  # then folded in order
    assert feed(table, [(P, 14), (Q, 15)]) == [PUBLISH, SKIP]


def test_a_member_behind_the_previous_owner_publishes_nothing_it_already_published() -> None:
    table: PartitionTable[str] = PartitionTable()
    table.update({P}, fenced=False, position=10)
    assert feed(table, [(P, 15)]) == [HOLD]
    routes, released = rebuild(table, {P: 20}, [(P, 4), (P, 9)])
    assert routes == [SILENT, SILENT]
    assert released == {P: [(SILENT, "s15")]}
    assert feed(table, [(P, 20), (P, 21)]) == [SILENT, PUBLISH]


def test_a_partition_lost_while_rebuilding_releases_what_waited() -> None:
    table: PartitionTable[str] = PartitionTable()
    table.update({P, Q}, fenced=False, position=1)
    feed(table, [(P, 2), (Q, 3), (P, 4)])
    batch = table.start_rebuilds()
    assert table.replay_route(P, 1, batch) is PUBLISH
    update = table.update({Q}, fenced=False, position=4)  # another member joined and took P
    assert (update.lost, update.released) == ([P], ["s2", "s4"])
    assert table.replay_route(P, 1, batch) is SKIP  # the replay under way folds no more of it
    assert table.rebuilt(P, batch[P]) is None  # stale: P is not ours
    assert table.rebuilt(Q, batch[Q]) == [(PUBLISH, "s3")]
    assert feed(table, [(P, 5), (Q, 6)]) == [SKIP, PUBLISH]


def test_a_partition_lost_and_gained_again_during_a_replay_is_rebuilt_again() -> None:
    table: PartitionTable[str] = PartitionTable()
    table.update({P}, fenced=False, position=5)
    first = table.start_rebuilds()
    table.update(set(), fenced=False, position=6)
    table.update({P}, fenced=False, position=9)
    assert table.rebuilt(P, first[P]) is None  # the first replay stopped at 5: not enough
    routes, released = rebuild(table, {P: 0}, [(P, 7), (P, 9)])
    assert routes == [PUBLISH, PUBLISH] and released == {P: []}


def test_a_fenced_member_folds_and_writes_nothing_and_rebuilds_what_it_still_owns() -> None:
    table: PartitionTable[str] = PartitionTable()
    table.update({P, Q}, fenced=False, position=0)
    rebuild(table, {}, [])
    table.floors_written({P: 10, Q: 10})
    assert feed(table, [(P, 11)]) == [PUBLISH]
    update = table.update(set(), fenced=True, position=11)  # paused past the lease
    assert update.lost == [P, Q] and table.live_at_fence == {P: 11, Q: 11}  # folded live up to 11
    assert feed(table, [(P, 12), (Q, 13), (Q, 14)]) == [HOLD, HOLD, HOLD]
    assert table.floors_due(acked=11) == {}
    update = table.update({P}, fenced=False, position=14)  # a member again; Q moved meanwhile
    assert (update.gained, update.released) == ([P], ["s13", "s14"])
    assert table.live_at_fence == {P: 11}  # Q is another member's now
    assert feed(table, [(P, 15)]) == [HOLD]
    routes, released = rebuild(table, {P: 12}, [(P, 12), (P, 14)])
    assert routes == [SILENT, PUBLISH]  # the successor published up to 12
    assert released == {P: [(SKIP, "s12"), (PUBLISH, "s15")]}  # 12 was covered by the replay
    assert table.live_at_fence == {}


def test_fenced_while_rebuilding_the_waiting_inputs_wait_on() -> None:
    table: PartitionTable[str] = PartitionTable()
    table.update({P}, fenced=False, position=4)
    batch = table.start_rebuilds()
    feed(table, [(P, 5)])
    table.update(set(), fenced=True, position=5)
    assert table.rebuilt(P, batch[P]) is None
    assert table.replay_route(P, 3, batch) is SKIP  # a replay still running publishes nothing
    table.update({P}, fenced=False, position=6)
    _, released = rebuild(table, {}, [])
    assert released == {P: [(SKIP, "s5")]}


def test_floors_only_for_live_partitions_and_only_upward() -> None:
    table: PartitionTable[str] = PartitionTable()
    table.update({P, Q}, fenced=False, position=0)
    assert table.floors_due(acked=3) == {}  # rebuilding: the replay's outputs are not stored yet
    rebuild(table, {P: 8}, [])
    assert table.floors_due(acked=5) == {Q: 5}  # P's floor (8) is higher: never lowered
    table.floors_written({Q: 5})
    assert table.floors_due(acked=5) == {}  # unchanged: not written again
    assert table.floors_due(acked=9) == {P: 9, Q: 9}


def test_a_member_that_leaves_writes_floors_below_what_it_did_not_fold() -> None:
    table: PartitionTable[str] = PartitionTable()
    table.update({P, Q}, fenced=False, position=0)
    rebuild(table, {}, [])
    table.floors_written({P: 4, Q: 9})
    feed(table, [(P, 10)])
    table.update(set(), fenced=True, position=10)  # leaving (SIGTERM)
    feed(table, [(P, 11), (Q, 12)])
    assert table.release_fenced() == ["s11", "s12"]  # acknowledged, not folded
    assert table.final_floors(acked=12) == {P: 10, Q: 10}  # whoever folds 11 and 12 publishes them
    assert table.final_floors(acked=6) == {P: 6}  # the drain stopped early: only what is stored


def test_a_failed_replay_is_tried_again() -> None:
    table: PartitionTable[str] = PartitionTable()
    table.update({P}, fenced=False, position=3)
    batch = table.start_rebuilds()
    assert table.start_rebuilds() == {}  # under way
    table.retry(batch)
    assert list(table.start_rebuilds()) == [P]
