"""The gateway's overhead, old revision vs new: each tree's own bench/overhead.py.

    python -m bench.compare_overhead [--old REV] [--new REV|worktree] [--rounds 3]
                                     [--duration 4] [-- OVERHEAD ARGS]

Checks each revision out into a temporary tree (bench/suite.py's `checkout`), then
runs that tree's bench/overhead.py with PYTHONPATH set to the tree, so that the gateway
it starts is that tree's (checked once per tree before the first round). Rounds
alternate old and new, the order swapped every round (old new, new old, ...), so that
a machine getting busier or quieter moves both alike. Both use this Python (.venv).
Prints each round, the medians and the new/old ratios. OVERHEAD ARGS go to both
(`--upstream sim`, `--auth`, `--size 512`); an option the old tree's script lacks
stops it. A run that fails (its exit status, e.g. wrk errors) stops the comparison.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from bench.suite import checkout

# One row of overhead.py's table: target, concurrency, req/s, p50 ms, p99 ms.
_ROW = re.compile(r"^(direct|gateway)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)


@dataclass(frozen=True)
class Figures:
    """What one overhead.py run measured."""

    gateway_rps_16: float
    direct_rps_16: float
    gateway_p50_1: float
    direct_p50_1: float

    @property
    def added_p50_1(self) -> float:
        return self.gateway_p50_1 - self.direct_p50_1


def parse_table(out: str) -> Figures:
    """overhead.py's printed table (the same format since its first version)."""
    rows = {(m[1], int(m[2])): (float(m[3]), float(m[4])) for m in _ROW.finditer(out)}
    try:
        return Figures(
            gateway_rps_16=rows["gateway", 16][0],
            direct_rps_16=rows["direct", 16][0],
            gateway_p50_1=rows["gateway", 1][1],
            direct_p50_1=rows["direct", 1][1],
        )
    except KeyError as missing:
        raise SystemExit(f"no row {missing} in bench/overhead.py's output:\n{out}") from None


def tree_env(tree: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("GATEWAY_REDIS_URL", None)  # the bench's gateway has no cache section
    return env


def check_imports_from(tree: Path) -> None:
    """The tree's own gateway and bench, not an installed copy: an editable install of
    another checkout must not be what gets measured."""
    code = "import bench.overhead, gateway; print(bench.overhead.__file__, gateway.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=tree_env(tree), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: cannot import bench.overhead and gateway:\n{done.stderr}")
    for path in done.stdout.split():
        if not Path(path).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"{tree}: imports {path}, from outside the tree")


def run_overhead(tree: Path, duration: float, extra: Sequence[str]) -> Figures:
    cmd = [sys.executable, "-m", "bench.overhead", "--duration", f"{duration:g}", *extra]
    done = subprocess.run(cmd, cwd=tree, env=tree_env(tree), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"bench/overhead.py failed in {tree} (exit {done.returncode}):\n"
            f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return parse_table(done.stdout)


def order(round_: int) -> tuple[str, str]:
    """old, new in odd rounds; new, old in even ones."""
    return ("old", "new") if round_ % 2 else ("new", "old")


def median(runs: Sequence[Figures]) -> Figures:
    return Figures(
        *(statistics.median(getattr(r, field.name) for r in runs) for field in fields(Figures))
    )


def line(f: Figures) -> str:
    return (
        f"c=16 {f.gateway_rps_16:7,.0f} req/s (direct {f.direct_rps_16:7,.0f}); "
        f"p50 at c=1 {f.gateway_p50_1:.2f} ms (direct {f.direct_p50_1:.2f}, "
        f"added {f.added_p50_1:+.2f})"
    )


def ratios(old: Figures, new: Figures) -> list[str]:
    return [
        f"new/old throughput at c=16: {new.gateway_rps_16 / old.gateway_rps_16:.2f}x",
        f"new/old p50 at c=1: {new.gateway_p50_1 / old.gateway_p50_1:.2f}x",
        f"added p50 at c=1: {old.added_p50_1:+.2f} ms old, {new.added_p50_1:+.2f} ms new",
        f"gateway/direct throughput at c=16: {old.gateway_rps_16 / old.direct_rps_16:.2f}x "
        f"old, {new.gateway_rps_16 / new.direct_rps_16:.2f}x new",
    ]


def report(results: Mapping[str, Sequence[Figures]], old_rev: str, new_rev: str) -> None:
    rounds = len(results["old"])
    med = {name: median(runs) for name, runs in results.items()}
    print(f"\nmedians over {rounds} rounds (old = {old_rev}, new = {new_rev}):")
    for name in ("old", "new"):
        print(f"  {name:3}: {line(med[name])}")
    for text in ratios(med["old"], med["new"]):
        print(f"  {text}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--old", default="HEAD~1", help="the revision to compare against")
    parser.add_argument("--new", default="worktree", help="a revision, or 'worktree'")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    results: dict[str, list[Figures]] = {"old": [], "new": []}
    with checkout(args.old) as old, checkout(args.new) as new:
        trees = {"old": old, "new": new}
        for tree in trees.values():
            check_imports_from(tree)
        for round_ in range(1, args.rounds + 1):
            for name in order(round_):
                figures = run_overhead(trees[name], args.duration, extra)
                results[name].append(figures)
                print(f"round {round_} {name:3}: {line(figures)}", flush=True)
    report(results, args.old, args.new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
