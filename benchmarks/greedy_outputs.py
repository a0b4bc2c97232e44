"""Greedy token ids of every drafting mode on the benchmark prompts, as JSON.

Run it in two checkouts and compare the files to show that a change left the engine's
output alone, token for token. It uses only the engine's public API, so it runs against
older checkouts too (`PYTHONPATH=<checkout> python benchmarks/greedy_outputs.py`).

    python -m benchmarks.greedy_outputs --out /tmp/after.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from services.engine import DraftConfig, Engine, SamplingParams

PROMPTS = Path(__file__).with_name("prompts.jsonl")


def drafts(num_layers: int) -> dict[str, DraftConfig | str]:
    return {
        "off": "off",
        "skip": DraftConfig(mode="skip", skip_attn=(8, 26), max_draft=4),
        "early_exit": DraftConfig(mode="early_exit", exit_layer=3 * num_layers // 4),
        "ngram": "ngram",
        "auto": "auto",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--per-kind", type=int, default=2, help="first N prompts of each kind")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    # Dense bfloat16, as every checkout loads it (older ones keep no GGUF blocks).
    engine = Engine.from_pretrained(args.model, dtype="bfloat16")
    prompts, per_kind = [], {}
    for line in filter(str.strip, PROMPTS.read_text().splitlines()):
        row = json.loads(line)
        per_kind[row["kind"]] = per_kind.get(row["kind"], 0) + 1
        if per_kind[row["kind"]] <= args.per_kind:
            prompts.append(row["messages"][0]["content"])
    # EOS stays live: outputs end where the model ends them, as a user's would.
    params = SamplingParams(max_tokens=args.max_tokens)
    outputs: dict[str, list[list[int]]] = {}
    for name, draft in drafts(engine.model.num_layers).items():
        t0 = time.perf_counter()
        alone = [engine.generate([q], params, draft, chat=True)[0].token_ids for q in prompts]
        together = [c.token_ids for c in engine.generate(prompts, params, draft, chat=True)]
        outputs[f"{name}/alone"], outputs[f"{name}/together"] = alone, together
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    args.out.write_text(json.dumps({"max_tokens": args.max_tokens, "outputs": outputs}))


if __name__ == "__main__":
    main()
