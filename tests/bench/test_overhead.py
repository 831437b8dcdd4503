"""bench/overhead.py prints figures only for a wrk run where every request succeeded.

The outputs below are wrk 4.1's, verbatim, from runs on loopback (`wrk -t1 -c4 -d1s
--latency`, `--timeout 1s` for the timeout case) against small servers that answered
200, answered 500, closed every connection after three answers, and answered after
1.5 s.
"""

from __future__ import annotations

import pytest

from bench.overhead import parse_wrk, wrk_failures

URL = "http://127.0.0.1:1/v1/images/generations"

CLEAN = """\
Running 1s test @ http://127.0.0.1:18511/v1/images/generations
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   733.64us    1.22ms  12.15ms   86.74%
    Req/Sec    14.64k     7.35k   26.17k    80.00%
  Latency Distribution
     50%  188.00us
     75%  522.00us
     90%    2.49ms
     99%    5.45ms
  14682 requests in 1.01s, 573.52KB read
Requests/sec:  14576.03
Transfer/sec:    569.38KB
"""

ERROR_STATUSES = """\
Running 1s test @ http://127.0.0.1:18501/v1/images/generations
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   401.54us    0.88ms   8.44ms   92.83%
    Req/Sec    21.17k     3.20k   28.16k    70.00%
  Latency Distribution
     50%  174.00us
     75%  193.00us
     90%  314.00us
     99%    4.48ms
  21053 requests in 1.00s, 1.18MB read
  Non-2xx or 3xx responses: 21053
Requests/sec:  20966.47
Transfer/sec:      1.18MB
"""

READ_ERRORS = """\
Running 1s test @ http://127.0.0.1:18503/v1/images/generations
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   307.58us  216.56us   1.54ms   82.22%
    Req/Sec    11.31k     1.30k   12.68k    70.00%
  Latency Distribution
     50%  202.00us
     75%  446.00us
     90%  627.00us
     99%    0.97ms
  11228 requests in 1.00s, 438.59KB read
  Socket errors: connect 0, read 3741, write 0, timeout 0
Requests/sec:  11223.54
Transfer/sec:    438.42KB
"""

TIMEOUTS = """\
Running 4s test @ http://127.0.0.1:18505/v1/images/generations
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec    15.00     17.32    30.00    100.00%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  8 requests in 4.01s, 320.00B read
  Socket errors: connect 0, read 0, write 0, timeout 8
Requests/sec:      2.00
Transfer/sec:      79.86B
"""

NOTHING_ANSWERED = """\
Running 1s test @ http://127.0.0.1:18504/v1/images/generations
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.00s, 0.00B read
Requests/sec:      0.00
Transfer/sec:       0.00B
"""


def test_a_clean_run_gives_its_figures() -> None:
    assert wrk_failures(CLEAN) == {}
    result = parse_wrk(CLEAN, URL)
    assert result.rps == 14576.03
    assert result.p50_ms == pytest.approx(0.188)
    assert result.p99_ms == pytest.approx(5.45)


@pytest.mark.parametrize(
    ("out", "failures"),
    [
        (ERROR_STATUSES, {"status": 21053}),
        (READ_ERRORS, {"read": 3741}),
        (TIMEOUTS, {"timeout": 8}),
    ],
)
def test_a_run_with_failed_requests_fails_loudly(out: str, failures: dict[str, int]) -> None:
    assert wrk_failures(out) == failures
    with pytest.raises(SystemExit) as stopped:
        parse_wrk(out, URL)
    ((kind, count),) = failures.items()
    message = str(stopped.value.code)
    assert f"failed requests on {URL} ({kind} {count})" in message
    assert out in message  # wrk's whole output, to see what happened


def test_a_run_where_nothing_was_answered_fails_loudly() -> None:
    assert wrk_failures(NOTHING_ANSWERED) == {}  # wrk counts no error: nothing timed out
    with pytest.raises(SystemExit, match="no request completed"):
        parse_wrk(NOTHING_ANSWERED, URL)
