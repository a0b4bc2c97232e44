"""One module picks the compute path; each assertion about the pick states the machine
condition it rests on, so it holds on every machine."""

from __future__ import annotations

import pytest
import torch

from selfspec_kernels import backend
from selfspec_kernels.cpu_build import CPU


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backend.ENV, raising=False)


def test_bfloat16_picks_our_kernels_where_they_build() -> None:
    chosen = backend.choose(torch.bfloat16, "cpu")
    if CPU.available():  # any x86 CPU with AVX2, FMA and a compiler
        assert chosen.name == "cpu"
        assert (chosen.compute, chosen.linear, chosen.attention) == (torch.float32, "cpu", "cpu")
    else:
        assert chosen.name == "onednn"


def test_float32_picks_onednn() -> None:
    chosen = backend.choose(torch.float32, "cpu")
    assert (chosen.name, chosen.compute, chosen.linear) == ("onednn", torch.float32, "onednn")
    assert chosen.attention == ("cpu" if CPU.available() else "torch")


def test_onednn_computes_bfloat16_only_where_the_cpu_has_it() -> None:
    chosen = backend.choose(torch.bfloat16, "cpu", "onednn")
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert chosen.compute == (torch.bfloat16 if native else torch.float32)
    assert chosen.describe()["native_bf16"] == str(native).lower()


def test_torch_computes_in_the_dtype_asked_for_anywhere() -> None:
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        assert backend.choose(dtype, "cpu", "torch").compute == dtype
    assert "torch" in backend.runnable(torch.bfloat16)


def test_environment_overrides_the_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.ENV, "torch")
    assert backend.choose(torch.bfloat16, "cpu").name == "torch"
    assert backend.choose(torch.bfloat16, "cpu", "onednn").name == "onednn"  # argument wins


@pytest.mark.parametrize(
    "name, dtype, device, message",
    [
        ("fast", torch.float32, "cpu", "must be one of cpu, onednn, torch, triton"),
        ("cpu", torch.float32, "cpu", "multiply bfloat16 weights"),
        ("cpu", torch.bfloat16, "cuda", "on the CPU only"),
        ("onednn", torch.float16, "cpu", "take float32 or bfloat16"),
    ],
)
def test_what_cannot_run_is_refused_with_the_reason(name, dtype, device, message) -> None:
    with pytest.raises(ValueError, match=message):
        backend.choose(dtype, device, name)


def test_triton_on_a_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend.choose(torch.float32, "cpu", "triton")


def test_describe_names_every_part() -> None:
    d = backend.choose(torch.float32, "cpu", "torch").describe()
    assert {k: d[k] for k in ("backend", "weights", "compute", "linear", "attention")} == {
        "backend": "torch",
        "weights": "float32",
        "compute": "float32",
        "linear": "torch",
        "attention": "torch",
    }
