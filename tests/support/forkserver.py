"""Starting ``python -m halephant`` without paying for its imports each time: a fork server.

Importing halephant (pydantic models, the SQL lexer's patterns, click, asyncio) takes about half a second
of a halephant process's start, and the tests start a few hundred. `spawn(argv, env, cwd, log)` asks one
server process per test session, which has imported halephant's modules once, to fork a child that then
runs ``halephant`` as ``python -m halephant ARGS`` would (`runpy`, ``__main__``), with the given
environment (``PYTHONPATH`` entries go on ``sys.path`` as a new interpreter would put them there), working
directory, stdin from /dev/null and stdout and stderr to the log file. The child leaves the server's loop
and ends as any interpreter does (atexit handlers, non-daemon threads joined, its exit status).

The child is the server's, not this process's: `Forked` stands in for the `subprocess.Popen` the factory
used to hold (pid, poll, wait, returncode, send_signal, kill), with exit statuses reported by the server.
Only the argv ``sys.executable -m halephant ...`` goes through here; the factory runs anything else
with `subprocess.Popen` as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

#: The server: reads "spawn" requests (one JSON line each) on stdin, answers "pid N" lines and reports
#: "exit PID STATUS" lines on stdout. A child breaks out of the loop and runs halephant at top level.
SERVER = r"""
import json, os, runpy, selectors, signal, sys
import halephant.cli, halephant.logs  # the imports every child would otherwise pay for
sys.stdout.flush()
requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "wb", buffering=0)
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *_: None)
sel = selectors.DefaultSelector()
sel.register(requests, selectors.EVENT_READ)
sel.register(wake_r, selectors.EVENT_READ)
original_path = list(sys.path[1:])
inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
tail = [p for p in original_path if p not in inherited]
child = None
while child is None:
    for key, _ in sel.select():
        if key.fileobj is wake_r:
            os.read(wake_r, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                answers.write(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
            continue
        line = requests.readline()
        if not line:
            sys.exit(0)
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child = request
            break
        answers.write(f"pid {pid}\n".encode())
# the child: as `python -m halephant ARGS` started with the request's environment would be
signal.set_wakeup_fd(-1)
signal.signal(signal.SIGCHLD, signal.SIG_DFL)
sel.close()
for fd in (wake_r, wake_w):
    os.close(fd)
answers.close()
os.chdir(child["cwd"])
null = os.open(os.devnull, os.O_RDONLY)
log = os.open(child["log"], os.O_WRONLY | os.O_APPEND)
os.dup2(null, 0)
os.dup2(log, 1)
os.dup2(log, 2)
os.close(null)
os.close(log)
os.environ.clear()
os.environ.update(child["env"])
extra = [p for p in child["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
sys.path[:] = [os.getcwd(), *extra, *[p for p in tail if p not in extra]]
sys.argv = ["-m", *child["args"]]
del json, selectors, requests, answers, sel, request, line, key, child, extra, original_path, tail
runpy.run_module("halephant", run_name="__main__", alter_sys=True)
"""


class Forked:
    """A child of the fork server, with the parts of `subprocess.Popen` the tests use."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self._server = server
        self.pid = pid
        self.returncode: int | None = None
        self.args = ["<forked halephant>"]

    def __repr__(self) -> str:
        return f"<Forked pid={self.pid} returncode={self.returncode}>"

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_status(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            status = self._server.exit_status(self.pid, timeout)
            if status is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = status
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The server process and the thread that reads what it says."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(env), cwd="/",
        )  # fmt: skip
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._pids: list[int] = []
        self._exits: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, name="halephant fork server", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            kind, *values = raw.decode().split()
            with self._changed:
                if kind == "pid":
                    self._pids.append(int(values[0]))
                elif kind == "exit":
                    self._exits[int(values[0])] = int(values[1])
                self._changed.notify_all()
        with self._changed:
            self._pids.append(-1)  # the server is gone: wake whoever waits for a pid
            self._changed.notify_all()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def spawn(self, args: Sequence[str], env: Mapping[str, str], cwd: str, log: str) -> Forked:
        import json

        request = json.dumps({"args": list(args), "env": dict(env), "cwd": cwd, "log": log}) + "\n"
        with self._lock, self._changed:
            assert self._proc.stdin is not None
            self._proc.stdin.write(request.encode())
            self._proc.stdin.flush()
            if not self._changed.wait_for(lambda: self._pids, timeout=30):
                raise RuntimeError("the halephant fork server did not answer")
            pid = self._pids.pop(0)
        if pid < 0:
            raise RuntimeError("the halephant fork server exited")
        return Forked(self, pid)

    def exit_status(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits, timeout=timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        # the reader ends at the pipe's end of file; its pipe is closed here, not left to the collector
        # (whose ResourceWarning pytest turns into a failure of the session)
        self._reader.join(10)
        if self._proc.stdout is not None and not self._reader.is_alive():
            self._proc.stdout.close()


_server: ForkServer | None = None
_server_lock = threading.Lock()


def spawn(args: Sequence[str], env: Mapping[str, str], cwd: str, log: str) -> Forked:
    """Run ``python -m halephant ARGS`` (forked from the server) with `env`, in `cwd`, output to `log`."""
    global _server
    with _server_lock:
        if _server is None or not _server.alive:
            _server = ForkServer(env)
        server = _server
    return server.spawn(args, env, cwd, log)


def close() -> None:
    """Stop the server (its children, halephant processes, are stopped by whoever started them)."""
    global _server
    with _server_lock:
        if _server is not None:
            _server.close()
            _server = None
