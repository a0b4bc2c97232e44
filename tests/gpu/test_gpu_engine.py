"""The engine end to end on a GPU: greedy output of every drafting mode equals drafting
off, token for token, at batch 1 and 8, and each sequence equals itself alone (the
default model, random Llama-shaped models small and 8B, a small Qwen3-shaped one); seeded
sampling repeats itself; a model step replayed as a CUDA graph equals it run eagerly.

On the backend CUDA picks by default (`triton`: Triton attention and batch-invariant
products) and, where cheap, on `torch` (cuBLAS products and PyTorch attention, one row
at a time). Every test skips without a CUDA GPU; `make gpu-check` runs them.
"""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch
from gpu_engines import (
    GPU_BYTES_8B,
    default_model_available,
    drafts,
    needs_cuda,
    prompts,
    random_engine,
)

from benchmarks.cuda_graphs import StepGraphs
from services.engine import Engine, SamplingParams
from services.engine.kv_pool import KVPool

pytestmark = needs_cuda

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "Summarise: the meeting moved the launch to May because the supplier was late. "
    "The team will send weekly updates until the launch.",
    "List three uses of copper.",
    "Explain recursion to a ten year old.",
    "Translate 'good morning' into Spanish, French and German.",
    "hi",
    "Write a haiku about the sea, then explain its imagery line by line.",
]
BACKENDS = [pytest.param(None, id="default"), pytest.param("torch", id="torch")]


def _free_memory() -> None:
    """Give back what engines of earlier fixtures held (PyTorch caches freed blocks)."""
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module", params=BACKENDS)
def small(request):
    yield random_engine("small", request.param)
    _free_memory()


@pytest.fixture(scope="module", params=BACKENDS)
def qwen3(request):
    yield random_engine("small-qwen3", request.param)
    _free_memory()


@pytest.fixture(scope="module", params=BACKENDS)
def default(request):
    reason = default_model_available()
    if reason:
        pytest.skip(f"the default model is not installed here: {reason}")
    yield Engine.from_pretrained("default", dtype="bfloat16", device="cuda", backend=request.param)
    _free_memory()


@pytest.fixture(scope="module")
def llama8b():
    _free_memory()
    free, _ = torch.cuda.mem_get_info()
    if free < GPU_BYTES_8B:
        pytest.skip(f"an 8B model needs {GPU_BYTES_8B >> 30} GiB free; {free >> 30} GiB here")
    yield random_engine("llama3-8b")
    _free_memory()


def assert_drafting_exact(engine: Engine, batch: list, max_tokens: int, chat=False) -> None:
    """Each prompt alone with drafting off is the reference: all of them together, off and
    with every drafting mode, and the first alone with every mode, give the same tokens."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def run(ps, draft) -> tuple[list[list[int]], int]:
        outs = engine.generate(ps, params, draft, chat=chat)
        return [o.token_ids for o in outs], sum(o.stats["drafted_tokens"] for o in outs)

    alone = [run([p], "off")[0][0] for p in batch]
    assert run(batch, "off")[0] == alone, "drafting off: batch of 8 differs from each alone"
    for cfg in drafts(engine.model.num_layers):
        for size in (1, len(batch)):
            got, drafted = run(batch[:size], cfg)
            assert got == alone[:size], f"{cfg.mode} at batch {size}"
            # Layer drafts always draft; n-gram lookup may find nothing to copy in a random
            # model's output, and `auto` may choose not to draft.
            assert drafted or cfg.mode in ("ngram", "auto"), f"{cfg.mode} drafted nothing"
    assert engine.pool.num_free == engine.pool.num_blocks


def test_cuda_defaults_to_triton() -> None:
    from selfspec_kernels import backend

    assert backend.choose(torch.bfloat16, "cuda").name == "triton"


def test_small_random_model_drafting_is_exact(small: Engine) -> None:
    assert_drafting_exact(small, prompts(small.model.vocab_size, 8), max_tokens=24)


def test_small_qwen3_shaped_drafting_is_exact(qwen3: Engine) -> None:
    """Qwen3's per-head q and k norms are reductions too."""
    assert_drafting_exact(qwen3, prompts(qwen3.model.vocab_size, 8, seed=3), max_tokens=24)


def test_default_model_drafting_is_exact(default: Engine) -> None:
    assert_drafting_exact(default, CHAT_PROMPTS, max_tokens=16, chat=True)


def test_llama3_8b_shaped_drafting_is_exact(llama8b: Engine) -> None:
    assert_drafting_exact(llama8b, prompts(llama8b.model.vocab_size, 8, seed=1), max_tokens=16)


def test_seeded_sampling_repeats(small: Engine) -> None:
    """The same seed gives the same tokens: twice, and alone or in a batch (each sequence
    samples with its own generator, on the GPU, from logits that no other row changes)."""
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
    batch = prompts(small.model.vocab_size, 4, seed=2)
    for mode in ("off", "ngram"):
        first = [o.token_ids for o in small.generate(batch, params, mode)]
        assert [o.token_ids for o in small.generate(batch, params, mode)] == first, mode
        alone = [small.generate([p], params, mode)[0].token_ids for p in batch]
        assert alone == first, mode
    other = small.generate(batch[:1], replace(params, seed=8), "off")[0].token_ids
    assert other != first[0], "another seed should sample otherwise"


@pytest.mark.parametrize(("size", "tokens"), [(1, 1), (8, 1), (8, 5)])
def test_cuda_graph_replay_equals_eager(small: Engine, size: int, tokens: int) -> None:
    """A decode or verify step captured once and replayed on new token ids equals the same
    step run eagerly, bit for bit."""
    if small.model.backend.name != "triton":
        pytest.skip("PyTorch's one-query-at-a-time attention reads lengths back: no graph")
    model, block = small.model, 16
    pool = KVPool(num_layers=model.num_layers, kv_dim=model.kv_dim, num_blocks=8 * size,
                  block_size=block, dtype=model.kv_dtype, device="cuda")  # fmt: skip
    tables = [list(range(8 * b, 8 * b + 8)) for b in range(size)]
    batch = model.attention_batch(tables, [100] * size, [tokens] * size, block)

    def step(ids: torch.Tensor) -> torch.Tensor:
        return model.logits(model.run_layers(model.embed_tokens(ids), batch, pool.kv))

    graphs = StepGraphs(step)
    g = torch.Generator(device="cuda").manual_seed(size * 10 + tokens)
    with torch.inference_mode():
        for _ in range(2):  # the second replays the graph captured by the first
            ids = torch.randint(0, model.vocab_size, (size * tokens,), device="cuda", generator=g)
            want = step(ids).clone()
            assert torch.equal(graphs("step", ids), want)
    assert len(graphs) == 1
