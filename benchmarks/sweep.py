"""Load sweep: `auto` drafting against plain decoding (`off`) as the batch grows.

For every batch size b, both modes decode the same chat-formatted token ids greedily to
exactly `--max-tokens` new tokens. At b=1 every prompt runs alone; above that each
generate() call is a full batch of b prompts taken cyclically from the set, with enough
calls to cover every prompt once, and at least two. The calls of the two modes alternate
(off, auto, auto, off, ...), so a change in the machine's load, steady or drifting, hits
both alike. We report tokens per second (prefill included), the
ratio auto/off, auto's acceptance, which mode auto chose per step, and whether auto's
outputs equal off's token for token. A sampler thread counts the running sequences
during the timed calls, so that with a small `--kv-cache-mb` the sweep shows how many
sequences that KV budget serves at once.

    python -m benchmarks.sweep --limit 1 --max-tokens 8 --batch-sizes 1,4
    python -m benchmarks.sweep --kv-cache-mb 8 --max-tokens 128 --batch-sizes 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.engine import (
    DEFAULT_PROMPTS,
    Progress,
    Prompt,
    draft_dict,
    int_list,
    load_prompts,
    machine_info,
    make_progress,
)
from services.engine import Completion, Engine, SamplingParams

MODES = ("off", "auto")  # off first: auto is compared with it
WARMUP_PROMPT = "Say hello."
WARMUP_TOKENS = 4
RATIO_LINES = (0.97, 1.0)
NOTES = {
    "tok_s": "generated tokens / wall time of the generate() calls, prefill included",
    "ratio": "auto tok_s / off tok_s",
    "acceptance_rate": "accepted / drafted draft tokens over auto's outputs",
    "chosen": "share of auto's per-sequence decode steps by the mode it chose "
    "(telemetry deltas over the timed calls; 'off' = no draft that step)",
    "identical_to_off": "auto's token ids equal off's for every prompt (greedy decoding)",
    "calls": "b=1: one call per prompt; b>1: max(2, ceil(prompts / b)) full calls, prompts cycled",
    "running": "sequences decoding at once, sampled every 2 ms during the timed calls "
    "(mean and peak); bounded by the batch size and by the KV budget",
    "preemptions": "times a running sequence gave its KV blocks back for lack of room",
}
SAMPLE_EVERY_S = 0.002


@dataclass
class Call:
    kinds: frozenset[str]
    tokens: int
    seconds: float


@dataclass
class ModeRun:
    """One mode at one batch size: outputs, engine stats, timed calls, modes chosen."""

    mode: str
    outputs: list[list[int]] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    chosen: Counter[str] = field(default_factory=Counter)
    running: list[int] = field(default_factory=list)


class RunningSampler:
    """Samples how many sequences are decoding, from a thread, while a call runs."""

    def __init__(self, engine: Engine, into: list[int]) -> None:
        self.engine, self.into = engine, into
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(SAMPLE_EVERY_S):
            self.into.append(len(self.engine.scheduler.running))

    def __enter__(self) -> RunningSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


# -- arguments and inputs ---------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--backend", default=None, choices=("cpu", "onednn", "torch", "triton"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--batch-sizes", type=int_list, default=[1, 4, 16, 64])
    p.add_argument("--limit", type=int, default=None, help="first N prompts of each kind")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument(
        "--kv-cache-mb", type=int, default=1024, help="the KV pool's budget (default 1024)"
    )
    args = p.parse_args(argv)
    if args.max_tokens < 1 or (args.limit is not None and args.limit < 1):
        p.error("--max-tokens and --limit must be at least 1")
    if args.kv_cache_mb < 1:
        p.error("--kv-cache-mb must be at least 1")
    return args


def batches(prompts: list[Prompt], size: int) -> list[list[Prompt]]:
    """ceil(n / size) full calls of `size` prompts, cycling through the set, and at least
    two: one call per mode would leave the ratio to the load of that moment."""
    calls = max(2, math.ceil(len(prompts) / size))
    return [[prompts[(j * size + i) % len(prompts)] for i in range(size)] for j in range(calls)]


# -- running ------------------------------------------------------------------------


def mode_steps(engine: Engine) -> Counter[str]:
    """Cumulative decode steps per chosen mode, summed over batch buckets."""
    steps: Counter[str] = Counter()
    for key, row in engine.telemetry.as_dict().items():
        steps[key.split("/", 1)[0]] += row["steps"]
    return steps


def generate(engine: Engine, mode: str, ids: list[list[int]], max_tokens: int) -> list[Completion]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return engine.generate(ids, params, draft=mode)


def warm_up(engine: Engine, size: int) -> None:
    warmup = engine.encode(WARMUP_PROMPT, chat=True)
    for mode in MODES:
        generate(engine, mode, [warmup] * size, WARMUP_TOKENS)


def timed_call(engine: Engine, run: ModeRun, group: list[Prompt], max_tokens: int) -> Call:
    before = mode_steps(engine)
    t0 = time.perf_counter()
    with RunningSampler(engine, run.running):
        outs = generate(engine, run.mode, [p.ids for p in group], max_tokens)
    seconds = time.perf_counter() - t0
    run.chosen += mode_steps(engine) - before
    run.outputs += [o.token_ids for o in outs]
    run.stats += [o.stats for o in outs]
    call = Call(frozenset(p.kind for p in group), sum(len(o.token_ids) for o in outs), seconds)
    run.calls.append(call)
    return call


def sweep_batch(
    engine: Engine, prompts: list[Prompt], size: int, max_tokens: int, progress: Progress
) -> dict[str, ModeRun]:
    """Warm both modes up at this batch size, then alternate their timed calls, each
    mode first every other time."""
    warm_up(engine, size)
    runs = {mode: ModeRun(mode) for mode in MODES}
    groups = batches(prompts, size)
    for j, group in enumerate(groups, start=1):
        label = group[0].id if size == 1 else f"call {j}/{len(groups)}"
        for mode in MODES if j % 2 else MODES[::-1]:
            call = timed_call(engine, runs[mode], group, max_tokens)
            progress(f"{mode} b={size}: {call.tokens / call.seconds:.1f} tok/s [{label}]")
    return runs


# -- statistics ---------------------------------------------------------------------


def throughput(calls: list[Call]) -> dict:
    tokens = sum(c.tokens for c in calls)
    seconds = sum(c.seconds for c in calls)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds if seconds else None}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def load_summary(run: ModeRun) -> dict:
    samples = run.running or [0]
    return {
        "running_mean": sum(samples) / len(samples),
        "running_peak": max(samples),
        "preemptions": sum(s.get("preemptions", 0) for s in run.stats),
    }


def draft_summary(run: ModeRun) -> dict:
    drafted = sum(s["drafted_tokens"] for s in run.stats)
    accepted = sum(s["accepted_tokens"] for s in run.stats)
    total = sum(run.chosen.values())
    return {
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "chosen": {m: n / total for m, n in sorted(run.chosen.items())} if total else {},
        "chosen_steps": dict(sorted(run.chosen.items())),
    }


def by_kind(runs: dict[str, ModeRun], kinds: list[str]) -> dict[str, dict]:
    out = {}
    for kind in kinds:
        tok_s = {
            m: throughput([c for c in r.calls if c.kinds == {kind}])["tok_s"]
            for m, r in runs.items()
        }
        out[kind] = {**tok_s, "ratio": ratio(tok_s["auto"], tok_s["off"])}
    return out


def costs_dict(engine: Engine) -> dict[str, dict[str, float]]:
    """The auto policy's measured cost EMAs in milliseconds, with JSON-friendly keys."""
    costs = engine.costs
    tables = {"decode": costs.decode, "per_token": costs.per_token, "draft_pass": costs.draft_pass}
    return {
        name: {
            "/".join(map(str, k)) if isinstance(k, tuple) else str(k): v * 1e3
            for k, v in table.items()
        }
        for name, table in tables.items()
    }


