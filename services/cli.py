"""The `selfspec` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="`default`, a checkpoint folder or a .gguf")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float32", "float16"],
        help="dense weights in this dtype (the same as --weights bf16, fp32 or fp16)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--backend",
        default=None,
        choices=["cpu", "onednn", "torch", "triton"],
        help="compute path (default: $SELFSPEC_BACKEND, else the fastest this machine runs)",
    )
    p.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "gguf", "bf16", "fp16", "fp32"],
        help="gguf: a GGUF's quantized matrices as stored (cpu backend); bf16, fp16, fp32: "
        "dense; auto (default): gguf for a GGUF on the cpu backend, else --dtype or bf16",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        help="a smaller model, with the target's tokenizer or another (a checkpoint folder "
        "or a .gguf), loaded like --model, to draft with (--draft model, then the default)",
    )


def _draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft",
        default=None,
        help="off | skip | early_exit | ngram | model | auto (default: profile)",
    )
    p.add_argument("--max-draft", type=int, default=None, help="most tokens drafted per step")
    p.add_argument("--exit-layer", type=int, default=None, help="layer count for early_exit")


def _load(args):
    from services.engine import Engine

    t0 = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    engine = Engine.from_pretrained(
        args.model,
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
        weights=args.weights,
        draft_model=args.draft_model,
    )
    elapsed = time.perf_counter() - t0
    print(f"loaded in {elapsed:.1f} s; backend {engine.model.backend}", file=sys.stderr, flush=True)
    return engine


def _draft(args, engine):
    overrides = {}
    if args.draft:
        overrides["mode"] = args.draft
    if args.max_draft is not None:
        overrides["max_draft"] = args.max_draft
    if args.exit_layer is not None:
        overrides["exit_layer"] = args.exit_layer
    return engine.draft_config(overrides)


def cmd_prepare(args) -> int:
    """Convert and cache a model, and build the CPU kernels, so that later loads are fast."""
    from selfspec_kernels.cpu_build import CPU
    from services.engine import checkpoint

    path = checkpoint.resolve(args.model)
    checkpoint.load_config(path)
    print(f"model ready: {path}", file=sys.stderr)
    print("building the CPU kernels (the first time takes a minute or two)", file=sys.stderr)
    state = "ready" if CPU.available() else f"unavailable, {CPU.unavailable_reason()}"
    print(f"CPU kernels {state}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from services.common.params import SamplingParams

    engine = _load(args)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    out = engine.generate([args.prompt], params, _draft(args, engine), chat=args.chat)[0]
    elapsed = time.perf_counter() - t0
    if args.json:
        print(
            json.dumps(
                {
                    "text": out.text,
                    "token_ids": out.token_ids,
                    "finish_reason": out.finish_reason,
                    "stats": out.stats,
                    "backend": engine.model.backend.describe(),
                }
            )
        )
    else:
        print(out.text)
        s = out.stats
        print(
            f"[{len(out.token_ids)} tokens in {elapsed:.2f} s, "
            f"{len(out.token_ids) / elapsed:.1f} tok/s; finish: {out.finish_reason}; "
            f"drafted {s['drafted_tokens']}, accepted {s['accepted_tokens']}]",
            file=sys.stderr,
        )
    return 0


def cmd_tune(args) -> int:
    from services.engine.drafting.tune import tune

    engine = _load(args)
    path = tune(engine, out=args.out, budget_s=args.budget, max_tokens=args.max_tokens)
    print(f"profile written to {path}", file=sys.stderr)
    return 0


def cmd_draft_from_layers(args) -> int:
    """Save a model's first layers as a draft model for it (`--draft-model`)."""
    from services.engine import checkpoint
    from services.engine.first_layers import save_first_layers

    source = checkpoint.resolve(args.model)
    total = checkpoint.load_config(source).num_hidden_layers
    out = save_first_layers(source, Path(args.out), args.layers)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"draft model written to {out} ({size:.0f} MiB)", file=sys.stderr)
    print(
        f"it holds layers 0..{args.layers - 1} of {args.model}'s {total}, with its "
        "embeddings, final norm, LM head and tokenizer: "
        + ", ".join(sorted(f.name for f in out.iterdir())),
        file=sys.stderr,
    )
    return 0


