"""A separate draft model (`mode: "model"`) with the target's tokenizer: greedy output
equals drafting `off`, sampled output is distributed as the target's, its KV is rolled
back and freed as the target's is, and a draft model that cannot serve is refused at load.

The real pair is the default model and its own first layers saved as a checkpoint of
their own (with the LM head and tokenizer); the tiny pair, a tiny random Llama with the
default tokenizer and its first layers, is for sampling, where many requests run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from engine_helpers import EIGHT_CHATS, Case, assert_no_blocks_held, run_together
from scipy.stats import chi2_contingency

from services.engine import DraftConfig, Engine, SamplingParams, checkpoint, sampler
from services.engine.drafting import draft_model
from services.engine.first_layers import save_first_layers

DRAFT_LAYERS = 6  # of the default model's 30


def load_draft(path: Path) -> tuple:
    """(model, tokenizer) of the checkpoint at `path`, as served (bfloat16)."""
    return checkpoint.load(path, "bfloat16", "cpu", None)[:2]


def with_draft(target: Engine, draft: tuple, **kwargs) -> Engine:
    """An engine on `target`'s model, drafting with `draft` (`load_draft`)."""
    return Engine(target.model, target.tokenizer, target.model_path, draft_model=draft, **kwargs)


def assert_pools_free(eng: Engine) -> None:
    assert_no_blocks_held(eng)
    assert eng.draft_pool.num_free == eng.draft_pool.num_blocks


@pytest.fixture(scope="module")
def first_layers_path(tmp_path_factory) -> Path:
    """The default model's first layers as a checkpoint: a draft model with its tokenizer."""
    out = tmp_path_factory.mktemp("draft") / "first-layers"
    return save_first_layers(checkpoint.resolve("default"), out, DRAFT_LAYERS)


@pytest.fixture(scope="module")
def first_layers(first_layers_path) -> tuple:
    return load_draft(first_layers_path)


@pytest.fixture(scope="module")
def paired(bf16_engine, first_layers) -> Engine:
    """The default model as served (bfloat16), drafting with its first layers."""
    return with_draft(bf16_engine, first_layers, kv_cache_bytes=96 << 20)


MODEL = DraftConfig(mode="model", max_draft=4)


def test_the_draft_model_is_the_default_drafting(paired):
    assert paired.default_draft.mode == "model"
    # Both pools hold about as many tokens: each is a share of the budget.
    tokens = [p.num_blocks * p.block_size for p in (paired.pool, paired.draft_pool)]
    assert abs(tokens[0] - tokens[1]) <= paired.pool.block_size


def greedy_alone_is_offs(eng: Engine, draft: DraftConfig) -> list:
    """Three chat prompts, one at a time with EOS live, drafted by `draft`: each output and
    its finish reason are drafting off's. Returns the drafted outputs."""
    params = SamplingParams(max_tokens=24)
    outs = []
    for prompt in EIGHT_CHATS[:3]:
        [base] = eng.generate([prompt], params, "off", chat=True)
        [out] = eng.generate([prompt], params, draft, chat=True)
        assert out.token_ids == base.token_ids, prompt
        assert out.finish_reason == base.finish_reason
        outs.append(out)
    assert_pools_free(eng)
    return outs


def eight_together_are_each_alone(eng: Engine, draft: DraftConfig) -> list:
    """Prompts of different lengths together, drafted by `draft`, with EOS, stop ids and
    lengths ending them at different steps, equal each alone with drafting off. Returns
    the drafted sequences."""
    period = eng.tokenizer.convert_tokens_to_ids(".")
    params = [
        SamplingParams(max_tokens=20),
        SamplingParams(max_tokens=20, stop_token_ids=(period,)),
        SamplingParams(max_tokens=12, ignore_eos=True),
    ]
    cases = [Case(p, params[i % 3], "off") for i, p in enumerate(EIGHT_CHATS)]
    alone = [run_together(eng, [c])[0].output for c in cases]
    for c in cases:
        c.draft = draft
    seqs = run_together(eng, cases)
    assert [s.output for s in seqs] == alone
    assert {s.finish_reason for s in seqs} >= {"length", "stop"}
    assert_pools_free(eng)
    return seqs


