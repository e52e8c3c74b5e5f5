"""Waiting in tests for something halephant or PostgreSQL does on its own time: poll, never sleep a fixed
time. `wait_until` fails the test with what did not happen; `became` says whether it happened, for tests
whose assertion message shows the state it was left in."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(check: Callable[[], Any], what: str, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Call `check` until it returns something true, and return that; AssertionError naming `what` once
    `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(interval)


def became(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Whether `predicate` came true within `timeout` seconds (polled every `interval`)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
