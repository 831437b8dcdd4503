"""bench/fairness.py on short runs: its scenarios run on the real Pool, the shares
follow the weights, deadlines hold, and the report prints its targets."""

from __future__ import annotations

import pytest

from bench import fairness


@pytest.mark.parametrize("weights", [{"A": 1, "B": 1, "C": 1}, {"A": 2, "B": 1, "C": 1}])
def test_backlogged_teams_share_gpu_time_by_weight(weights: dict[str, float]) -> None:
    """Affinity may let a team run ahead by a bounded amount of work (the look-ahead's,
    the overtakes'), repaid later: 400 s, not 120, so that it is a small part of it
    (at 120 s team A had 0.40 at 1:1:1; at 400 s 0.336)."""
    runs = [fairness.simulate(fairness.saturated_workload(1, 400), 1, weights=weights)]
    shares = fairness.measure_burst("fair", runs, [0.0]).shares
    total = sum(weights.values())
    for team, weight in weights.items():
        assert shares[team] == pytest.approx(weight / total, rel=0.05), shares


@pytest.mark.parametrize(("weights", "most"), [(None, True), ({"A": 1, "B": 1, "C": 1}, False)])
def test_fifo_gives_the_burst_most_while_it_waits(
    weights: dict[str, float] | None, most: bool
) -> None:
    """The comparison the bench makes is real: the FIFO queue starts most of A's burst
    (78%; affinity lets some of B overtake) before any of B's early requests, the fair
    queue hardly any of it (8%)."""
    seed = 2
    run = fairness.simulate(fairness.burst_workload(60, seed, count=120), seed, weights=weights)
    first_b = min(j.started for j in run.jobs if j.team == "B" and j.arrived < 10)
    a = [j for j in run.jobs if j.team == "A"]
    assert (sum(j.started < first_b for j in a) > len(a) / 2) is most


def test_deadlines_bound_lateness_and_raise_goodput() -> None:
    seeds = [3]
    fifo, ours = (
        fairness.measure_deadline(
            name,
            [
                fairness.simulate(
                    fairness.deadline_workload(60, s),
                    s,
                    weights=weights,
                    deadlines=deadlines,
                    queue_limits=True,
                )
                for s in seeds
            ],
            60,
        )
        for name, weights, deadlines in (("fifo", None, False), ("fair", {"A": 1.0}, True))
    )
    assert ours.late_over_service <= 1.0
    assert ours.goodput > 2 * fifo.goodput


def test_the_report_prints_the_tables_and_every_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert fairness.main(["--seeds", "1", "--duration", "40", "--burst", "60"]) == 0
    out = capsys.readouterr().out
    assert "| today's FIFO |" in out
    assert "| fair 2:1:1 |" in out
    assert out.count("met: ") + out.count("NOT MET: ") == 10
