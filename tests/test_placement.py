from __future__ import annotations

import math

import pytest

from gateway.placement import Holder, Popularity, copies, plan


def test_popularity_is_a_share_of_decayed_counts() -> None:
    popularity = Popularity(half_life_s=10.0)
    for _ in range(3):
        popularity.add("old", now=0.0)
    popularity.add("new", now=10.0)  # one half-life later: "old" weighs 1.5 now
    shares = popularity.shares()
    assert shares["new"] == pytest.approx(1 / 2.5)
    assert shares["old"] == pytest.approx(1.5 / 2.5)


def test_popularity_keeps_its_shares_through_a_rescale_and_a_retune() -> None:
    popularity = Popularity(half_life_s=1.0)
    popularity.add("a", now=0.0)
    popularity.add("b", now=100.0)  # e^69 would overflow soon: the counts are rescaled
    assert popularity.origin == 100.0
    assert popularity.shares()["a"] == pytest.approx(2**-100)
    popularity.add("b", now=200.0)
    assert set(popularity.shares()) == {"b"}, "a share that small is forgotten at a rescale"
    popularity = Popularity(half_life_s=1.0)
    popularity.add("a", now=0.0)
    popularity.add("b", now=0.0)
    popularity.retune(2.0, now=1.0)  # both at 0.5 now; from here on they halve in 2 s
    popularity.add("a", now=3.0)
    shares = popularity.shares()
    assert shares["a"] == pytest.approx((0.25 + 1) / (0.25 + 1 + 0.25))
    assert math.isclose(sum(shares.values()), 1.0)


def test_copies_follow_the_shares_and_cover_the_tail_first() -> None:
    shares = {"hot": 0.6, "warm": 0.3, "cold": 0.1}
    assert copies(shares, places=3, most=4) == {"hot": 1, "warm": 1, "cold": 1}
    assert copies(shares, places=5, most=4) == {"hot": 3, "warm": 1, "cold": 1}
    assert copies(shares, places=7, most=4) == {"hot": 4, "warm": 2, "cold": 1}
    assert copies(shares, places=99, most=2) == {"hot": 2, "warm": 2, "cold": 2}
    assert copies({"a": 0.5, "b": 0.5}, places=1, most=2) == {"a": 1}, "ties go by name"


def test_a_copy_the_last_plan_had_is_kept_against_noise() -> None:
    shares = {"a": 0.051, "b": 0.049}
    assert copies(shares, places=1, most=1) == {"a": 1}
    assert copies(shares, places=1, most=1, had={"b": 1}) == {"b": 1}


def test_the_plan_spreads_hot_adapters_and_balances_by_capacity() -> None:
    holders = [Holder(capacity=1, memory=3), Holder(capacity=3, memory=3)]
    shares = {"hot": 0.91, "b": 0.03, "c": 0.03, "d": 0.03}
    placed = plan(shares, holders, spare=1)
    assert placed["hot"] == {0, 1}, "the hot adapter is warm on both workers"
    per_worker = [sum(i in at for at in placed.values()) for i in range(2)]
    assert per_worker == [2, 2], "memory - spare each"
    assert set(placed) == {"hot", "b", "c"}, "four places: the hot one's second copy comes first"


def test_the_plan_keeps_an_adapter_where_it_is() -> None:
    holders = [Holder(1, 2), Holder(1, 2, warm=("b",))]
    shares = {"a": 0.5, "b": 0.5}
    assert plan(shares, holders, spare=1) == {"a": frozenset({0}), "b": frozenset({1})}
    swapped = plan(shares, holders, spare=1, previous={"a": frozenset({1})})
    assert swapped["a"] == {1}, "placed there last time"


def test_nothing_to_plan() -> None:
    assert plan({"a": 1.0}, [], spare=1) == {}
    assert plan({"a": 1.0}, [Holder(0, 4)], spare=1) == {}
    assert plan({}, [Holder(1, 4)], spare=1) == {}
