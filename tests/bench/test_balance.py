from __future__ import annotations

import pytest

from bench import balance


def test_the_simulation_runs_every_policy_and_repeats_itself() -> None:
    first, beyond = balance.run_policy(balance.BALANCER, 0.8, 300, seed=4)
    again, _ = balance.run_policy(balance.BALANCER, 0.8, 300, seed=4)
    assert first == again, "seeded: the same run twice"
    assert first.backlog < 10
    assert max(beyond) < 3.0
    for policy in balance.POLICIES:
        result, _ = balance.run_policy(policy, 0.5, 100, seed=4)
        assert result.throughput > 0


def test_the_report_prints_the_table_and_the_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert balance.main(["--duration", "150"]) == 0
    out = capsys.readouterr().out
    assert "| 0.95 | this balancer |" in out
    assert "rho 0.8: p99 / ideal central queue" in out
    assert "wait beyond the FIFO turn" in out
