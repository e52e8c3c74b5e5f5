"""Helpers for testing halephant and for trying it out: throwaway PostgreSQL clusters (`pgcluster`).

Standard library only, because `halephant demo` uses them at run time.
"""

from __future__ import annotations

from halephant.testing.pgcluster import (
    Cluster,
    Node,
    PgError,
    PgNotFound,
    conninfo,
    find_bindir,
    free_port,
    pgbench,
)

__all__ = ["Cluster", "Node", "PgError", "PgNotFound", "conninfo", "find_bindir", "free_port", "pgbench"]
