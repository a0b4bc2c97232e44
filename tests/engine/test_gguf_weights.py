"""A GGUF's matrices as stored (`--weights gguf`): the tensors are the checkpoint's own,
the engine computes the model `transformers` computes from the same file, and whatever
can't run that way is refused with the reason."""

from __future__ import annotations

import pytest
import torch

from selfspec_kernels import cpu_quant
from services.engine import Engine, SamplingParams, checkpoint
from services.engine.gguf_weights import hf_name, read, unpermute
from services.engine.model import interleave_halves

pytestmark = pytest.mark.skipif(
    not cpu_quant.available(), reason=f"CPU kernels unavailable: {cpu_quant.unavailable_reason()}"
)


@pytest.fixture(scope="module")
def gguf_engine() -> Engine:
    return Engine.from_pretrained("default", weights="gguf")


def test_names_map_to_the_checkpoints():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_name("rope_freqs.weight") is None


def test_unpermute_undoes_llama_cpps_permutation():
    w = torch.arange(4 * 8 * 3).view(4 * 8, 3)
    assert torch.equal(unpermute(interleave_halves(w, 4), 4), w)


def test_the_tensors_are_those_transformers_reads_from_the_file():
    """Every tensor, dequantized, equals the converted checkpoint's: names, q/k row order
    and block formats all read right. The matrices stay in their block formats."""
    path = checkpoint.resolve("default")
    ours = read(checkpoint.default_model_file(), checkpoint.load_config(path))
    theirs = checkpoint.load_tensors(path)
    # Tied: each stores the shared matrix once, under its own name.
    tied = {"lm_head.weight", "model.embed_tokens.weight"}
    assert set(ours) ^ set(theirs) <= tied
    formats = {v.format.name for v in ours.values() if isinstance(v, cpu_quant.Quantized)}
    assert formats == {"q4_1", "q8_0"}
    for name, value in ours.items():
        ref = theirs[name] if name in theirs else theirs[(tied - {name}).pop()]
        # The first two heads' rows (where q/k row order shows) and the last row.
        index = torch.tensor([*range(min(128, len(ref))), len(ref) - 1])
        dense = value.rows(index) if isinstance(value, cpu_quant.Quantized) else value[index]
        ref = ref[index]
        scale = ref.abs().max().item()
        torch.testing.assert_close(dense, ref, rtol=0, atol=1e-6 * scale, msg=name)


def test_reports_gguf_weights_and_computes_what_transformers_does(gguf_engine):
    """Greedy decoding on the GGUF's blocks equals `transformers` on the same file
    dequantized to float32, token for token, ending at its end-of-sequence token."""
    from transformers import AutoModelForCausalLM

    assert gguf_engine.model.backend.describe()["weights"] == "gguf"
    assert all(x.quantized for layer in gguf_engine.model.layers for x in layer.linears)
    hf = AutoModelForCausalLM.from_pretrained(gguf_engine.model_path, dtype=torch.float32)
    for prompt in ["What is the capital of France?", "Name a colour."]:
        ids = gguf_engine.encode(prompt, chat=True)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        [out] = gguf_engine.generate([ids], SamplingParams(max_tokens=24), "off")
        assert out.token_ids == ref[0, len(ids) :].tolist(), prompt


def test_auto_keeps_a_ggufs_blocks_where_they_run(monkeypatch):
    """`auto` is `gguf` for a GGUF on the `cpu` backend, and dense elsewhere; a dtype or a
    dense choice asks for dense weights, and contradicting choices are refused."""
    monkeypatch.delenv("SELFSPEC_BACKEND", raising=False)
    folder = checkpoint.resolve("default")

    def kept(model="default", weights="auto", dtype=None, device="cpu", backend=None):
        return checkpoint.weights_for(model, weights, dtype, device, backend)

    assert kept() == kept(backend="cpu") == kept(str(checkpoint.default_model_file())) == "gguf"
    assert kept(folder) == kept(backend="onednn") == kept(device="cuda") == "bfloat16"
    assert kept(dtype="float32") == kept(weights="fp32") == "float32"
    assert kept(weights="bf16", dtype="bfloat16") == "bfloat16"
    monkeypatch.setenv("SELFSPEC_BACKEND", "torch")
    assert kept() == "bfloat16"
    with pytest.raises(ValueError, match="--weights fp16 and --dtype float32 disagree"):
        kept(weights="fp16", dtype="float32")
    with pytest.raises(ValueError, match="drop --dtype"):
        kept(weights="gguf", dtype="bfloat16")


def test_the_default_model_loads_its_gguf_blocks(monkeypatch):
    monkeypatch.delenv("SELFSPEC_BACKEND", raising=False)
    assert Engine.from_pretrained("default", kv_cache_bytes=1 << 20).model.backend.quantized


def test_a_checkpoint_folder_is_refused(tmp_path):
    with pytest.raises(checkpoint.ModelLoadError, match="needs a .gguf file"):
        Engine.from_pretrained(str(checkpoint.resolve("default")), weights="gguf")


def test_another_backend_or_an_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="runs on the cpu backend"):
        Engine.from_pretrained("default", weights="gguf", backend="onednn")
    with pytest.raises(ValueError, match="weights must be one of auto, gguf, bf16"):
        Engine.from_pretrained("default", weights="q4")
