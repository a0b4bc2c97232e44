"""`selfspec draft-from-layers` writes a draft model that loads with the layers asked for,
and `selfspec bench engine --draft-model` runs system `model` beside the others with the
same fields. Smallest settings: the default model's first 2 layers, one short prompt.

    pytest tests/engine/test_draft_from_layers.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from benchmarks import engine as bench
from services import cli
from services.engine import Engine, checkpoint

LAYERS = 2


@pytest.fixture(scope="module")
def draft_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("draft") / "first-2"
    args = ["draft-from-layers", "--model", "default", "--layers", str(LAYERS), "--out", str(out)]
    assert cli.main(args) == 0
    return out


def test_draft_from_layers_writes_a_loadable_draft(draft_path, capsys):
    model, tokenizer, _ = checkpoint.load(draft_path, "bfloat16", "cpu", None)
    assert model.num_layers == LAYERS
    source = checkpoint.resolve("default")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()
    assert checkpoint.load_config(source).num_hidden_layers > LAYERS

    # A second write to the same folder, or more layers than the model has, is one line.
    assert cli.main(["draft-from-layers", "--layers", "2", "--out", str(draft_path)]) == 2
    assert "exists" in capsys.readouterr().err
    out = draft_path.parent / "too-many"
    assert cli.main(["draft-from-layers", "--layers", "999", "--out", str(out)]) == 2
    assert "layers must be between 1 and" in capsys.readouterr().err
    assert not out.exists()


def test_bench_engine_runs_the_draft_model_beside_the_others(draft_path, tmp_path, monkeypatch):
    # The bench's fixed costs, not under test: a 1 GiB bandwidth buffer and KV pool.
    monkeypatch.setattr(bench, "BANDWIDTH_BYTES", 16 << 20)
    load = Engine.from_pretrained
    small = staticmethod(lambda model, **kw: load(model, kv_cache_bytes=64 << 20, **kw))
    monkeypatch.setattr(Engine, "from_pretrained", small)
    prompts = tmp_path / "prompts.jsonl"
    row = {"id": "q-1", "kind": "qa", "messages": [{"role": "user", "content": "What is 2+2?"}]}
    prompts.write_text(json.dumps(row) + "\n")
    argv = ["bench", "engine", "--draft-model", str(draft_path), "--prompts", str(prompts)]
    argv += ["--systems", "off,skip,model", "--batch-sizes", "1", "--max-tokens", "4"]
    assert cli.main([*argv, "--peers", "off", "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "engine.json").read_text())
    assert (tmp_path / "engine.png").stat().st_size > 0
    assert report["config"]["draft_model"] == str(draft_path)
    assert report["config"]["drafts"]["model"]["mode"] == "model"
    assert report["config"]["drafts"]["skip"]["skip_attn"]  # the profile's, not model's
    row = report["results"]["1"]
    assert list(row) == ["off", "skip", "model"]
    fields = ("acceptance_rate", "tokens_per_verify", "draft_step_cost", "speedup_vs_off")
    assert all(row["model"][f] is not None for f in fields), row["model"]
    assert set(fields) <= set(row["skip"])  # the same fields as the self-drafting modes
    assert row["model"]["identical_to_off"]


def test_system_model_needs_a_draft_model(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--systems", "off,model"])
    assert exc.value.code == 2
    assert "pass --draft-model" in capsys.readouterr().err
    assert "model" not in bench.parse_args([]).systems
    assert "model" in bench.parse_args(["--draft-model", "x"]).systems
