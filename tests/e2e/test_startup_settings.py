"""Startup parameters reach the server in transaction pooling, as they would connected directly, and a bad
one is refused at login with PostgreSQL's own SQLSTATE."""

from __future__ import annotations

import psycopg
import pytest
from support.halephant import HalephantFactory, default_config
from support.leaks import assert_clean_servers

from halephant.testing.pgcluster import Cluster

pytestmark = pytest.mark.e2e


def test_each_client_sees_its_own_startup_settings_on_a_shared_server(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(default_config(pg, databases={"myapp": {"pool_size": 1}}))
    paris = psycopg.connect(
        run.dsn(options="-c TimeZone=Europe/Paris", application_name="paris"), autocommit=True
    )
    plain = psycopg.connect(run.dsn(), autocommit=True)
    with paris, plain:
        for _ in range(3):  # alternate on the single server connection
            assert paris.execute("SHOW TimeZone").fetchone() == ("Europe/Paris",)
            assert paris.execute("SHOW application_name").fetchone() == ("paris",)
            assert plain.execute("SHOW TimeZone").fetchone() != ("Europe/Paris",)
            # none sent: PostgreSQL's default, as connected directly (not the other client's)
            assert plain.execute("SHOW application_name").fetchone() == ("",)
        assert paris.info.parameter_status("TimeZone") == "Europe/Paris"
        assert plain.info.parameter_status("application_name") == ""
    assert_clean_servers(pg.primary)


def test_client_encoding_is_reported_as_postgresql_normalizes_it(
    pg: Cluster, halephant: HalephantFactory
) -> None:
    run = halephant.start(default_config(pg))
    with psycopg.connect(run.dsn(client_encoding="utf-8"), autocommit=True) as conn:
        assert conn.info.parameter_status("client_encoding") == "UTF8"


def test_unknown_setting_is_refused_at_login(pg: Cluster, halephant: HalephantFactory) -> None:
    run = halephant.start(default_config(pg))
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(run.dsn(options="-c no_such_setting=1"))
    assert 'unrecognized configuration parameter "no_such_setting"' in str(info.value)
    with psycopg.connect(run.dsn(), autocommit=True) as conn:  # everyone else is still served
        assert conn.execute("select 1").fetchone() == (1,)
    assert_clean_servers(pg.primary)
