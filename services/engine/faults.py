"""Test only, never set in production: make one request fail on purpose at one stage.

`SELFSPEC_FAULT_REQUESTS="verify:req-3,sample:req-5"` (read at import), or `inject(stage,
request_id)`, makes the named stage raise whenever it handles that request: `admit` while
the request is admitted, `prefill` in its prompt's pass, `verify` in any verification
pass that includes it, `sample` when its drafted tokens are accepted. The tests use it to
check that a failure ends its own request and no other.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

ENV = "SELFSPEC_FAULT_REQUESTS"
STAGES = ("admit", "prefill", "verify", "sample")


class InjectedFault(RuntimeError):
    """A failure asked for by a test."""


_armed: dict[str, set[str]] = {}


def inject(stage: str, request_id: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"fault stage must be one of {', '.join(STAGES)}, got {stage!r}")
    _armed.setdefault(stage, set()).add(request_id)


def clear() -> None:
    _armed.clear()


def check(stage: str, request_ids: Iterable[str]) -> None:
    """Raise if a fault is armed at `stage` for any of `request_ids`."""
    if not _armed:  # production: nothing armed, nothing to look up
        return
    hit = _armed.get(stage, set()).intersection(request_ids)
    if hit:
        raise InjectedFault(f"{ENV}: {stage} failed on purpose for {sorted(hit)}")


for _item in filter(None, os.environ.get(ENV, "").split(",")):
    inject(*_item.split(":", 1))