def test_greedy_batch_1_equals_off(paired):
    for out in greedy_alone_is_offs(paired, MODEL):
        assert out.stats["drafted_tokens"] > 0


def test_greedy_batch_8_equals_each_alone(paired):
    seqs = eight_together_are_each_alone(paired, MODEL)
    assert sum(s.stats.accepted for s in seqs) > 0


def test_sampled_choices_and_sessions_free_the_draft_kv(paired):
    """Forked choices start with no draft KV and catch up; a session keeps the target's
    blocks, never the draft's."""
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=3, ignore_eos=True)
    outs = paired.generate(EIGHT_CHATS[2], params, MODEL, chat=True, session_id="s")
    assert [len(o.token_ids) for o in outs] == [10] * 3
    assert paired.draft_pool.num_free == paired.draft_pool.num_blocks
    assert_pools_free(paired)


def test_no_room_in_the_draft_pool_drafts_nothing(paired):
    params = SamplingParams(max_tokens=12)
    [base] = paired.generate(["hi"], params, "off", chat=True)
    taken = paired.draft_pool.allocate(paired.draft_pool.num_free)
    try:
        [out] = paired.generate(["hi"], params, MODEL, chat=True)
    finally:
        paired.draft_pool.release(taken)
    assert out.token_ids == base.token_ids
    assert out.stats["drafted_tokens"] == 0
    assert_pools_free(paired)


