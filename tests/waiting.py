"""Waiting in tests: poll until a condition holds.

Tests synchronise on what happened (a version applied, a lease event seen), never on
how long something took. The deadline is only a guard against a hang, generous enough
for a loaded CI machine: a test that reaches it has failed to happen, not been slow.
"""

from __future__ import annotations

import time

HANG_GUARD_S = 120.0


def wait_for(
    predicate, timeout: float = HANG_GUARD_S, every: float = 0.05, what: str = "condition"
):
    """Poll `predicate` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
