"""End to end: the console commands operators bring from PgBouncer beyond the ones in test_admin.py:
SHOW USERS (and GET /users), against a real PostgreSQL behind halephant.
"""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg.errors
import pytest
import rawclient as rc
from support.halephant import HalephantFactory, Running, default_config
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
