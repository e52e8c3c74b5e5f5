"""Linear-cost checks that hold on any machine: time the same work at two sizes and compare.

A wall-clock budget ("5 MB in under a second") fails on a slow or busy machine and passes a quadratic
algorithm on a fast one. The ratio between the cost at n and at 10·n does neither: about 10 for linear
work, about 100 for quadratic work, whatever the machine's speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: a tenfold input may cost at most this many times more (linear: ~10, quadratic: ~100)
MAX_RATIO = 30.0


def cpu_seconds(work: Callable[[], object], repeat: int = 2) -> float:
    """The least CPU time of `repeat` runs of `work` (the least is the one noise hit least)."""
    best = float("inf")
    for _ in range(repeat):
        began = time.process_time()
        work()
        best = min(best, time.process_time() - began)
    return best


def assert_linear(make: Callable[[int], str], work: Callable[[str], object], n: int) -> None:
    """`work` on `make(10 * n)` costs at most MAX_RATIO times `work` on `make(n)`."""
    small, large = make(n), make(10 * n)
    small_cost = max(cpu_seconds(lambda: work(small), repeat=3), 1e-3)
    large_cost = cpu_seconds(lambda: work(large), repeat=1)
    ratio = large_cost / small_cost
    assert ratio < MAX_RATIO, (
        f"10x the input cost {ratio:.0f}x the time ({small_cost:.3f}s -> {large_cost:.3f}s)"
    )
