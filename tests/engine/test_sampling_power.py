"""Speculative sampling through the whole engine keeps the model's own distribution.

Tokens 1 to 3 of many seeded samples (token 0 comes from the prefill; tokens 1 and 2
from a draft of two, accepted or resampled, token 3 often the bonus token after it),
drafting `off` against each drafting mode, by a two-sample G-test. Known-wrong
samplers are the negative controls: the same test, at the same sample size, rejects
each of them. Every sample has its own seed, so the test gives the same verdict on
every run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import torch
from engine_helpers import Case, FreeDrafts, run_together
from scipy.stats import chi2_contingency

from services.engine import DraftConfig, Engine, SamplingParams, sampler
from services.engine.drafting import step as step_module

SAMPLES = 1500  # per arm; the negative controls are rejected with this many
ALPHA = 1e-4  # the test's level: the real sampler passes above it, a wrong one fails below
MIN_COUNT = 20  # outcomes rarer than this in both arms together are pooled into one
TEMPERATURE = 0.2  # the tiny model spreads its mass thinly: gather it on a few tokens
SKIP = (1,)
# For the layer drafts: repeats, and the shortlist head's ids above it.
LAYER_PROMPT = [5, 9, 17, 115, 387, 109, 455, 8, 290, 361, 356, 412, 233, 139, 109, 356, 487]
LAYER_PROMPT += LAYER_PROMPT[:5]
# For n-gram drafts: `BASE + X + BASE`. After it this tiny model samples 216 = X[0] about
# half the time (at TEMPERATURE), and n-gram lookup then proposes 207 and 412, which it
# samples with probability about 0.25 and 0.8: proposals are often kept and often
# rejected, which is where a wrong sampler shows. Found by coordinate ascent over X on
# p(X | BASE + X + BASE) from random BASEs; on a random prompt n-gram proposals are tokens
# the model almost never samples, and every sampler looks alike.
BASE, X = [86, 88, 367, 139, 257, 427, 197, 315, 63, 135, 336, 361], [216, 207, 412]
NGRAM_PROMPT = BASE + X + BASE
MODES = {
    "skip": (DraftConfig(mode="skip", skip_attn=SKIP), LAYER_PROMPT),
    "shortlist": (DraftConfig(mode="skip", skip_attn=SKIP, shortlist=256), LAYER_PROMPT),
    "ngram": (DraftConfig(mode="ngram", max_draft=2), NGRAM_PROMPT),
    "auto": (DraftConfig(mode="auto", skip_attn=SKIP), NGRAM_PROMPT),
}


@pytest.fixture(scope="module")
def tiny_llama(tiny_checkpoint) -> Iterator[Engine]:
    # One thread: the tiny model's passes are too small to share, and on a busy machine
    # threads waiting for each other made each step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine.from_pretrained(str(tiny_checkpoint("llama")))
    torch.set_num_threads(threads)


def tokens_1_to_3(
    base: Engine, draft: DraftConfig | str, prompt: list[int], first_seed: int
) -> Counter:
    """How often each (token 1, token 2, token 3) came, over SAMPLES seeded requests run
    together on a fresh engine (nothing learned by an earlier arm carries over)."""
    eng = Engine(
        base.model, base.tokenizer, base.model_path, kv_cache_bytes=16 << 20, max_waiting=SAMPLES
    )
    eng.drafting.policy.costs = FreeDrafts()
    params = [
        SamplingParams(max_tokens=4, temperature=TEMPERATURE, seed=s, ignore_eos=True)
        for s in range(first_seed, first_seed + SAMPLES)
    ]
    cases = [Case(prompt, p, draft, chat=False) for p in params]
    return Counter(tuple(s.output[1:4]) for s in run_together(eng, cases))


def g_test(a: Counter, b: Counter) -> float:
    """p-value of the two-sample G-test that `a` and `b` count draws of one distribution."""
    common = sorted(k for k in a.keys() | b.keys() if a[k] + b[k] >= MIN_COUNT)
    rows = [[c[k] for k in common] + [c.total() - sum(c[k] for k in common)] for c in (a, b)]
    if rows[0][-1] + rows[1][-1] == 0:  # nothing pooled
        rows = [r[:-1] for r in rows]
    return float(chi2_contingency(rows, lambda_="log-likelihood").pvalue)


@pytest.fixture(scope="module")
def off(tiny_llama) -> Callable[[list[int]], Counter]:
    """Drafting off on a prompt, run once per prompt. Seeds apart from the drafting arms':
    the two samples must be independent."""
    counts: dict[tuple[int, ...], Counter] = {}

    def on(prompt: list[int]) -> Counter:
        if tuple(prompt) not in counts:
            counts[tuple(prompt)] = tokens_1_to_3(tiny_llama, "off", prompt, first_seed=SAMPLES)
        return counts[tuple(prompt)]

    return on


# -- the known-wrong samplers ------------------------------------------------------------


def _point_masses(proposed: list[int], like: torch.Tensor) -> torch.Tensor:
    """An n-gram proposal as draft distributions: a point mass at each token."""
    ids = torch.tensor(proposed, device=like.device)
    return torch.nn.functional.one_hot(ids, like.shape[-1]).to(like.dtype)


def residual_is_target(monkeypatch) -> None:
    """After a rejection, sample from the target p instead of the residual (p - q)+."""
    monkeypatch.setattr(sampler, "residual", lambda p, q: p)


def bonus_from_draft(monkeypatch) -> None:
    """When every drafted token is kept, draw the bonus token from the draft's last
    distribution (an n-gram's: its last token) instead of the target's row after it."""

    def wrong(proposed, draft_probs, target_probs, generator):
        if proposed:
            q = draft_probs if draft_probs is not None else _point_masses(proposed, target_probs)
            target_probs = torch.cat((target_probs[:-1], q[-1:]))
        return sampler.accept_sampled(proposed, draft_probs, target_probs, generator)

    monkeypatch.setattr(step_module, "accept_sampled", wrong)


def misaligned_draft_probs(monkeypatch) -> None:
    """Judge drafted token i by the draft distribution of token i - 1."""

    def wrong(proposed, draft_probs, target_probs, generator):
        if proposed:
            q = draft_probs if draft_probs is not None else _point_masses(proposed, target_probs)
            draft_probs = q.roll(1, 0)
        return sampler.accept_sampled(proposed, draft_probs, target_probs, generator)

    monkeypatch.setattr(step_module, "accept_sampled", wrong)


# Each mistake in every mode where it changes what is sampled. Misaligned draft
# probabilities do not, for n-gram drafts: a point mass moved off its token makes every
# proposal a rejection, and the residual is then p less the mass of another proposed
# token, which is p itself to within what any sample size could see.
CONTROLS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "residual_is_target": (residual_is_target, tuple(MODES)),
    "bonus_from_draft": (bonus_from_draft, tuple(MODES)),
    "misaligned_draft_probs": (misaligned_draft_probs, ("skip", "shortlist", "auto")),
}


# -- the tests -----------------------------------------------------------------------------


def drafted(tiny_llama, mode: str) -> Counter:
    draft, prompt = MODES[mode]
    return tokens_1_to_3(tiny_llama, draft, prompt, first_seed=0)


@pytest.mark.parametrize("mode", MODES)
def test_drafting_keeps_the_distribution(tiny_llama, off, mode):
    """Tokens 1 to 3 drafted in `mode` are distributed as with drafting off."""
    assert g_test(off(MODES[mode][1]), drafted(tiny_llama, mode)) > ALPHA


@pytest.mark.parametrize(
    "control, mode", [(c, m) for c, (_, modes) in CONTROLS.items() for m in modes]
)
def test_the_test_rejects_wrong_samplers(tiny_llama, off, control, mode, monkeypatch):
    """Each known-wrong sampler, in each drafting mode, fails the same test at the same
    sample size: the test has the power to see a broken sampler."""
    CONTROLS[control][0](monkeypatch)
    assert g_test(off(MODES[mode][1]), drafted(tiny_llama, mode)) < ALPHA
