"""The test suite's wall time and its subprocess-starting tests, old tree vs new.

    python -m bench.suite [--old REV] [--new REV|worktree] [--rounds 2] [-- PYTEST ARGS]

Checks each revision out into a temporary tree (`git worktree add --detach`), then
runs pytest in each, rounds interleaved (old, new, old, new, ...) so that a machine
getting busier or quieter moves both alike. Both run with this checkout's .venv, the
tree under test first on PYTHONPATH. A small pytest plugin (bench/suite_plugin.py)
counts the tests during which a subprocess was started (subprocess.Popen, which
asyncio's subprocesses use too). Prints each round, the medians and new/old ratios.
Ruff and mypy are not run: this times the tests alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = Path(__file__).resolve().parent


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """`rev` in a temporary tree ("worktree": this checkout as it is, uncommitted too)."""
    if rev == "worktree":
        yield ROOT
        return
    where = Path(tempfile.mkdtemp(prefix="suite-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev],
        check=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False
        )
        shutil.rmtree(where.parent, ignore_errors=True)  # the mkdtemp directory around it


def run_suite(tree: Path, pytest_args: Sequence[str]) -> dict[str, float]:
    """One pytest run in `tree`: wall seconds, tests run, failures, subprocess tests."""
    report = Path(tempfile.mkstemp(prefix="suite-", suffix=".json")[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tree), str(PLUGIN_DIR)]),
        "SUITE_REPORT": str(report),
    }
    env.pop("GATEWAY_REDIS_URL", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "suite_plugin"]
    started = time.perf_counter()
    proc = subprocess.run([*cmd, *pytest_args], cwd=tree, env=env, capture_output=True)
    wall = time.perf_counter() - started
    counts = json.loads(report.read_text() or "{}")
    report.unlink()
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:])
        raise SystemExit(f"pytest exited {proc.returncode} in {tree}")
    return {"wall_s": wall, **counts}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="HEAD~1", help="the revision to compare against")
    parser.add_argument("--new", default="worktree", help="a revision, or 'worktree'")
    parser.add_argument("--rounds", type=int, default=2)
    args, pytest_args = parser.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != "--"]
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with checkout(args.old) as old, checkout(args.new) as new:
        for round_ in range(1, args.rounds + 1):
            for name, tree in (("old", old), ("new", new)):
                result = run_suite(tree, pytest_args)
                results[name].append(result)
                print(f"round {round_} {name:3}: {_line(result)}", flush=True)
    print(f"\nmedians over {args.rounds} rounds (old = {args.old}, new = {args.new}):")
    med = {name: _median(runs) for name, runs in results.items()}
    for name in ("old", "new"):
        print(f"  {name:3}: {_line(med[name])}")
    print(f"  new/old wall time: {med['new']['wall_s'] / med['old']['wall_s']:.2f}x")
    return 0


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _line(r: dict[str, float]) -> str:
    return (
        f"{r['wall_s']:6.1f} s, {r.get('tests', 0):.0f} tests, {r.get('failed', 0):.0f} failed, "
        f"{r.get('subprocess_tests', 0):.0f} start a subprocess "
        f"({r.get('subprocesses', 0):.0f} subprocesses)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
