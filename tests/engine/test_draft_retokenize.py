"""A draft model with another tokenizer (universal assisted generation): greedy output
equals drafting `off` token for token, sampled output is distributed as the target's,
and a tokenizer that cannot write the target's text back is refused at load.

Three kinds of "another tokenizer", all built here with the `tokenizers` library:
- the default tokenizer with its ids shuffled, under the default model's first layers
  with their embedding rows shuffled alike: other ids for the same text, so drafts are
  real and many are accepted;
- a byte-level BPE trained on local text, under a tiny random model: other ids and
  other token boundaries;
- a word-level tokenizer, which loses what it does not know, to be refused.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from engine_helpers import EIGHT_CHATS, Case, run_together
from safetensors.torch import load_file, save_file
from test_draft_model import (
    ALPHA,
    DRAFT_LAYERS,
    assert_pools_free,
    eight_together_are_each_alone,
    g_test,
    greedy_alone_is_offs,
    load_draft,
    with_draft,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from services.engine import DraftConfig, Engine, SamplingParams, checkpoint, sampler
from services.engine.drafting.retokenize import Retokenizer
from services.engine.first_layers import save_first_layers

MODEL = DraftConfig(mode="model", max_draft=4)
ROOT = Path(__file__).resolve().parents[2]


def shuffle_ids(folder: Path) -> None:
    """Give every ordinary token of `folder`'s tokenizer another id (the order reversed)
    and move the embedding rows (tied with the LM head) with them: the same text, read
    alike, in other ids. Special tokens keep theirs."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first = max(t["id"] for t in spec["added_tokens"]) + 1
    last = max(vocab.values())
    spec["model"]["vocab"] = {t: (i if i < first else first + last - i) for t, i in vocab.items()}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    order = torch.arange(last + 1)
    order[first:] = order[first:].flip(0)  # an involution: its own inverse
    tensors = load_file(folder / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            rows = tensors[name]
            tensors[name] = torch.cat([rows[: last + 1][order], rows[last + 1 :]])
    save_file(tensors, str(folder / "model.safetensors"))


def local_text() -> str:
    """Text on every machine, for training a tokenizer offline: the benchmark's prompts,
    which change seldom (the README would retrain the tokenizer with every edit)."""
    return (ROOT / "benchmarks" / "prompts.jsonl").read_text()


def save_bpe_model(folder: Path, vocab: int = 400, **config) -> Path:
    """A tiny random Llama with a byte-level BPE of its own, trained on local text."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    bpe.train_from_iterator([local_text()], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
    )
    settings.update(config)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory) -> tuple:
    """The default model's first layers, reading and writing shuffled ids."""
    out = tmp_path_factory.mktemp("shuffled") / "first-layers"
    save_first_layers(checkpoint.resolve("default"), out, DRAFT_LAYERS)
    shuffle_ids(out)
    return load_draft(out)


@pytest.fixture(scope="module")
def shuffled_pair(bf16_engine, shuffled) -> Engine:
    return with_draft(bf16_engine, shuffled, kv_cache_bytes=96 << 20)


@pytest.fixture(scope="module")
def bpe_pair(bf16_engine, tmp_path_factory) -> Engine:
    draft = load_draft(save_bpe_model(tmp_path_factory.mktemp("bpe")))
    return with_draft(bf16_engine, draft, kv_cache_bytes=96 << 20)


def test_the_shuffled_tokenizer_reads_the_same_text_in_other_ids(shuffled_pair, shuffled):
    retok = shuffled_pair.runner.draft_model.retokenizer
    assert isinstance(retok, Retokenizer)
    prompt = shuffled_pair.encode(EIGHT_CHATS[0], chat=True)
    draft_ids = shuffled[1].encode(shuffled_pair.tokenizer.decode(prompt), add_special_tokens=False)
    assert draft_ids != prompt
    seq = run_together(shuffled_pair, [Case(EIGHT_CHATS[0], SamplingParams(max_tokens=1), "off")])
    assert retok.context(seq[0]) == shuffled[1].encode(
        shuffled_pair.tokenizer.decode(seq[0].tokens), add_special_tokens=False
    )


@pytest.mark.parametrize("pair", ["shuffled_pair", "bpe_pair"])
def test_greedy_batch_1_equals_off(pair, request):
    outs = greedy_alone_is_offs(request.getfixturevalue(pair), MODEL)
    if pair == "shuffled_pair":  # the same model under other ids: its drafts are real
        assert sum(out.stats["accepted_tokens"] for out in outs) > 0


@pytest.mark.parametrize("pair", ["shuffled_pair", "bpe_pair"])
def test_greedy_batch_8_equals_each_alone(pair, request):
    seqs = eight_together_are_each_alone(request.getfixturevalue(pair), MODEL)
    assert sum(s.stats.drafted for s in seqs) > 0


# -- sampling: a tiny target with a BPE of its own, drafting for itself in shuffled ids ------

SAMPLED = 0.35  # the temperature: low enough that a few outcomes gather most draws
# Requests per arm: drafts across tokenizers are accepted less than drafts with the
# target's ids (a random model writes its text in ids its tokenizer would not choose, which
# the draft reads back otherwise), so the wrong sampler below needs more to be rejected.
DRAWS = 8000


@pytest.fixture(scope="module")
def tiny_shuffled_engine(tmp_path_factory):
    """The target's own layers under shuffled ids: where it reads the text back in the
    tokens the target wrote, its greedy draft is the mode of the distribution sampled from."""
    root = tmp_path_factory.mktemp("tiny-bpe")
    target = save_bpe_model(root / "target", num_hidden_layers=2)
    draft = save_first_layers(target, root / "draft", 2)
    shuffle_ids(draft)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # passes this small do not share well
    yield Engine.from_pretrained(
        str(target), draft_model=str(draft), kv_cache_bytes=32 << 20, max_waiting=DRAWS
    )
    torch.set_num_threads(threads)


def tokens_1_to_3(eng: Engine, draft, first_seed: int) -> tuple[Counter, int]:
    """How often each (token 1, token 2, token 3) came over DRAWS seeded requests, and
    how many drafted tokens were accepted."""
    prompt = eng.encode("the engine drafts and verifies", chat=False)
    params = [
        SamplingParams(max_tokens=4, temperature=SAMPLED, seed=s, ignore_eos=True)
        for s in range(first_seed, first_seed + DRAWS)
    ]
    seqs = run_together(eng, [Case(prompt, p, draft, chat=False) for p in params])
    assert_pools_free(eng)
    return Counter(tuple(s.output[1:4]) for s in seqs), sum(s.stats.accepted for s in seqs)


@pytest.fixture(scope="module")
def tiny_off(tiny_shuffled_engine):
    return tokens_1_to_3(tiny_shuffled_engine, "off", first_seed=DRAWS)[0]


def test_sampling_across_tokenizers_keeps_the_distribution(tiny_shuffled_engine, tiny_off):
    drafted, accepted = tokens_1_to_3(tiny_shuffled_engine, MODEL, first_seed=0)
    assert accepted > DRAWS // 20  # drafts were proposed and kept: the test tests them
    assert g_test(tiny_off, drafted) > ALPHA


def test_the_test_rejects_a_wrong_sampler(tiny_shuffled_engine, tiny_off, monkeypatch):
    """Sampling from p instead of the residual after a rejection fails the same test."""
    monkeypatch.setattr(sampler, "residual", lambda p, q: p)
    drafted, _ = tokens_1_to_3(tiny_shuffled_engine, MODEL, first_seed=0)
    assert g_test(tiny_off, drafted) < ALPHA


# -- refusals --------------------------------------------------------------------------------


def test_a_tokenizer_that_loses_text_is_refused(bf16_engine, tmp_path):
    folder = save_bpe_model(tmp_path / "words")
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(folder)
    with pytest.raises(ValueError, match="cannot write the target's text back unchanged"):
        with_draft(bf16_engine, load_draft(folder))
