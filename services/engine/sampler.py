"""Turning logits into tokens, and deciding which drafted tokens to keep.

Greedy acceptance keeps a drafted token while it is the target's argmax.
Speculative (rejection) sampling keeps drafted token d with probability
min(1, p(d) / q(d)) and, at the first rejection, samples from the normalised
positive part of p - q; every emitted token is then distributed exactly as the
target model's own sampling would give (Leviathan et al., Chen et al., 2023).
Draft and target go through the same temperature, min-p, top-k and top-p processing.
"""

from __future__ import annotations

import math

import torch

from services.common.params import SamplingParams


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Rows of `logits` to sampling distributions after temperature, min-p, top-k and
    top-p (min-p first, as vLLM's v1 sampler)."""
    logits = logits.float() / params.temperature
    if params.min_p > 0:
        logits = logits.masked_fill(min_p_mask(logits, params.min_p), float("-inf"))
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # before it already does.
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def min_p_mask(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Where a token's probability is under `min_p` times the row's most likely one's.
    Compared as logits, p_i < min_p * p_max being l_i < l_max + log(min_p): no softmax."""
    top = logits.max(dim=-1, keepdim=True).values
    return logits < top + math.log(min_p)


def accept_greedy(proposed: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """(number of drafted tokens kept, the token after them)."""
    targets = target_logits.argmax(-1).tolist()
    n = 0
    while n < len(proposed) and proposed[n] == targets[n]:
        n += 1
    return n, targets[n]


def accept_sampled(
    proposed: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative sampling over `[k + 1, vocab]` target distributions.

    `draft_probs` is `[k, vocab]`, the distributions the drafted tokens were sampled
    from; None means each drafted token was proposed with certainty (n-gram lookup),
    a point mass at the token.
    """
    k = len(proposed)
    target_probs = _beside(generator, target_probs)
    draft_probs = None if draft_probs is None else _beside(generator, draft_probs)
    for i, token in enumerate(proposed):
        p = target_probs[i]
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[token] = 1.0
        else:
            q = draft_probs[i]
        u = torch.rand((), generator=generator, device=p.device)
        # Accept with probability min(1, p/q); one read back from the device, not two.
        if bool((q[token] > 0) & (u * q[token] < p[token])):
            continue
        return i, int(torch.multinomial(residual(p, q), 1, generator=generator))
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where to sample after a rejection: the normalised positive part of p - q."""
    r = (p - q).clamp_min(0)
    total = r.sum()
    # p == q (up to rounding) never rejects in theory; fall back to p itself.
    return r / total if total > 0 else p


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(_beside(generator, probs), 1, generator=generator))


def _beside(generator: torch.Generator | None, probs: torch.Tensor) -> torch.Tensor:
    """`probs` on the generator's device: PyTorch samples only with a generator of the
    tensor's own device. Sequences keep theirs where the logits are, so this is a no-op
    but for callers that pass a generator from elsewhere."""
    if generator is None or generator.device == probs.device:
        return probs
    return probs.to(generator.device)
