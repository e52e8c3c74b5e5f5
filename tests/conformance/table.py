"""Print the per-driver conformance table (markdown) from a run of the differential conformance harness.

Usage: ``.venv/bin/python tests/conformance/table.py`` (starts its own PostgreSQL and halephant, like the
tests). The output is what README.md shows under "Conformance".
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MODES = ("transaction", "session")


class Collector:
    def __init__(self) -> None:
        #: driver -> mode -> [(workload, "same" | "differs" | "known")]
        self.results: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        props = dict(report.user_properties)
        if "driver" in props:
            # a known difference is an expected failure: it reports as skipped, with `wasxfail`
            if report.passed:
                outcome = "same"
            elif props.get("known_difference") and hasattr(report, "wasxfail"):
                outcome = "known"
            else:
                outcome = "differs"
            self.results[str(props["driver"])][str(props["mode"])].append((str(props["workload"]), outcome))


def markdown(results: dict[str, dict[str, list[tuple[str, str]]]]) -> str:
    lines = [
        "| Driver | Workloads | Transaction pooling | Session pooling |",
        "|---|---|---|---|",
    ]
    for driver in sorted(results):
        by_mode = results[driver]
        names = sorted({name for mode in MODES for name, _ in by_mode.get(mode, [])})
        cells = []
        for mode in MODES:
            runs = by_mode.get(mode, [])
            same = sum(outcome == "same" for _, outcome in runs)
            cell = f"{same}/{len(runs)} same as direct"
            known = [name for name, outcome in runs if outcome == "known"]
            failed = [name for name, outcome in runs if outcome == "differs"]
            if known:
                cell += " (known difference: " + "; ".join(known) + ")"
            if failed:
                cell += " (**differs**: " + "; ".join(failed) + ")"
            cells.append(cell)
        lines.append(f"| {driver} | {'; '.join(names)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> int:
    collector = Collector()
    code = pytest.main(
        ["-q", "-p", "no:cacheprovider", str(HERE / "test_conformance.py")], plugins=[collector]
    )
    print()
    print(markdown(collector.results))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
