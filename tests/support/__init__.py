"""Test-only helpers shared by the test modules: running halephant as a subprocess, leak checks.

Throwaway PostgreSQL clusters live in `halephant.testing.pgcluster` instead, because `halephant demo`
needs them at run time too.
"""