def cmd_train_draft(args) -> int:
    """Train the model's exit adapter (`services.engine.exit_training`) and save it."""
    from services.engine import checkpoint, exit_adapter, exit_training

    engine = _load(args)
    key = checkpoint.model_key(engine.model_path)
    layer = args.exit_layer or engine.draft_config("early_exit").exit_layer
    print(f"train-draft: an exit after layer {layer} of {engine.model.num_layers}", file=sys.stderr)
    adapter = exit_training.train(
        engine,
        key,
        layer,
        width=args.width,
        steps=args.steps,
        seed=args.seed,
        answer_tokens=args.answer_tokens,
        file_tokens=args.text_tokens,
    )
    out = Path(args.out) if args.out else engine.model_path / exit_adapter.FILE
    adapter.save(out)
    facts = adapter.facts
    print(json.dumps(facts))
    answers = (
        f"; on its held-out answers {facts['agreement_answers']:.1%}, untrained "
        f"{facts['agreement_answers_untrained']:.1%}"
        if "agreement_answers" in facts
        else ""
    )
    print(
        f"exit adapter written to {out}: on held-out text the exit agrees with the full "
        f"model {facts['agreement']:.1%} of the time, untrained {facts['agreement_untrained']:.1%}"
        f"{answers} (data {facts['data_s']:.0f} s, training {facts['train_s']:.0f} s)",
        file=sys.stderr,
    )
    return 0


# Commands whose options their own module parses: `selfspec NAME ...` calls `main(argv)`.
DELEGATED = {
    "serve": ("services.serve.local", "run the whole fleet on this machine"),
    "gateway": ("services.gateway.main", "run the gRPC gateway"),
    "client": ("services.gateway.client", "send one request to a gateway"),
    "controller": ("services.controller.main", "run the fleet controller"),
}
BENCHMARKS = {
    "engine": ("benchmarks.engine", "systems side by side on prompts"),
    "peers": ("benchmarks.peers", "selfspec against llama.cpp on one GGUF, alternating"),
    "step": ("benchmarks.step_profile", "where a decode step goes, at several model sizes"),
    "sweep": ("benchmarks.sweep", "auto against off across batch sizes"),
    "kernels": ("benchmarks.kernels", "GPU kernels against the weight-read bound"),
    "serve": ("benchmarks.serve", "load through the gateway against the engine direct"),
    "controller": ("benchmarks.controller", "the fleet controller adapting drafting over time"),
    "frontier": ("benchmarks.draft_frontier", "how much layer drafts can pay: agreement and cost"),
}


def _delegate(module: str, argv: list[str]) -> int:
    return importlib.import_module(module).main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfspec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert and cache a model")
    p.add_argument("--model", default="default")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="generate from one prompt")
    _engine_args(p)
    _draft_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tune", help="search a skip set for a model and save its profile")
    _engine_args(p)
    p.add_argument("--out", default=None, help="profile path (default: next to the model)")
    p.add_argument("--budget", type=float, default=600.0, help="seconds to search")
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "draft-from-layers", help="save a model's first layers as a draft model for it"
    )
    p.add_argument("--model", default="default", help="`default`, a checkpoint folder or a .gguf")
    p.add_argument("--layers", type=int, required=True, help="how many first layers to keep")
    p.add_argument("--out", required=True, help="a new folder for the draft model's checkpoint")
    p.set_defaults(func=cmd_draft_from_layers)

    p = sub.add_parser(
        "train-draft", help="train the model's early-exit adapter on local text (minutes)"
    )
    _engine_args(p)
    p.add_argument("--exit-layer", type=int, default=None, help="default: the model's exit")
    p.add_argument("--steps", type=int, default=400, help="training steps")
    p.add_argument("--width", type=int, default=None, help="adapter width (default 2x hidden)")
    p.add_argument("--seed", type=int, default=0, help="the same seed repeats a run exactly")
    p.add_argument(
        "--answer-tokens", type=int, default=160, help="tokens of each answer trained on"
    )
    p.add_argument(
        "--text-tokens",
        type=int,
        default=24_000,
        help="tokens of this project's documentation and source files trained on",
    )
    p.add_argument("--out", default=None, help="default: beside the model, where it is loaded")
    p.set_defaults(func=cmd_train_draft)

    for name, (_, summary) in DELEGATED.items():
        sub.add_parser(name, help=summary, add_help=False)
    p = sub.add_parser("bench", help="run a benchmark; options after the name go to it")
    p.add_argument(
        "suite",
        choices=list(BENCHMARKS),
        help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "bench":
        return _delegate(BENCHMARKS[args.suite][0], rest)
    if args.command in DELEGATED:
        return _delegate(DELEGATED[args.command][0], rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: one line, no traceback
        print(f"selfspec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
