"""End to end: the console commands operators bring from PgBouncer beyond the ones in test_admin.py:
SHOW USERS (and GET /users), DISABLE and ENABLE, WAIT_CLOSE, against a real PostgreSQL behind halephant.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import psycopg.errors
import pytest
import rawclient as rc
from support.halephant import HalephantFactory, Running, default_config
from support.leaks import assert_clean_servers
from support.polling import wait_until

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e

PASSWORDS = {"admin": "admin-pw", "watcher": "watcher-pw", "nobody": "nobody-pw", "alias": "alias-pw"}


def config(pg: Cluster) -> dict[str, Any]:
    main = {"cluster": "main", "database": "myapp"}
    return default_config(
        pg,
        clusters={"main": {"probe_user": "myapp"}},
        databases={"myapp": {**main, "pool_size": 3}, "other": {**main, "pool_size": 2}},
        users={
            "myapp": {"max_user_connections": 4},
            # an alias: its own password and pools, upstream as myapp (whose cap counts its servers)
            "alias": {"password": "alias-pw", "server_user": "myapp", "max_client_conn": 3},
            "admin": {"password": "admin-pw"},
            "watcher": {"password": "watcher-pw"},
            "nobody": {"password": "nobody-pw"},
        },
        admin={"users": ["admin"], "stats_users": ["watcher"]},
    )


@pytest.fixture(scope="module")
def hal(pg: Cluster, module_halephant: HalephantFactory) -> Running:
    return module_halephant.start(config(pg))


def connect(hal: Running, dbname: str = "myapp", user: str = "myapp") -> psycopg.Connection[Any]:
    password = PASSWORDS.get(user, user)
    return psycopg.connect(hal.dsn(dbname=dbname, user=user, password=password), autocommit=True)


def console(hal: Running, user: str = "admin") -> Any:
    dsn = hal.dsn(user=user, password=PASSWORDS[user], dbname="pgbouncer")
    return psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.ClientCursor)


def show(conn: Any, what: str) -> dict[str, dict[str, Any]]:
    """SHOW `what`, by the first column."""
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


# --- SHOW USERS ----------------------------------------------------------------------------------------


def test_show_users_has_pgbouncers_columns_and_counts_servers_per_upstream_role(hal: Running) -> None:
    with connect(hal) as one, connect(hal) as two, connect(hal, user="alias") as alias, console(hal) as admin:
        one.execute("SELECT 1")
        two.execute("SELECT 1")
        alias.execute("BEGIN")
        alias.execute("SELECT 1")  # holds a server of the alias's own pool
        cur = admin.execute("SHOW USERS")
        assert [(d.name, d.type_code) for d in cur.description] == [
            ("name", 25), ("pool_size", 25), ("reserve_pool_size", 25), ("pool_mode", 25),
            ("max_user_connections", 23), ("current_connections", 23),
            ("max_user_client_connections", 23), ("current_client_connections", 23),
        ]  # fmt: skip

        def servers_as_myapp() -> int:
            pools = [p for p in hal.admin_json("/pools") if p["user"] in ("myapp", "alias")]
            return sum(p["sv_active"] + p["sv_idle"] + p["sv_used"] + p["sv_login"] for p in pools)

        users = show(admin, "USERS")
        assert sorted(users) == ["admin", "alias", "myapp", "myapp_ro", "nobody", "watcher"]
        myapp, aliased = users["myapp"], users["alias"]
        assert myapp["pool_size"] is myapp["reserve_pool_size"] is myapp["pool_mode"] is None
        # the role's cap and count, for the role and its alias alike: every server logged in as myapp
        assert myapp["max_user_connections"] == aliased["max_user_connections"] == 4
        assert 2 <= myapp["current_connections"] == aliased["current_connections"] == servers_as_myapp()
        assert (myapp["max_user_client_connections"], aliased["max_user_client_connections"]) == (0, 3)
        assert (myapp["current_client_connections"], aliased["current_client_connections"]) == (2, 1)
        # console sessions are no pool clients; nobody else logs in upstream as admin
        assert (users["admin"]["current_client_connections"], users["admin"]["current_connections"]) == (0, 0)
        assert users["myapp_ro"]["max_user_connections"] == 0
        # the same through the HTTP admin API
        by_name = {u["name"]: u for u in hal.admin_json("/users")}
        assert by_name["alias"] == {
            "name": "alias", "server_user": "myapp", "max_user_connections": 4,
            "user_connections": aliased["current_connections"], "max_client_conn": 3,
            "client_connections": 1,
        }  # fmt: skip
        alias.execute("COMMIT")
    with console(hal) as admin:
        wait_until(lambda: show(admin, "USERS")["alias"]["current_client_connections"] == 0, "alias left")


def test_show_users_is_open_to_stats_users_only(hal: Running) -> None:
    with console(hal, "watcher") as watcher:
        assert "myapp" in show(watcher, "USERS")
    with rc.RawClient(hal.host, hal.port) as client:
        with pytest.raises(AssertionError, match="login failed"):
            client.login("nobody", "nobody-pw", "pgbouncer")
        assert client.last_session.messages[-1].fields["C"] == "42501"


# --- DISABLE / ENABLE ----------------------------------------------------------------------------------


def login_error(hal: Running, dbname: str, user: str = "myapp") -> dict[str, str] | None:
    """The ErrorResponse fields a login to `dbname` ends with (None: it got in)."""
    with rc.RawClient(hal.host, hal.port) as client:
        try:
            client.login(user, PASSWORDS.get(user, user), dbname)
        except AssertionError:
            fields: dict[str, str] = client.last_session.messages[-1].fields
            client.expect_closed()
            return fields
        return None


def reload_keeping_addresses(hal: Running, cfg: dict[str, Any]) -> None:
    cfg["listen"] = f"{hal.host}:{hal.port}"
    cfg["admin"]["listen"] = hal.admin_url.removeprefix("http://") if hal.admin_url else None
    hal.reload(cfg, expect="reload: done")


def test_disable_refuses_new_clients_with_55000_and_keeps_the_connected_ones(
    hal: Running, pg: Cluster
) -> None:
    connected = connect(hal)
    connected.execute("SELECT 1")
    in_transaction = connect(hal)
    in_transaction.execute("BEGIN")
    in_transaction.execute("SELECT 1")
    try:
        with console(hal) as admin:
            admin.execute("DISABLE myapp")
            error = login_error(hal, "myapp")
            assert error is not None
            assert (error["S"], error["C"], error["M"]) == (
                "FATAL",
                "55000",
                "database does not allow connections: myapp",
            )
            assert "ENABLE myapp" in error["H"]
            assert login_error(hal, "myapp", user="alias") is not None  # every user
            assert login_error(hal, "other") is None  # other databases, and the console, are not touched
            # connected clients go on: new transactions, and the one in progress
            assert connected.execute("SELECT 2").fetchone() == (2,)
            in_transaction.execute("COMMIT")
            assert in_transaction.execute("SELECT 3").fetchone() == (3,)
            databases = show(admin, "DATABASES")
            assert (databases["myapp"]["disabled"], databases["other"]["disabled"]) == (1, 0)
            assert hal.admin_json("/snapshot")["summary"]["disabled"] == ["myapp"]
            assert 'halephant_database_disabled{database="myapp"} 1.0' in hal.admin_get("/metrics")[1]
            admin.execute("DISABLE myapp")  # again: no error, as with PgBouncer
            decisions = hal.admin_json("/decisions")
            assert (decisions[0]["kind"], decisions[0]["reason"]) == ("admin", "DISABLE myapp")
            reject = next(d for d in decisions if d["kind"] != "admin")
            assert (reject["kind"], reject["sqlstate"], reject["database"]) == ("reject", "55000", "myapp")

            # a reload does not let them in again (PgBouncer keeps it across RELOAD too)
            cfg = config(pg)
            cfg["databases"]["other"]["pool_size"] = 3
            reload_keeping_addresses(hal, cfg)
            assert show(admin, "DATABASES")["myapp"]["disabled"] == 1
            error = login_error(hal, "myapp")
            assert error is not None and error["C"] == "55000"

            admin.execute("ENABLE myapp")
            assert login_error(hal, "myapp") is None
            assert show(admin, "DATABASES")["myapp"]["disabled"] == 0
            admin.execute("ENABLE myapp")  # not disabled: no error either
    finally:
        with console(hal) as admin:
            admin.execute("ENABLE myapp")
        connected.close()
        in_transaction.close()
    assert_clean_servers(pg)


def test_a_database_a_reload_removes_forgets_its_pause_and_disable(hal: Running, pg: Cluster) -> None:
    # PgBouncer drops a removed database with its state: added again, it starts as a new one. The
    # clients PAUSE held for it are told it was removed instead of waiting for a RESUME.
    outcome: list[BaseException | None] = []
    held = connect(hal, "other")  # logged in; its next transaction is held

    def transaction() -> None:
        try:
            held.execute("SELECT 1")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=transaction)
    try:
        with console(hal) as admin:
            admin.execute("PAUSE other")
            admin.execute("DISABLE other")
            thread.start()
            wait_until(
                lambda: any(
                    c["database"] == "other" and c["state"] == "waiting" for c in hal.admin_json("/clients")
                ),
                "the transaction held by PAUSE",
            )
            cfg = config(pg)
            del cfg["databases"]["other"]
            reload_keeping_addresses(hal, cfg)
            thread.join(5)
            assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.AdminShutdown), outcome
            assert 'database "other" was removed' in str(outcome[0])
            assert "other" not in show(admin, "DATABASES")

            reload_keeping_addresses(hal, config(pg))
            row = show(admin, "DATABASES")["other"]
            assert (row["paused"], row["disabled"]) == (0, 0)
            assert hal.admin_json("/snapshot")["summary"]["paused"] == []
            with connect(hal, "other") as again:
                assert again.execute("SELECT 1").fetchone() == (1,)
    finally:
        thread.join(5)
        held.close()
        reload_keeping_addresses(hal, config(pg))
        with console(hal) as admin:
            admin.execute("ENABLE other")
            for database in show(admin, "DATABASES").values():
                if database["paused"]:
                    admin.execute(f"RESUME {database['name']}")
    assert_clean_servers(pg)


def test_disable_and_enable_refuse_bad_input_and_read_only_users(hal: Running) -> None:
    with console(hal) as admin:
        for command in ("DISABLE nosuch", "ENABLE nosuch", 'DISABLE "nosuch"'):
            with pytest.raises(psycopg.errors.InvalidCatalogName, match='database "nosuch" does not exist'):
                admin.execute(command)
        for command in ("DISABLE", "ENABLE", "DISABLE myapp other"):
            with pytest.raises(psycopg.errors.SyntaxError):
                admin.execute(command)
        assert show(admin, "DATABASES")["myapp"]["disabled"] == 0
        assert any(r["command"] == "DISABLE db" for r in show(admin, "HELP").values())
    with console(hal, "watcher") as watcher:
        for command in ("DISABLE myapp", "ENABLE myapp"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="read-only"):
                watcher.execute(command)
        assert show(watcher, "DATABASES")["myapp"]["disabled"] == 0
    assert login_error(hal, "myapp") is None


# --- WAIT_CLOSE ----------------------------------------------------------------------------------------


def test_wait_close_answers_once_the_servers_reconnect_marked_are_closed(
    hal: Running, pg: Cluster, backend_pids: Any
) -> None:
    with console(hal) as admin:
        admin.execute("WAIT_CLOSE other")  # nothing marked: at once
        busy = connect(hal, dbname="other")
        busy.execute("BEGIN")
        (old_pid,) = busy.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        admin.execute("RECONNECT other")  # the busy server is marked, closed when it comes back
        answered = threading.Event()
        waiter = threading.Thread(target=lambda: (admin.execute("WAIT_CLOSE other"), answered.set()))
        waiter.start()
        try:
            assert not answered.wait(0.5)  # the transaction holds the marked server
            with console(hal) as other:  # other sessions, and WAIT_CLOSE of other databases, go on
                other.execute("WAIT_CLOSE myapp")
            busy.execute("COMMIT")  # the server comes back and is closed: WAIT_CLOSE answers
            assert answered.wait(10)
        finally:
            busy.close()
            waiter.join(10)
        wait_until(lambda: old_pid not in backend_pids("myapp"), "the marked backend gone")
        admin.execute("WAIT_CLOSE")  # all databases: nothing left
        # the extended protocol waits too, and is answered the same
        with psycopg.connect(hal.dsn(user="admin", password="admin-pw", dbname="halephant")) as ext:
            ext.autocommit = True
            assert ext.execute("WAIT_CLOSE").statusmessage == "WAIT_CLOSE"
    assert_clean_servers(pg)


def test_wait_close_refuses_bad_input_and_read_only_users(hal: Running) -> None:
    with console(hal) as admin:
        with pytest.raises(psycopg.errors.InvalidCatalogName):
            admin.execute("WAIT_CLOSE nosuch")
        with pytest.raises(psycopg.errors.SyntaxError):
            admin.execute("WAIT_CLOSE myapp other")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="must be the last command"):
            admin.execute("WAIT_CLOSE; SHOW VERSION")
        assert admin.execute("SHOW VERSION").fetchone()
    with (
        console(hal, "watcher") as watcher,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="read-only"),
    ):
        watcher.execute("WAIT_CLOSE")
