"""`StepGraphs`: off CUDA the step just runs; on CUDA a replay equals running the step."""

from __future__ import annotations

import pytest
import torch

from benchmarks.cuda_graphs import StepGraphs


def _step(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tanh(x @ w) + 1
    return y, y.sum(-1)


def test_cpu_runs_the_step() -> None:
    graphs = StepGraphs(_step)
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    y, s = graphs("b3", x, w)
    assert torch.equal(y, _step(x, w)[0]) and torch.equal(s, _step(x, w)[1])
    assert len(graphs) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replay_matches_eager() -> None:
    graphs = StepGraphs(_step)
    w = torch.randn(64, 32, device="cuda")
    for batch in (4, 8, 4):
        for _ in range(2):  # a second call with new values replays the same graph
            x = torch.randn(batch, 64, device="cuda")
            y, s = graphs(batch, x, w)
            want = _step(x, w)
            torch.testing.assert_close(y, want[0])
            torch.testing.assert_close(s, want[1])
    assert len(graphs) == 2
