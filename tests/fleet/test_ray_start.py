"""A local Ray node that misses Ray's 30 s start-up window is started again."""

from __future__ import annotations

import pytest
import ray

from services.serve.local import Fleet, FleetOptions

pytestmark = pytest.mark.timeout(120)

TIMED_OUT = (
    "The current node timed out during startup. This could happen because some of the "
    "raylet failed to startup or the GCS has become overloaded."
)


def test_a_node_that_times_out_is_started_again(monkeypatch):
    real_init, calls = ray.init, []

    def first_times_out(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:  # what Ray raises when its raylet does not register in time
            raise Exception(TIMED_OUT)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", first_times_out)
    said: list[str] = []
    fleet = Fleet(FleetOptions(num_cpus=1, controller=False), say=said.append)
    try:
        fleet._start_ray()
        # a loaded machine may time the real start out too, and be retried again
        assert ray.is_initialized() and len(calls) >= 2
        assert any("did not come up" in line for line in said)
        assert said[-1].startswith("[2/5] ray")
    finally:
        ray.shutdown()


def test_other_start_up_errors_are_not_retried(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise Exception("some other failure")

    monkeypatch.setattr(ray, "init", broken)
    fleet = Fleet(FleetOptions(num_cpus=1, controller=False), say=lambda _: None)
    with pytest.raises(Exception, match="some other failure"):
        fleet._start_ray()
    assert len(calls) == 1