def test_preempted_sequences_still_equal_off(bf16_engine, first_layers):
    """A pool for about three of eight sequences: preempted ones give up their draft KV
    too, catch up on resuming, and the output is still drafting off's."""
    tokens = 40
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    longest = max(len(bf16_engine.encode(p, chat=True)) for p in EIGHT_CHATS) + tokens + 5
    blocks = 3 * -(-longest // 16)
    per_token = sum(draft_model.kv_bytes_per_token(m) for m in (bf16_engine.model, first_layers[0]))
    small = with_draft(bf16_engine, first_layers, kv_cache_bytes=blocks * 16 * per_token)
    alone = [run_together(small, [Case(p, params, "off")])[0].output for p in EIGHT_CHATS]
    together = run_together(small, [Case(p, params, MODEL) for p in EIGHT_CHATS])
    assert [s.output for s in together] == alone
    assert sum(s.stats.preemptions for s in together) > 0
    assert sum(s.stats.drafted for s in together) > 0
    assert_pools_free(small)


# -- sampling: the tiny pair ---------------------------------------------------------------

SAMPLES = 4000  # per arm: the wrong sampler below is rejected with this many
ALPHA = 1e-4
MIN_COUNT = 20  # outcomes rarer than this in both arms together are pooled
TEMPERATURE = 0.2  # the tiny model spreads its mass thinly: gather it on a few tokens
PROMPT = [5, 9, 17, 115, 387, 109, 455, 8, 290, 361, 356, 412, 233, 139, 109, 356, 487]


@pytest.fixture(scope="module")
def tiny_pair(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Llama with the default tokenizer, and its first two layers."""
    target = tiny_checkpoint("llama")
    draft = save_first_layers(target, tmp_path_factory.mktemp("tiny") / "draft", 2)
    return target, draft


@pytest.fixture(scope="module")
def tiny_engine(tiny_pair):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # passes this small do not share well
    target, draft = tiny_pair
    yield Engine.from_pretrained(
        str(target), draft_model=str(draft), kv_cache_bytes=32 << 20, max_waiting=SAMPLES
    )
    torch.set_num_threads(threads)


def tokens_1_to_3(eng: Engine, draft: DraftConfig | str, first_seed: int) -> Counter:
    """How often each (token 1, token 2, token 3) came over SAMPLES seeded requests: token
    0 from the prefill, 1 and 2 from a draft of two, 3 often the bonus token after it."""
    params = [
        SamplingParams(max_tokens=4, temperature=TEMPERATURE, seed=s, ignore_eos=True)
        for s in range(first_seed, first_seed + SAMPLES)
    ]
    seqs = run_together(eng, [Case(PROMPT, p, draft, chat=False) for p in params])
    assert_pools_free(eng)
    return Counter(tuple(s.output[1:4]) for s in seqs)


def g_test(a: Counter, b: Counter) -> float:
    """p-value of the two-sample G-test that `a` and `b` count draws of one distribution."""
    common = sorted(k for k in a.keys() | b.keys() if a[k] + b[k] >= MIN_COUNT)
    rows = [[c[k] for k in common] + [c.total() - sum(c[k] for k in common)] for c in (a, b)]
    if rows[0][-1] + rows[1][-1] == 0:
        rows = [r[:-1] for r in rows]
    return float(chi2_contingency(rows, lambda_="log-likelihood").pvalue)


@pytest.fixture(scope="module")
def tiny_off(tiny_engine) -> Counter:
    return tokens_1_to_3(tiny_engine, "off", first_seed=SAMPLES)  # apart from the drafted arm's


def test_sampling_with_the_draft_model_keeps_the_distribution(tiny_engine, tiny_off):
    drafted = tokens_1_to_3(tiny_engine, DraftConfig(mode="model", max_draft=2), first_seed=0)
    assert g_test(tiny_off, drafted) > ALPHA


def test_the_test_rejects_a_wrong_sampler(tiny_engine, tiny_off, monkeypatch):
    """Sampling from p instead of the residual after a rejection fails the same test."""
    monkeypatch.setattr(sampler, "residual", lambda p, q: p)
    drafted = tokens_1_to_3(tiny_engine, DraftConfig(mode="model", max_draft=2), first_seed=0)
    assert g_test(tiny_off, drafted) < ALPHA


# -- refusals --------------------------------------------------------------------------------


def test_a_draft_whose_tokenizer_outgrows_its_vocabulary_is_refused(
    bf16_engine, tiny_pair, tmp_path
):
    """The tiny model reads the default tokenizer with 512 embeddings: not a model of its
    own to draft across tokenizers with, nor one with the target's ids."""
    long = save_first_layers(tiny_pair[0], tmp_path / "long", 2, max_position_embeddings=8192)
    with pytest.raises(ValueError, match="tokenizer has 49152 ids and its vocabulary 512"):
        with_draft(bf16_engine, load_draft(long))


def test_a_draft_with_a_shorter_context_is_refused_at_load(tiny_pair, tmp_path):
    target, _ = tiny_pair
    short = save_first_layers(target, tmp_path / "short", 2, max_position_embeddings=128)
    with pytest.raises(ValueError, match="context is 128 tokens, shorter than the target's 256"):
        Engine.from_pretrained(str(target), draft_model=str(short))


def test_a_draft_with_the_same_ids_and_another_chat_template_is_refused(tiny_pair, tmp_path):
    target, _ = tiny_pair
    other = save_first_layers(target, tmp_path / "template", 2)
    template = other / "chat_template.jinja"
    assert template.is_file()
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="chat template differs from the target's"):
        Engine.from_pretrained(str(target), draft_model=str(other))


def test_mode_model_needs_a_draft_model(bf16_engine):
    with pytest.raises(ValueError, match="draft.mode 'model'.*--draft-model"):
        bf16_engine.generate(["hi"], SamplingParams(max_tokens=2), "model")
    with pytest.raises(ValueError, match="no draft model"):
        Engine(
            bf16_engine.model,
            bf16_engine.tokenizer,
            bf16_engine.model_path,
            kv_cache_bytes=1 << 20,
            draft=DraftConfig(mode="model"),
        )
    assert_no_blocks_held(bf16_engine)


def test_generate_from_the_command_line(first_layers_path):
    """`selfspec generate --draft-model PATH` drafts with it by default."""
    args = ["generate", "--model", "default", "--dtype", "bfloat16", "--json"]
    args += ["--draft-model", str(first_layers_path), "--prompt", "What is 2 + 2?", "--chat"]
    r = subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["drafted_tokens"] > 0
