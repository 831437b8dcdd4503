from __future__ import annotations

import pytest

from bench import balance

# The rho 0.8 targets of bench/README.md ("this balancer" against the ideal central
# queue and against least-loaded push), checked on a short run: 8 seeds x 250 virtual
# seconds (2,000 in all, like the bench's one run), measured as one. Fixed seeds make
# it deterministic. The tolerance is what a change that only re-rolls the random draws
# (another order of rng calls, say) needs to pass: over six disjoint groups of 8 seeds
# the three ratios spread over 1.21-1.32, 0.69-0.79 and 0.55-0.58, so the p99 limits
# get 0.05 above the targets and the loads limit none. Losing adapter affinity fails
# all three (no preference for a warm worker: 1.57, 0.94, 0.91; no wait for one and no
# stepping aside: 1.43, 0.86, 0.96; workers that forget every adapter: 1.44, 0.86, 1.02).
SEEDS = range(1, 9)
SHORT_S = 250.0
P99_VS_IDEAL = 1.35 + 0.05
P99_VS_PUSH = 0.8 + 0.05
LOADS_VS_PUSH = 0.7


def test_the_simulation_runs_every_policy_and_repeats_itself() -> None:
    first, beyond = balance.run_policy(balance.BALANCER, 0.8, 300, seed=4)
    again, _ = balance.run_policy(balance.BALANCER, 0.8, 300, seed=4)
    assert first == again, "seeded: the same run twice"
    assert first.backlog < 10
    # Within the stated bound: 54 overtakes (6 per slot) at about 5.6 grants/s, plus
    # the head's allowance (tests/test_balancer.py checks the limits themselves).
    assert max(beyond) < 12.0
    for policy in balance.POLICIES:
        result, _ = balance.run_policy(policy, 0.5, 100, seed=4)
        assert result.throughput > 0


def test_the_report_prints_the_table_and_the_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert balance.main(["--duration", "150"]) == 0
    out = capsys.readouterr().out
    assert "| 0.95 | this balancer |" in out
    assert "rho 0.8: p99 / ideal central queue" in out
    assert "wait beyond the FIFO turn" in out


def test_the_balancer_keeps_the_benchs_rho_08_targets() -> None:
    ours, ideal, push = (
        balance.run_seeds(policy, 0.8, SHORT_S, SEEDS)
        for policy in (balance.BALANCER, "ideal central queue", "least-loaded push")
    )
    ratios = {
        "p99 / ideal central queue": ours.p99_s / ideal.p99_s,
        "p99 / least-loaded push": ours.p99_s / push.p99_s,
        "adapter loads / least-loaded push": ours.loads_per_1000 / push.loads_per_1000,
    }
    shown = ", ".join(f"{name} {value:.3f}" for name, value in ratios.items())
    assert ratios["p99 / ideal central queue"] <= P99_VS_IDEAL, shown
    assert ratios["p99 / least-loaded push"] <= P99_VS_PUSH, shown
    assert ratios["adapter loads / least-loaded push"] <= LOADS_VS_PUSH, shown


def test_the_placement_report_runs_on_short_runs() -> None:
    """Issue 13's report, every part of it, on runs too short to mean anything."""
    report = balance.seed_report(2, balance.ISSUE3, duration_s=200, stable_s=200)
    assert 0.5 <= report.stable_ours <= report.stable_ideal <= 1.03
    lines = list(balance.placement_table([report], goals=True))
    assert any(line.startswith("| max stable rho (ideal) |") for line in lines)
    floor = report.floor
    assert floor.places == 32
    assert 0 < floor.distinct <= floor.places
    assert floor.least <= floor.lru <= floor.lru_distinct
    assert any(line.startswith("| rho 0.95: one cache of all places") for line in lines)
    assert all(line.endswith(("| met |", "| NOT MET |", "| |")) for line in lines[2:])
    heavy = balance.seed_report(2, balance.HEAVY, duration_s=100, stable_s=100)
    assert "— |" in "".join(balance.placement_table([heavy], goals=False))
    assert len(balance.shift_report(2, duration_s=1400)) == 2


def test_stable_follows_the_issues_definition() -> None:
    assert balance.stable(balance.IDEAL, 0.5, 1, balance.ISSUE3, duration_s=400)
    assert not balance.stable(balance.IDEAL, 1.2, 1, balance.ISSUE3, duration_s=400)


def test_the_cache_floor_counts_loads_like_lru_and_belady() -> None:
    cycle = list("abcabc")
    assert balance.lru_loads(cycle, 2) == 6, "LRU misses every request of a cycle too big"
    # MIN: a, b, c (evicts b, needed latest), a, b (evicts a, never needed), c: 4.
    assert balance.min_loads(cycle, 2) == 4
    assert balance.lru_loads(cycle, 3) == balance.min_loads(cycle, 3) == 3
    jobs = balance.workload(0.8, 300, seed=5)
    order = [job.adapter for job in jobs]
    for places in (4, 16, 32):
        assert balance.min_loads(order, places) <= balance.lru_loads(order, places)
    assert balance.min_loads(order, 8) > balance.min_loads(order, 32)
