"""The PostgreSQL cluster end-to-end tests expect: its roles, their auth methods and the `myapp` database.

The session-wide `pg` fixture uses `start_test_cluster()`; tests that must break a cluster (kill, promote,
restart) start their own with the same function so that the same roles exist there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from halephant.testing.pgcluster import Cluster, database_sql, role_sql

#: role -> password; each authenticates to PostgreSQL over TCP with the method in HBA_LINES, else scram.
ROLE_PASSWORDS = {
    "myapp": "myapp",
    "myapp_ro": "myapp_ro",
    "md5user": "md5user",
    "plainuser": "plainuser",
    "trustuser": "trustuser",
}

# Placed before the generic `host all all 127.0.0.1/32 scram-sha-256` line, which would match first otherwise.
HBA_LINES = (
    "host all md5user 127.0.0.1/32 md5",
    "host all plainuser 127.0.0.1/32 password",  # cleartext password from the pooler to PostgreSQL
    "host all trustuser 127.0.0.1/32 trust",
)

DATABASE = "myapp"


def start_test_cluster(*, replicas: int = 1, hba: Sequence[str] = (), **kwargs: Any) -> Cluster:
    """Start a cluster with the test roles and the `myapp` database, replicated to every replica; `hba`:
    pg_hba.conf lines placed before the test roles' own (`HBA_LINES`)."""
    others = ", ".join(role for role in ROLE_PASSWORDS if role != "myapp")
    # One psql run for all of it (each run costs a process and a login).
    script = "".join([
        role_sql("myapp", ROLE_PASSWORDS["myapp"], createdb=True),
        role_sql("myapp_ro", ROLE_PASSWORDS["myapp_ro"]),
        # Stored as an md5 hash, so PostgreSQL can ask for md5 (scram verifiers cannot answer md5).
        role_sql("md5user", ROLE_PASSWORDS["md5user"], password_encryption="md5"),
        role_sql("plainuser", ROLE_PASSWORDS["plainuser"]),
        role_sql("trustuser", ROLE_PASSWORDS["trustuser"]),
        database_sql(DATABASE, owner="myapp"),
        f"GRANT CONNECT ON DATABASE {DATABASE} TO {others};\n",
        # Tables that `myapp` creates are readable by the read-only user, as on the replica route.
        f"\\connect {DATABASE}\n",
        "ALTER DEFAULT PRIVILEGES FOR ROLE myapp IN SCHEMA public GRANT SELECT ON TABLES TO myapp_ro;\n",
    ])  # fmt: skip
    cluster = Cluster.start(replicas=replicas, hba=[*hba, *HBA_LINES], **kwargs)
    try:
        cluster.primary.sql(script)
        cluster.wait_replicated()
    except BaseException:
        cluster.destroy()
        raise
    return cluster