def summarize(runs: dict[str, ModeRun], size: int, kinds: list[str], engine: Engine) -> dict:
    off, auto = runs["off"], runs["auto"]
    result = {
        "calls": len(off.calls),
        "off": {**throughput(off.calls), **load_summary(off)},
        "auto": {**throughput(auto.calls), **load_summary(auto), **draft_summary(auto)},
        "identical_to_off": auto.outputs == off.outputs,
        "differing_outputs": sum(a != o for a, o in zip(auto.outputs, off.outputs, strict=True)),
        "costs_ms": costs_dict(engine),
    }
    result["ratio"] = ratio(result["auto"]["tok_s"], result["off"]["tok_s"])
    if size == 1:
        result["by_kind"] = by_kind(runs, kinds)
    return result


# -- the chart ----------------------------------------------------------------------


def plot_throughput(ax, results: dict, sizes: list[int]) -> None:
    for mode, marker in (("off", "o"), ("auto", "s")):
        ax.plot(sizes, [results[str(b)][mode]["tok_s"] for b in sizes], marker=marker, label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s")
    ax.set_title("throughput", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_ratios(ax, results: dict, sizes: list[int]) -> None:
    labels = [f"b={b}" for b in sizes]
    values = [results[str(b)]["ratio"] for b in sizes]
    colors = ["tab:blue"] * len(sizes)
    for kind, row in results.get("1", {}).get("by_kind", {}).items():
        labels.append(f"b=1\n{kind}")
        values.append(row["ratio"])
        colors.append("tab:orange")
    drawn = ax.bar(range(len(values)), [v or 0.0 for v in values], color=colors)
    texts = [f"{v:.2f}" if v is not None else "n/a" for v in values]
    ax.bar_label(drawn, labels=texts, fontsize=7, padding=2)
    for y, color in zip(RATIO_LINES, ("tab:red", "gray"), strict=True):
        ax.axhline(y, color=color, linestyle="--", linewidth=1, label=f"{y:g}")
    ax.set_ylim(0, 1.3 * max([v or 0.0 for v in values] + [1.0]))
    ax.legend(fontsize=8, loc="upper right", ncols=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("auto / off tok/s")
    ax.set_title("auto over off (orange: per prompt kind at b=1)", fontsize=10)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, results = report["config"], report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    plot_throughput(left, results, cfg["batch_sizes"])
    plot_ratios(right, results, cfg["batch_sizes"])
    same = all(r["identical_to_off"] for r in results.values())
    fig.suptitle(
        f"{cfg['model_name']}, {cfg['dtype']}, {cfg['max_tokens']} new tokens, "
        f"{cfg['num_prompts']} prompts - outputs identical to off: {same} - "
        f"{report['machine']['cpu']}, {report['machine']['torch_threads']} threads",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- putting it together ------------------------------------------------------------


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "sweep.png")
    for b, r in report["results"].items():
        acc = r["auto"]["acceptance_rate"]
        print(
            f"b={b}: off {r['off']['tok_s']:.1f} tok/s, auto {r['auto']['tok_s']:.1f} tok/s, "
            f"ratio {r['ratio']:.2f}, acceptance {'n/a' if acc is None else f'{acc:.2f}'}, "
            f"identical {r['identical_to_off']}, running mean {r['off']['running_mean']:.1f} "
            f"peak {r['off']['running_peak']} (off), preemptions {r['off']['preemptions']}",
            file=sys.stderr,
        )
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"
    args = parse_args(argv)
    torch.manual_seed(0)
    machine = machine_info()
    engine = Engine.from_pretrained(
        args.model, dtype=args.dtype, backend=args.backend, kv_cache_bytes=args.kv_cache_mb << 20
    )
    prompts = load_prompts(args.prompts, engine, args.limit)
    kinds = list(dict.fromkeys(p.kind for p in prompts))
    progress = make_progress(sum(len(MODES) * len(batches(prompts, b)) for b in args.batch_sizes))
    results = {}
    for b in args.batch_sizes:
        runs = sweep_batch(engine, prompts, b, args.max_tokens, progress)
        results[str(b)] = summarize(runs, b, kinds, engine)
    machine["load_average_end"] = os.getloadavg()
    report = {
        "config": {
            "model": args.model,
            "model_name": engine.model_path.name,
            "dtype": args.dtype,
            "backend": engine.model.backend.describe(),
            "max_tokens": args.max_tokens,
            "kv_cache_mb": args.kv_cache_mb,
            "kv_blocks": engine.pool.num_blocks,
            "batch_sizes": args.batch_sizes,
            "prompts": str(args.prompts),
            "num_prompts": len(prompts),
            "kinds": kinds,
            "auto_draft": draft_dict(engine.default_draft),
        },
        "machine": machine,
        "results": results,
        "notes": NOTES,
    }
    write(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
