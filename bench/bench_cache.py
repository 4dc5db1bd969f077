"""The model cache's bookkeeping (agent/cache.py, issue 16): what its bound costs a load.

Per number of cached parts (``--parts``), in a fresh cache directory of that many small part
files, interleaved in each run (``--runs``, the order alternating):

- baseline: what a warm load did with the cache before it was bounded: open the part's file,
  close it;
- warm load: what it does now: ``record_use`` (the resource's part, its use), ``open`` (held
  against eviction), close (released: orphans and the bound checked);
- at the bound: an upload's part committed into a full cache, which evicts the least recently
  used part (spool, ``commit``, ``record_use``);
- start: ``BigPartCache(root)`` on the directory and its index (scan and parse).

CPU seconds of this process (``time.process_time``), so other processes' load counts little;
medians of the runs. Goals: a warm load's bookkeeping does not grow with the number of parts
(at the most parts <= 3x at the fewest, medians of the same run) and costs <= 100 us of CPU
over the baseline at every count (a warm 1 MiB load takes ~5 ms); exit 1 if missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.cache import BigPartCache

FOLDER = "models"
PART = b"c" * 4096
FLAT_GOAL = 3.0
OVERHEAD_GOAL_US = 100.0


def name_of(index: int) -> str:
    return f"{index:064x}"


def filled(parts: int) -> tuple[Path, BigPartCache]:
    """A cache directory holding ``parts`` parts, each used by one resource, in an index."""
    root = Path(tempfile.mkdtemp(prefix="bench-cache-", dir="/tmp"))
    (root / FOLDER).mkdir()
    for index in range(parts):
        (root / FOLDER / name_of(index)).write_bytes(PART)
    cache = BigPartCache(root, max_bytes=parts * len(PART))
    for index in range(parts):
        cache.record_use(FOLDER, f"r{index}", name_of(index))
    return root, cache


def per_op(operation: Callable[[int], None], count: int) -> float:
    """CPU microseconds per call of ``operation`` (its argument: the call's number)."""
    started = time.process_time()
    for index in range(count):
        operation(index)
    return (time.process_time() - started) / count * 1e6


def one_run(parts: int, loads: int, flip: bool) -> dict[str, float]:
    root, cache = filled(parts)
    try:
        paths = [root / FOLDER / name_of(index) for index in range(parts)]

        def baseline(index: int) -> None:
            paths[index % parts].open("rb").close()

        def warm(index: int) -> None:
            cache.record_use(FOLDER, f"r{index % parts}", name_of(index % parts))
            cache.open(paths[index % parts]).close()

        cases = [("baseline", baseline), ("warm", warm)]
        result = {name: per_op(case, loads) for name, case in (cases[::-1] if flip else cases)}

        def at_bound(index: int) -> None:
            with cache.spool(FOLDER) as spool:
                spool.write(PART)
                spool.finish()
                name = name_of(parts + index)
                cache.commit(spool, FOLDER, name)
                cache.record_use(FOLDER, f"new{index}", name)

        result["at_bound"] = per_op(at_bound, max(10, loads // 20))
        started = time.process_time()
        BigPartCache(root, max_bytes=parts * len(PART))
        result["start"] = (time.process_time() - started) * 1e6
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="10,1000,10000", help="comma-separated counts")
    parser.add_argument("--runs", type=int, default=5, help="runs per count (default 5)")
    parser.add_argument("--loads", type=int, default=4000, help="warm loads per run")
    args = parser.parse_args(argv)
    counts = [int(count) for count in args.parts.split(",")]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    medians: dict[int, dict[str, float]] = {}
    for parts in counts:
        runs = [one_run(parts, args.loads, flip=run % 2 == 1) for run in range(args.runs)]
        medians[parts] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print("CPU microseconds, medians of", args.runs, "runs")
    header = ("parts", "baseline", "warm load", "overhead", "at bound", "start")
    print(
        " ".join(
            f"{word:>{width}}" for word, width in zip(header, (7, 9, 10, 9, 9, 9), strict=True)
        )
    )
    failures = []
    for parts, m in medians.items():
        overhead = m["warm"] - m["baseline"]
        print(
            f"{parts:>7} {m['baseline']:>9.1f} {m['warm']:>10.1f} {overhead:>9.1f} "
            f"{m['at_bound']:>9.1f} {m['start']:>9.0f}"
        )
        if overhead > OVERHEAD_GOAL_US:
            failures.append(f"{parts} parts: {overhead:.0f} us over the baseline")
    fewest, most = medians[min(counts)]["warm"], medians[max(counts)]["warm"]
    ratio = most / fewest
    print(
        f"warm load at {max(counts)} parts / at {min(counts)}: {ratio:.2f}x (goal <= {FLAT_GOAL}x)"
    )
    if ratio > FLAT_GOAL:
        failures.append(f"a warm load's bookkeeping grows with the parts ({ratio:.2f}x)")
    print(f"goals: {'MISSED: ' + '; '.join(failures) if failures else 'met'}; "
          f"load average now {os.getloadavg()[0]:.1f}")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
