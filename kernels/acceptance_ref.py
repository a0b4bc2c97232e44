"""Fused acceptance, the PyTorch reference: which drafted tokens a batch keeps, and the
token after them. `kernels.acceptance` computes the same in one Triton launch.

Layout (the verifier's own, so nothing is padded or copied): sequence b drafted
`draft_lens[b]` tokens, row b of `draft_tokens` (padded); `target` holds
`draft_lens[b] + 1` consecutive rows per sequence, the verifier's scores after the last
accepted token and after each drafted one: logits (or anything with the same argmax)
for greedy sequences, sampling probabilities for the others. `draft_probs` holds
`draft_lens[b]` consecutive rows for each sequence with `has_draft_probs[b]`, the
distributions its tokens were drawn from; a sequence without them proposed its tokens
with certainty (n-gram lookup), a point mass.

Greedy keeps a drafted token while it is the target's argmax (the first maximum on a
tie) and then emits the argmax. Sampling (Leviathan et al., Chen et al., 2023) keeps
drafted token d with probability min(1, p(d) / q(d)), i.e. when `u * q(d) < p(d)` for
the uniform `u_accept[b, i]`; at the first rejection it samples from the normalised
positive part of p - q (p itself if that is empty), and when all are kept it samples
from the last row of p. Sampling is by inverse CDF with the uniform `u_final[b]`: the
first index whose cumulative weight exceeds `u * total`, or the last index with
weight if rounding leaves none. These are `services.engine.sampler`'s semantics, with
the uniforms supplied so that a GPU step needs no host synchronisation.
"""

from __future__ import annotations

import torch


def accept_reference(
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    target: torch.Tensor,
    *,
    greedy: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    has_draft_probs: torch.Tensor | None = None,
    u_accept: torch.Tensor | None = None,
    u_final: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted drafted tokens `[B]`, next token `[B]`), both int64. `greedy` None means
    every sequence is greedy; otherwise sampling sequences need both uniforms."""
    B = draft_tokens.shape[0]
    lens = draft_lens.tolist()
    accepted = torch.zeros(B, dtype=torch.int64)
    nxt = torch.zeros(B, dtype=torch.int64)
    row = q_row = 0
    for b in range(B):
        k = lens[b]
        p_rows = target[row : row + k + 1].float()
        drafted = draft_tokens[b, :k].tolist()
        if greedy is None or bool(greedy[b]):
            accepted[b], nxt[b] = _greedy(drafted, p_rows)
        else:
            q_rows = None
            if draft_probs is not None and bool(has_draft_probs[b]):
                q_rows = draft_probs[q_row : q_row + k].float()
                q_row += k
            accepted[b], nxt[b] = _sampled(drafted, p_rows, q_rows, u_accept[b], u_final[b])
        row += k + 1
    return accepted.to(draft_tokens.device), nxt.to(draft_tokens.device)


def _greedy(drafted: list[int], scores: torch.Tensor) -> tuple[int, int]:
    best = scores.argmax(-1).tolist()
    n = 0
    while n < len(drafted) and drafted[n] == best[n]:
        n += 1
    return n, best[n]


def _sampled(drafted, p, q, u_accept, u_final) -> tuple[int, int]:
    for i, d in enumerate(drafted):
        q_d = 1.0 if q is None else float(q[i, d])
        if q_d > 0 and float(u_accept[i]) * q_d < float(p[i, d]):
            continue
        if q is None:
            point = torch.zeros_like(p[i])
            point[d] = 1.0
            return i, inverse_cdf(residual_weights(p[i], point), float(u_final))
        return i, inverse_cdf(residual_weights(p[i], q[i]), float(u_final))
    return len(drafted), inverse_cdf(p[-1], float(u_final))


def residual_weights(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The positive part of p - q, unnormalised; p itself when that is all zero."""
    r = (p - q).clamp_min(0)
    return r if float(r.sum()) > 0 else p


def inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """The first index whose cumulative weight exceeds `u` times the total."""
    c = weights.float().cumsum(0)
    hit = torch.nonzero(c > u * c[-1])
    if len(hit):
        return int(hit[0])
    return int(torch.nonzero(weights > 0)[-1])
