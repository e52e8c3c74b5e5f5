"""Hypothesis profile for the sans-IO protocol tests: derandomized and bounded, so the suite is fast and
gives the same verdict on every run."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

#: Used as ``@settings(parent=settings.get_profile(PROFILE))``; registered, not loaded, so tests elsewhere
#: keep their own settings.
PROFILE = "halephant-protocol"

settings.register_profile(
    PROFILE,
    derandomize=True,
    database=None,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
