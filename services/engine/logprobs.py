"""Per-token log-probabilities, for requests that ask for them (`SamplingParams.logprobs`).

As vLLM's default ("raw" logprobs), they are the full model's: the log-softmax of the
logits in float32, before temperature, top-k, top-p and min-p. Drafting changes none of
them: a drafted token's come from the verification pass that accepted it, which is the
full model's pass over the same tokens. Requests that ask for none cost nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    """An output token's logprob, and the most likely (token id, logprob) pairs at its
    position, most likely first."""

    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """One entry per token: `tokens[i]`'s logprob under row i of `logits`, with the `top`
    most likely alternatives. One log-softmax, and one read back per kind of value."""
    logp = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if top == 0:
        return [TokenLogprob(c, []) for c in chosen]
    best = logp.topk(top, dim=-1)
    ids, values = best.indices.tolist(), best.values.tolist()
    return [
        TokenLogprob(c, list(zip(i, v, strict=True)))
        for c, i, v in zip(chosen, ids, values, strict=True)
    ]


def record(seq, logits: torch.Tensor, added: int) -> None:
    """Add the logprobs of `seq`'s `added` newest output tokens, whose distributions are
    the first `added` rows of `logits`; nothing when the request asked for none."""
    if seq.logprobs is None or added == 0:
        return
    seq.logprobs += token_logprobs(logits, seq.output[-added:], seq.params.logprobs)
