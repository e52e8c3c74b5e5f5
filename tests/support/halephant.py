"""Running halephant as a real subprocess in end-to-end tests: write the config, start, wait, stop.

`HalephantFactory.start(config)` writes `config` as YAML, adds ``listen: 127.0.0.1:<free port>`` when absent,
runs ``python -m halephant run -c FILE`` with stdout and stderr in a log file, and returns once the port
accepts TCP connections. `default_config(pg)` is the configuration most tests start from. halephant itself
(the default argv) is forked from `support.forkserver`, which has its modules imported already: that saves
about half a second of each start; any other argv, or HALEPHANT_TEST_FORKSERVER=0, runs `subprocess.Popen`.
"""

from __future__ import annotations

import copy
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ruamel.yaml import YAML

from halephant.testing.pgcluster import Cluster, conninfo, free_port

from . import forkserver

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_ARGV = (sys.executable, "-m", "halephant")
START_TIMEOUT = 15.0
#: How long `HalephantFactory.stop_all` lets a process shut down gracefully before the second SIGTERM.
TEARDOWN_GRACE = 0.1


class HalephantDidNotStart(RuntimeError):
    """halephant exited, or did not listen in time; the message carries its log."""


def write_config(config: Mapping[str, Any], path: pathlib.Path) -> None:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with path.open("w") as f:
        yaml.dump(_plain(config), f)


