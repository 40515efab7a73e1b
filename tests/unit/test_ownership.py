"""The pure ownership core: rendezvous hashing and the members view, as sequences of inputs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoserve_runtime.ownership import MemberRecord, MemberView, decode_record, encode_record, member_name, owner_of

KEYS = [f"web/w{i}" for i in range(3000)]
names = st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=8)


def record(member: str, ttl: float = 5.0) -> MemberRecord:
    return MemberRecord(service="prober", member=member, host="h", pid=1, started_at=0.0, renewed_at=0.0,
                        ttl_seconds=ttl)  # fmt: skip


def owners(members: set[str]) -> dict[str, str | None]:
    return {key: owner_of(key, members) for key in KEYS}


def test_no_members_no_owner_and_one_member_owns_everything() -> None:
    assert owner_of("web/w1", []) is None
    assert set(owners({"a"}).values()) == {"a"}


def test_keys_spread_evenly_over_three_members() -> None:
    counts: dict[str | None, int] = {}
    for owner in owners({"a", "b", "c"}).values():
        counts[owner] = counts.get(owner, 0) + 1
    assert all(800 < n < 1200 for n in counts.values()), counts


@given(st.sets(names, min_size=1, max_size=6), names)
def test_a_member_joining_takes_keys_only_for_itself_and_leaving_gives_back_only_its_own(
    members: set[str], newcomer: str
) -> None:
    before = {key: owner_of(key, members) for key in KEYS[:300]}
    after = {key: owner_of(key, members | {newcomer}) for key in KEYS[:300]}
    for key in before:
        assert after[key] in (before[key], newcomer)  # nothing moves between the old members
    back = {key: owner_of(key, members) for key in KEYS[:300]}
    assert back == before  # leaving undoes the join exactly


@given(st.lists(names, min_size=1, max_size=6))
def test_the_owner_does_not_depend_on_the_order_members_are_seen_in(members: list[str]) -> None:
    assert owner_of("web/w7", members) == owner_of("web/w7", list(reversed(members)))


def test_the_view_folds_joins_renewals_leaves_and_local_expiry() -> None:
    view = MemberView()
    assert view.put(record("a"), now=0.0) is True
    assert view.put(record("b", ttl=2.0), now=0.0) is True
    assert view.put(record("a"), now=3.0) is False  # a renewal changes nothing
    assert view.expire(now=3.5, grace=1.0) == ["b"]  # 2 s TTL + 1 s grace passed: no marker needed
    assert view.members == {"a"}
    assert view.expire(now=20.0, grace=1.0, keep="a") == []  # never this process itself
    assert view.remove("a") is True and view.remove("a") is False
    assert view.members == frozenset()


def test_records_round_trip_and_garbage_is_ignored() -> None:
    assert decode_record(encode_record(record("a"))) == record("a")
    assert decode_record(b"not json") is None
    assert decode_record(b'{"service": "prober"}') is None


@pytest.mark.parametrize(("given_name", "expected"), [("host.example-1", "host-example-1"), ("web_2", "web_2")])
def test_member_names_become_one_key_token(given_name: str, expected: str) -> None:
    assert member_name(given_name) == expected


def test_a_member_name_with_nothing_usable_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match=r"member name '\.\.\.'"):
        member_name("...")


def test_run_refuses_a_member_name_it_cannot_use_naming_the_flag_and_value(capsys: pytest.CaptureFixture[str]) -> None:
    from autoserve_cli.main import main

    assert main(["run", "prober", "--member", "..."]) == 2
    assert "--member: member name '...'" in capsys.readouterr().err
