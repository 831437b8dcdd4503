"""bench/compare_overhead.py reads bench/overhead.py's table and compares two builds.

(The comparison itself checks out trees and runs wrk for minutes: run by hand, see
bench/README.md.)"""

from __future__ import annotations

import pytest

from bench.compare_overhead import Figures, median, order, parse_table, ratios

# bench/overhead.py --duration 1, verbatim (this tree; d6a319d prints the same table).
OUT = """\
upstream=static  response=149 KB  load=wrk  auth=off  duration=1.0s per run

target   conc     req/s   p50 ms   p99 ms
direct      1     23493     0.04     0.08
direct     16     19702     0.53     1.03
gateway     1      1179     0.78     1.34
gateway    16      1354    10.26    21.29

gateway/direct throughput at c=16: 0.07x (1354 vs 19702 req/s)
gateway/direct throughput at c=1:  0.05x
added p50 at c=1: +0.74 ms; added p50 at c=16: +9.73 ms
"""


def test_the_table_is_read_by_target_and_concurrency() -> None:
    figures = parse_table(OUT)
    assert figures == Figures(
        gateway_rps_16=1354, direct_rps_16=19702, gateway_p50_1=0.78, direct_p50_1=0.04
    )
    assert figures.added_p50_1 == pytest.approx(0.74)


def test_an_output_without_the_table_stops_the_comparison() -> None:
    with pytest.raises(SystemExit, match="no row \\('gateway', 16\\)"):
        parse_table(OUT.replace("gateway    16", "gateway    32"))


def test_rounds_alternate_which_build_goes_first() -> None:
    assert [order(r) for r in (1, 2, 3)] == [("old", "new"), ("new", "old"), ("old", "new")]


def test_medians_and_ratios() -> None:
    old = [Figures(2480, 15000, 0.52, 0.06), Figures(2048, 16000, 0.56, 0.06)]
    new = [Figures(2016, 15500, 0.64, 0.06), Figures(1831, 14000, 0.70, 0.05)]
    old.append(Figures(2613, 14500, 0.57, 0.05))
    new.append(Figures(2138, 16500, 0.61, 0.06))
    lines = ratios(median(old), median(new))
    assert lines[0] == "new/old throughput at c=16: 0.81x"  # 2016 / 2480
    assert lines[1] == "new/old p50 at c=1: 1.14x"  # 0.64 / 0.56
    assert lines[2] == "added p50 at c=1: +0.50 ms old, +0.58 ms new"
