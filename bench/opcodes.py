"""Interpreter instructions per transaction on halephant's hot path: a steady measure where timings are not.

TPS and CPU time on a small shared machine move by 10 to 20 % from one minute to the next, more than
most changes to the hot path. The number of bytecode instructions the interpreter runs per
transaction does not: this script counts them, per function, while pgbench runs a fixed number of
transactions through halephant. Use it before and after a change to `halephant/proxy/`,
`halephant/protocol/` or `halephant/pool/`; confirm what it finds with `bench.py`.

    .venv/bin/python bench/opcodes.py --pg 127.0.0.1:5432 --user bench --password bench --dbname bench \\
        [-M simple|extended|prepared] [-c 10] [-t 1000] [--top 25] [--source DIR]

The role, database and pgbench tables must exist (`pgbench -i`). halephant runs from `--source`
(default: this checkout) on a free port, in transaction mode with pool size 20, traced with
`sys.settrace` (opcode events) only while the measured pgbench run lasts; a warm-up run comes first.
Tracing makes halephant about ten times slower: the counts, not the speed, are the result.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def serve(config: str, out: str) -> None:
    """Child process: halephant with an opcode counter, on from SIGUSR1, written to `out` at SIGUSR2."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename, code.co_name)] += 1
        return tracer

    def on(*_: object) -> None:
        counts.clear()
        sys.settrace(tracer)

    def off(*_: object) -> None:
        sys.settrace(None)
        Path(out).write_text(json.dumps([[f, n, c] for (f, n), c in counts.items()]))

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    from halephant.cli import main

    sys.argv = ["halephant", "run", "-c", config]
    main()


def pgbench(a: argparse.Namespace, port: int, transactions: int) -> str:
    env = {**os.environ, "PGPASSWORD": a.password}
    cmd = ["pgbench", "-n", "-S", "-M", a.protocol, "-c", str(a.clients), "-j", str(min(2, a.clients))]
    cmd += ["-t", str(transactions), "-h", "127.0.0.1", "-p", str(port), "-U", a.user, a.dbname]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pgbench failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", metavar="HOST:PORT", help="a running PostgreSQL (required)")
    ap.add_argument("--user", default="bench")
    ap.add_argument("--password", default="bench")
    ap.add_argument("--dbname", default="bench")
    ap.add_argument("-M", dest="protocol", default="simple", choices=("simple", "extended", "prepared"))
    ap.add_argument("-c", dest="clients", type=int, default=10, help="pgbench clients [10]")
    ap.add_argument("-t", dest="transactions", type=int, default=1000, help="per client [1000]")
    ap.add_argument("--top", type=int, default=25, help="functions to list [25]")
    ap.add_argument("--source", default=str(REPO), help="the halephant checkout to measure [this one]")
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(*a.serve)  # imports halephant from --source (PYTHONPATH): nothing from bench.py here
        return
    if not a.pg:
        ap.error("--pg HOST:PORT is required")
    sys.path.insert(0, str(REPO / "bench"))
    from bench import _non_default_plugins, free_port, wait_listening

    host, _, pg_port = a.pg.rpartition(":")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="halephant-opcodes-") as tmp:
        config = Path(tmp, "halephant.yaml")
        config.write_text(
            f"""\
listen: 127.0.0.1:{port}
clusters:
  main:
    nodes: ["{host}:{pg_port}"]
databases:
  {a.dbname}:
    cluster: main
    mode: transaction
    pool_size: 20
users:
  {a.user}:
    password: {json.dumps(a.password)}
logging:
  level: warning
plugins:
  disable: {json.dumps(_non_default_plugins())}
"""
        )
        out = Path(tmp, "counts.json")
        log = Path(tmp, "halephant.log")
        env = {**os.environ, "PYTHONPATH": a.source}
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(config), str(out)],
                cwd=a.source,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_listening(proc, port, log, "halephant", 30)
            pgbench(a, port, max(10, a.transactions // 10))  # warm-up: logins, pools, caches
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            pgbench(a, port, a.transactions)
            proc.send_signal(signal.SIGUSR2)
            for _ in range(100):
                if out.exists():
                    break
                time.sleep(0.1)
            rows = json.loads(out.read_text())
        finally:
            proc.terminate()
            proc.wait(10)
    n = a.clients * a.transactions
    total = sum(c for _, _, c in rows)
    print(f"-S {a.protocol} c={a.clients}: {total / n:.0f} opcodes per transaction ({n} transactions)")
    for file, name, c in sorted(rows, key=lambda r: -r[2])[: a.top]:
        where = os.path.relpath(file, a.source) if file.startswith(a.source) else Path(file).name
        print(f"  {c / n:7.1f}  {where}:{name}")


if __name__ == "__main__":
    main()
