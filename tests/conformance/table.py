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
        #: driver -> mode -> [(workload, passed)]
        self.results: dict[str, dict[str, list[tuple[str, bool]]]] = defaultdict(lambda: defaultdict(list))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        props = dict(report.user_properties)
        if "driver" in props:
            self.results[str(props["driver"])][str(props["mode"])].append(
                (str(props["workload"]), report.passed)
            )


def markdown(results: dict[str, dict[str, list[tuple[str, bool]]]]) -> str:
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
            passed = sum(ok for _, ok in runs)
            failed = [name for name, ok in runs if not ok]
            cell = f"{passed}/{len(runs)} same as direct"
            if failed:
                cell += " (differs: " + "; ".join(failed) + ")"
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
