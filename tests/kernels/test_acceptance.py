"""Fused acceptance: the reference keeps the engine sampler's semantics and the target
distribution, and the Triton kernel returns exactly what the reference returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from kernels import acceptance_ref
from kernels.acceptance import accept
from kernels.acceptance_ref import accept_reference, inverse_cdf
from services.engine import sampler

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the interpreter
CHUNK = 512  # vocabulary chunk: a vocabulary of 1500 takes three


@dataclass
class Step:
    """One verification step's inputs, in the kernel's layout."""

    drafts: torch.Tensor  # [B, K]
    lens: torch.Tensor  # [B]
    target: torch.Tensor  # [sum(lens + 1), V]
    greedy: torch.Tensor | None
    q: torch.Tensor | None  # [sum(lens * has_q), V]
    has_q: torch.Tensor | None
    u_accept: torch.Tensor | None
    u_final: torch.Tensor | None

    def kwargs(self, device: str = "cpu") -> dict:
        def to(x):
            return None if x is None else x.to(device)

        return dict(
            greedy=to(self.greedy),
            draft_probs=to(self.q),
            has_draft_probs=to(self.has_q),
            u_accept=to(self.u_accept),
            u_final=to(self.u_final),
        )


def make_step(
    lens: list[int],
    vocab: int,
    *,
    greedy: list[bool] | None,
    has_q: list[bool] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Step:
    """Random logits; drafted tokens that follow the target's argmax for a random number
    of steps (greedy) or are drawn from the draft distribution (sampling), so that
    accepted lengths cover 0 to all."""
    g = torch.Generator().manual_seed(seed)
    B, K = len(lens), max(lens + [1])
    lens_t = torch.tensor(lens)
    logits = torch.randn(int((lens_t + 1).sum()), vocab, generator=g) * 2
    probs = torch.softmax(logits, -1)
    greedy_t = None if greedy is None else torch.tensor(greedy)
    is_greedy = torch.ones(B, dtype=torch.bool) if greedy_t is None else greedy_t
    has_q_t = torch.tensor(has_q) if has_q else torch.zeros(B, dtype=torch.bool)
    drafts = torch.randint(0, vocab, (B, K), generator=g)
    q_rows, row = [], 0
    for b, k in enumerate(lens):
        rows = slice(row, row + k)
        if is_greedy[b]:  # follow the argmax for a random number of tokens
            follow = int(torch.randint(0, k + 1, (), generator=g))
            drafts[b, :follow] = logits[rows].argmax(-1)[:follow]
        elif has_q_t[b]:  # a draft distribution near the target, tokens drawn from it
            q = torch.softmax(logits[rows] + torch.randn(k, vocab, generator=g), -1)
            drafts[b, :k] = torch.multinomial(q, 1, generator=g).flatten() if k else drafts[b, :0]
            q_rows.append(q)
        else:  # n-gram: a plausible token, proposed with certainty
            drafts[b, :k] = torch.multinomial(probs[rows], 1, generator=g).flatten()
        row += k + 1
    target = torch.where(is_greedy.repeat_interleave(lens_t + 1)[:, None], logits, probs)
    sampling = greedy_t is not None
    return Step(
        drafts=drafts,
        lens=lens_t,
        target=target.to(dtype),
        greedy=greedy_t,
        q=torch.cat(q_rows).to(dtype) if q_rows else None,
        has_q=has_q_t if has_q else None,
        u_accept=torch.rand(B, K, generator=g) if sampling else None,
        u_final=torch.rand(B, generator=g) if sampling else None,
    )


def run_kernel(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    B = step.lens.numel()
    out = tuple(torch.full((B,), -7, dtype=torch.int64, device=DEVICE) for _ in range(2))
    accepted, nxt = accept(
        step.drafts.to(DEVICE),
        step.lens.to(DEVICE),
        step.target.to(DEVICE),
        **step.kwargs(DEVICE),
        out=out,
        block_v=CHUNK,
    )
    return accepted.cpu(), nxt.cpu()


LENS = [[4, 0, 2, 3, 4, 1, 4], [1], [5, 5, 5], [0, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [37, 1500])  # 1500: several chunks of the vocabulary
@pytest.mark.parametrize("lens", LENS, ids=str)
def test_greedy_matches_reference(lens: list[int], vocab: int, dtype: torch.dtype) -> None:
    step = make_step(lens, vocab, greedy=None, dtype=dtype, seed=vocab + len(lens))
    want = accept_reference(step.drafts, step.lens, step.target)
    got = run_kernel(step)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(lens) < 3 or 0 < int(want[0].sum()) < sum(lens)  # both outcomes exercised


@pytest.mark.parametrize("vocab", [37, 1500])
@pytest.mark.parametrize("seed", range(3))
def test_sampling_matches_reference(seed: int, vocab: int) -> None:
    """A mixed batch: greedy, sampled with draft distributions, and n-gram proposals."""
    lens = [3, 4, 0, 2, 4, 1, 3, 4]
    greedy = [True, False, False, False, False, True, False, False]
    has_q = [False, True, True, False, True, False, False, True]
    step = make_step(lens, vocab, greedy=greedy, has_q=has_q, seed=seed * 10 + vocab)
    want = accept_reference(step.drafts, step.lens, step.target, **step.kwargs())
    got = run_kernel(step)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_sampling_without_draft_probs() -> None:
    step = make_step([2, 3, 1], 50, greedy=[False, False, False], seed=3)
    want = accept_reference(step.drafts, step.lens, step.target, **step.kwargs())
    assert torch.equal(torch.stack(run_kernel(step)), torch.stack(want))


def test_argmax_ties_take_the_first_across_chunks() -> None:
    step = make_step([1], 1500, greedy=None, seed=5)
    step.target[:, 1400] = step.target[:, 3] = step.target.max() + 1  # tie across chunks
    step.drafts[0, 0] = 3
    assert run_kernel(step) == (torch.tensor([1]), torch.tensor([3]))


def test_residual_when_p_equals_q_falls_back_to_p() -> None:
    """p == q never rejects in theory; if u says reject (u * q >= p), sample from p."""
    step = make_step([1], 20, greedy=[False], has_q=[True], seed=6)
    step.q = step.target[:1].clone()
    step.u_accept[:] = 1.0  # u * q == p: rejected
    want = accept_reference(step.drafts, step.lens, step.target, **step.kwargs())
    assert int(want[0]) == 0
    assert torch.equal(torch.stack(run_kernel(step)), torch.stack(want))


def test_reference_greedy_agrees_with_engine_sampler() -> None:
    step = make_step([4, 0, 3, 2], 40, greedy=None, seed=8)
    accepted, nxt = accept_reference(step.drafts, step.lens, step.target)
    rows = step.target.split((step.lens + 1).tolist())
    for b, k in enumerate(step.lens.tolist()):
        want = sampler.accept_greedy(step.drafts[b, :k].tolist(), rows[b])
        assert (int(accepted[b]), int(nxt[b])) == want


def first_emitted(point_mass: bool, trials: int = 16000) -> tuple[np.ndarray, np.ndarray]:
    """One-token drafts through the reference, `trials` times: how often each token came
    first (the drafted token if kept, else the residual sample), and the target's
    expected counts."""
    vocab = 6
    g = torch.Generator().manual_seed(11)
    p = torch.softmax(torch.randn(vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(vocab, generator=g) * 1.5, -1)
    proposal = torch.tensor([0.0, 0.1, 0.3, 0.2, 0.1, 0.3]) if point_mass else q
    drafts = torch.multinomial(proposal, trials, replacement=True, generator=g)[:, None]
    accepted, nxt = accept_reference(
        drafts,
        torch.ones(trials, dtype=torch.long),
        p.repeat(2 * trials, 1),
        greedy=torch.zeros(trials, dtype=torch.bool),
        draft_probs=None if point_mass else q.repeat(trials, 1),
        has_draft_probs=None if point_mass else torch.ones(trials, dtype=torch.bool),
        u_accept=torch.rand(trials, 1, generator=g),
        u_final=torch.rand(trials, generator=g),
    )
    first = torch.where(accepted == 1, drafts[:, 0], nxt)
    expected = p.double() / p.double().sum() * trials
    return torch.bincount(first, minlength=vocab).numpy(), expected.numpy()


@pytest.mark.parametrize("point_mass", [False, True])
def test_reference_emits_the_target_distribution(point_mass: bool) -> None:
    """Speculative sampling is exact: over many trials, the first token emitted is
    distributed as p (a chi-square test)."""
    assert chisquare(*first_emitted(point_mass)).pvalue > 1e-3


@pytest.mark.parametrize("point_mass", [False, True])
def test_the_test_catches_a_residual_replaced_by_the_target(monkeypatch, point_mass) -> None:
    """The negative control: sampling from p instead of the residual after a rejection
    fails the same test, at the same number of trials."""
    monkeypatch.setattr(acceptance_ref, "residual_weights", lambda p, q: p)
    assert chisquare(*first_emitted(point_mass)).pvalue < 1e-5


def test_inverse_cdf() -> None:
    w = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25])
    assert [inverse_cdf(w, u) for u in (0.0, 0.24, 0.26, 0.74, 0.76, 0.999)] == [1, 1, 3, 3, 4, 4]
    assert inverse_cdf(w, 1.0) == 4  # past the end by rounding: the last token with weight


def test_sampling_needs_uniforms() -> None:
    step = make_step([1], 10, greedy=[False], seed=1)
    with pytest.raises(ValueError, match="u_accept"):
        accept(step.drafts, step.lens, step.target, greedy=step.greedy)
