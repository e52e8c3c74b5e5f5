"""End-to-end: what halephant logs, in text and JSON, and that no secret ever reaches the log.

A session logs in with wrong and right passwords as users whose config holds a plaintext password, a
SCRAM verifier and an md5 hash, through a raw SCRAM client and libpq; the config is reloaded with a new
password and once with a broken one; then the whole log (at debug level) is searched for every password,
every part of the verifier and hash, and any SCRAM message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import time
from typing import Any

import pytest
from rawclient import RawClient, data_rows
from support.halephant import HalephantFactory, Running, default_config, write_config

from halephant.testing.pgcluster import Cluster, free_port

pytestmark = pytest.mark.e2e

VERIFIED = "Cl13nt-Secret-1"  # myapp's password, configured as a SCRAM verifier
PLAIN = "Pl41n-Secret-2"  # myapp_ro's password, configured in plaintext
RELOADED = "R3l0ad-Secret-3"
MD5 = "Md5-Secret-4"  # md5user's password, configured as an md5 hash
WRONG = "Wr0ng-Secret-5"
BROKEN = "Br0k3n-Secret-6"


def _verifier(password: str, salt: bytes = b"halephant-salt!!", iterations: int = 4096) -> str:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


VERIFIER = _verifier(VERIFIED)
MD5_HASH = "md5" + hashlib.md5((MD5 + "md5user").encode()).hexdigest()


def _config(pg: Cluster, fmt: str, ro_password: str = PLAIN) -> dict[str, Any]:
    return default_config(
        pg,
        listen=f"127.0.0.1:{free_port()}",
        users={
            "myapp": {"password": VERIFIER, "server_password": "myapp"},
            "myapp_ro": {"password": ro_password, "server_password": "myapp_ro"},
            "md5user": {"password": MD5_HASH, "server_password": "md5user", "auth": "md5"},
        },
        logging={"level": "debug", "format": fmt},
    )


def _login(run: Running, user: str, password: str) -> bool:
    with RawClient(run.host, run.port, timeout=5) as client:
        try:
            client.login(user, password, "myapp")
        except AssertionError:
            return False
        return data_rows(client.simple_query("SELECT 1")) == [["1"]]


def _reload_and_wait(run: Running, config: dict[str, Any], text: str) -> None:
    write_config(config, run.config_path)
    run.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while text not in run.log_text():
        assert time.monotonic() < deadline, run.log_text()
        time.sleep(0.05)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secret_ever_reaches_the_log(
    pg: Cluster, halephant: HalephantFactory, run_client: Any, fmt: str
) -> None:
    config = _config(pg, fmt)
    run = halephant.start(config)
    assert not _login(run, "myapp", WRONG) and _login(run, "myapp", VERIFIED)
    assert not _login(run, "myapp_ro", WRONG) and _login(run, "myapp_ro", PLAIN)
    assert not _login(run, "nobody", WRONG)
    for user, password, ok in [("myapp", VERIFIED, True), ("md5user", MD5, True), ("md5user", WRONG, False)]:
        done = run_client("psql", run, ["-tAc", "SELECT 1"], user=user, password=password)
        assert (done.returncode == 0) == ok, done.stderr
    _reload_and_wait(run, _config(pg, fmt, RELOADED), "users.myapp_ro.password: changed")
    assert _login(run, "myapp_ro", RELOADED) and not _login(run, "myapp_ro", PLAIN)
    broken = _config(pg, fmt)
    broken["users"]["myapp_ro"]["password"] = [BROKEN]
    _reload_and_wait(run, broken, "reload failed")
    run.stop()
    log = run.log_text()

    assert "28P01" in log and "login ok" in log and "reload" in log
    secrets = [VERIFIED, PLAIN, RELOADED, MD5, WRONG, BROKEN, VERIFIER, MD5_HASH, MD5_HASH[3:]]
    secrets += VERIFIER.replace("$", ":").split(":")[2:]  # salt, StoredKey, ServerKey
    for secret in secrets:
        assert secret not in log, f"secret {secret!r} logged"
    for scram_part in ("c=biws", "SCRAM-SHA-256$", "r=", "p="):  # client-final / verifier / proof
        assert scram_part not in log, f"{scram_part!r} logged"
    if fmt == "json":
        records = [json.loads(line) for line in log.splitlines() if line.strip()]
        assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
        messages = [r["message"] for r in records]
        assert any("reload: done" in m for m in messages)
        assert any("pool" in m and "created" in m for m in messages)
        assert any(r.get("event") == "reload" and r.get("path") == "users.myapp_ro.password" for r in records)
        assert any(r.get("event") == "reload_failed" for r in records)


def test_a_name_a_client_chose_cannot_forge_a_log_line(pg: Cluster, halephant: HalephantFactory) -> None:
    # The user and database names of a startup packet are logged with every line about that client.
    forged = "2026-01-01 00:00:00.000 INFO    halephant.client: <client #1 postgres@app>: login ok (trust)"
    run = halephant.start(_config(pg, "text"))
    with RawClient(run.host, run.port, timeout=5) as client:
        try:
            client.login("myapp", VERIFIED, f"nowhere\n{forged}\x1b[2J")
        except AssertionError:
            pass
    run.stop()
    lines = run.log_text().splitlines()
    assert not any(line.startswith(forged) for line in lines)
    assert any(line.startswith("\t" + forged) for line in lines)  # a continuation, as PostgreSQL writes it
    assert not any("\x1b" in line for line in lines) and any("\\x1b[2J" in line for line in lines)