def _plain(value: Any) -> Any:
    # The safe dumper refuses dict/list subclasses and tuples; tests may hand in either.
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = str(listen).rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen must look like HOST:PORT, not {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class Running:
    """One halephant process started by `HalephantFactory`."""

    def __init__(
        self,
        *,
        proc: subprocess.Popen[bytes] | forkserver.Forked,
        host: str,
        port: int,
        config_path: pathlib.Path,
        log_path: pathlib.Path,
    ) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.config_path = config_path
        self.log_path = log_path
        #: base URL of the admin API (``http://127.0.0.1:PORT``), None when it is off
        self.admin_url: str | None = None

    def __repr__(self) -> str:
        return f"<halephant pid={self.proc.pid} {self.host}:{self.port} rc={self.proc.returncode}>"

    def dsn(
        self, user: str = "myapp", password: str | None = "myapp", dbname: str = "myapp", **extra: object
    ) -> str:
        """A libpq keyword/value string for connecting through halephant; `extra` adds or overrides keys."""
        params: dict[str, object] = {
            "host": self.host, "port": self.port, "user": user, "password": password, "dbname": dbname,
            "sslmode": "disable",
        }  # fmt: skip
        params.update(extra)
        return conninfo(**params)

    def admin_get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        """GET `path` from the admin API: (status, body)."""
        import urllib.error
        import urllib.request

        assert self.admin_url is not None, "the admin API is off in this halephant"
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode()

    def admin_json(self, path: str) -> Any:
        """GET `path` from the admin API and decode its JSON (status 200 required)."""
        import json

        status, body = self.admin_get(path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the listen port (and the admin API's, when on) accepts TCP connections; raise (with
        the log) if halephant exits. The admin API starts just after the proxy's listener."""
        deadline = time.monotonic() + timeout
        self._wait_listening(self.host, self.port, deadline, timeout)
        if self.admin_url is not None:
            host, _, port = self.admin_url.removeprefix("http://").rpartition(":")
            self._wait_listening(host, int(port), deadline, timeout)

    def _wait_listening(self, host: str, port: int, deadline: float, timeout: float) -> None:
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise HalephantDidNotStart(
                    f"halephant exited with status {rc} before listening on {host}:{port}; "
                    f"config {self.config_path}; log:\n{self.log_text()}"
                )
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise HalephantDidNotStart(
                    f"halephant did not listen on {host}:{port} within {timeout:g} s; "
                    f"config {self.config_path}; log:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        """Send `signum` (e.g. SIGHUP to reload) if the process still runs."""
        if self.alive:
            self.proc.send_signal(signum)

    def reload(self, config: Mapping[str, Any], expect: str, timeout: float = 10.0) -> str:
        """Write `config` over the running file, SIGHUP, wait until the reload has finished (done or
        failed) and `expect` is logged by it; return the whole log."""
        write_config(config, self.config_path)
        start = len(self.log_text())
        self.signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            new = log[start:]
            if "reload: done" in new or "still running with the previous configuration" in new:
                assert expect in new, log
                return log
            time.sleep(0.05)
        raise AssertionError(f"no reload finished after SIGHUP; log:\n{self.log_text()}")

    def stop(self, timeout: float = 10.0, grace: float = 1.0) -> int:
        """SIGTERM, a second SIGTERM after `grace` seconds (no waiting for clients to finish), then SIGKILL
        after `timeout` seconds; return the exit status (negative: the signal).

        The second SIGTERM is repeated every half second: one sent while the first is still pending (a
        busy machine) merges with it, and halephant would go on draining."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                deadline = time.monotonic() + timeout
                while True:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(min(0.5, max(deadline - time.monotonic(), 0.01)))
                        break
                    except subprocess.TimeoutExpired:
                        if time.monotonic() >= deadline:
                            self.proc.kill()
                            self.proc.wait()
                            break
        return self.proc.returncode


class HalephantFactory:
    """Starts halephant processes for one test and stops them all at teardown (the `halephant` fixture)."""

    def __init__(self, workdir: pathlib.Path, argv: Sequence[str] = DEFAULT_ARGV) -> None:
        self.workdir = workdir
        self.argv = list(argv)
        self.started: list[Running] = []

    def spawn(self, config: Mapping[str, Any]) -> Running:
        """Write the config and start halephant without waiting (for tests of start-up failures)."""
        final: dict[str, Any] = copy.deepcopy(dict(config))
        final.setdefault("listen", f"127.0.0.1:{free_port()}")
        host, port = _split_listen(final["listen"])
        # the admin API's default port (6433) would be shared by every halephant a test run starts
        admin = final.setdefault("admin", {})
        admin_url = None
        if isinstance(admin, dict):
            admin.setdefault("listen", f"127.0.0.1:{free_port()}")
            if admin["listen"] is not None:
                admin_host, admin_port = _split_listen(admin["listen"])
                admin_url = f"http://{admin_host}:{admin_port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        n = len(self.started) + 1
        config_path = self.workdir / f"halephant-{n}.yaml"
        log_path = self.workdir / f"halephant-{n}.log"
        write_config(final, config_path)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # The working tree's code, also when halephant is not installed in this interpreter.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        proc: subprocess.Popen[bytes] | forkserver.Forked
        with log_path.open("wb") as log:
            if self.argv == list(DEFAULT_ARGV) and os.environ.get("HALEPHANT_TEST_FORKSERVER") != "0":
                args = ["run", "-c", str(config_path)]
                proc = forkserver.spawn(args, env=env, cwd=str(self.workdir), log=str(log_path))
            else:
                proc = subprocess.Popen(
                    [*self.argv, "run", "-c", str(config_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                )  # fmt: skip
        running = Running(proc=proc, host=host, port=port, config_path=config_path, log_path=log_path)
        running.admin_url = admin_url
        self.started.append(running)
        return running

    def start(self, config: Mapping[str, Any], timeout: float = START_TIMEOUT) -> Running:
        """Start halephant with `config` and return once it accepts TCP connections."""
        running = self.spawn(config)
        running.wait_ready(timeout)
        return running

    def stop_all(self) -> None:
        # After the test: nothing waits for its clients (often still connected, idle) to be let go
        # gracefully, which a first SIGTERM gives them a second for (DRAIN_IDLE_GRACE).
        for running in self.started:
            running.stop(grace=TEARDOWN_GRACE)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def default_config(pg: Cluster, **overrides: Any) -> dict[str, Any]:
    """The configuration most tests start from: cluster `main` = the primary and its replicas.

    `overrides` merge into it recursively (a dict merges into a dict, anything else replaces); a value of
    None removes the key, e.g. ``default_config(pg, users={"myapp_ro": None})``.
    """
    config: dict[str, Any] = {
        "clusters": {"main": {"nodes": [f"{node.host}:{node.port}" for node in pg.nodes]}},
        "databases": {"myapp": {"cluster": "main", "pool_size": 5}},
        "users": {
            "myapp": {"password": "myapp", "auth": "scram-sha-256"},
            "myapp_ro": {"password": "myapp_ro", "auth": "scram-sha-256"},
        },
    }
    return _merge(config, overrides)
