"""Where a batch-1 decode step's time goes, at each model size, on a GGUF's quantized
blocks (`--weights gguf`) and on dense bfloat16.

With weights four times smaller than bfloat16, the parts that do not shrink decide:
attention, the LM head, Python between the kernels, thread synchronisation. For each
size (the default SmolLM2-135M GGUF, and random-weight GGUFs of SmolLM2-360M's and
1.7B's shapes, `benchmarks.synthetic_gguf`) and each kind of weights, the engine
decodes a fixed chat prompt greedily for `--tokens` tokens (end-of-sequence ignored),
`--rounds` times, and the wall time of each step is split, by timing the model's
methods as the engine calls them, into the embedding lookup, the layers (one C++ loop),
the LM head (final norm included) and the rest (the pass's setup, scheduling, sampling,
detokenizing: Python). The layers are then split by calling their kernels one by one
on the same model at the run's middle context: attention (RoPE, KV write and attention)
against the matrix products. Each step is set against the time to read its weights
once at the memory bandwidth measured just before.

    python -m benchmarks.step_profile --out benchmarks/results
    python -m benchmarks.step_profile --sizes smollm2-135m --tokens 16 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks import kernels, synthetic_gguf
from benchmarks.engine import BandwidthProbe, machine_info
from selfspec_kernels import cpu_attention, cpu_layers
from services.engine import Engine, SamplingParams, checkpoint
from services.engine.kv_pool import BlockTable

DEFAULT_SIZE = "smollm2-135m"  # the default model's own GGUF
SIZES = (DEFAULT_SIZE, *synthetic_gguf.SHAPES)
KINDS = ("gguf", "bf16")
PROMPT = "Explain in a few sentences why the sky is blue and sunsets are red."
KV_BYTES = 256 << 20  # the prompt and --tokens fit at every size; less memory than the default
STACK = ("embed_ms", "products_ms", "attention_ms", "head_ms", "rest_ms")  # sums to step_ms
NOTES = {
    "step_ms": "wall time of one engine step (Engine.step_once) while the sequence decodes "
    "alone, after the step that prefills the prompt; mean over the round's steps; the round "
    "reported is the one with the median step_ms, and every round is in `rounds`",
    "embed_ms, layers_ms, head_ms": "wall time inside Model.embed_tokens, Model.run_layers "
    "(all layers in one C++ call) and Model.logits (final norm and LM head) in those steps",
    "rest_ms": "step_ms less those three: setup_ms (in ModelRunner.verify, outside them: "
    "AttentionBatch, tensors) and schedule_sample_ms (outside verify: scheduling, the "
    "greedy choice, appending and detokenizing)",
    "attention_ms": "layers' RoPE, KV write and attention kernel, called one by one from "
    "Python at the run's middle context; the Python cost of a call "
    "(python_per_call_us) taken out",
    "products_ms": "layers_ms - attention_ms: the four fused products a layer (RMSNorms, "
    "SwiGLU and residual adds are fused into them), with what the C++ loop spends between "
    "kernels (allocation, waiting for threads)",
    "python_per_call_us": "(the layers as a Python loop of kernel calls - the same calls in "
    "the engine's C++ loop) / calls: what Python between kernels would cost",
    "sync_ms": "kernel_calls (OpenMP parallel regions a step) x fork_join_us, what a small "
    "product costs on all threads over its work split evenly (fork_join_us): a lower bound "
    "on synchronisation, which also waits for the slowest thread of each region",
    "threads_speedup": "the layers' C++ loop on one thread over the same on all threads "
    "(layer_split, at the same context)",
    "weight_bytes": "bytes of the matrices a token reads: the layers' products and the LM "
    "head (a tied Q8_0 embedding read whole as the head for gguf); the embedding row is "
    "not counted",
    "weight_read_bound_ms": "weight_bytes / memory bandwidth (summing 1 GiB of float32, best "
    "of 3, sampled just before this size and kind)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.step_profile", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--sizes", default=",".join(SIZES), help=f"{', '.join(SIZES)} or .gguf files")
    p.add_argument("--weights", default=",".join(KINDS), help=", ".join(KINDS))
    p.add_argument("--tokens", type=int, default=64, help="new tokens a round decodes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="of the layer split's calls")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    if set(args.weights) - set(KINDS) or not args.weights:
        p.error(f"--weights takes {', '.join(KINDS)}")
    for size in args.sizes:
        if size not in SIZES and not size.endswith(".gguf"):
            p.error(f"unknown size {size!r}; known: {', '.join(SIZES)}, or a .gguf file")
    if args.tokens < 3 or min(args.rounds, args.repeats) < 1:
        p.error("--tokens must be at least 3 (a step after the first), --rounds and --repeats 1")
    return args


def model_file(size: str) -> Path:
    """The GGUF file of `size`: the default model's, one built with random weights (once,
    in the cache), or a file named."""
    if size == DEFAULT_SIZE:
        return checkpoint.default_model_file()
    if size in synthetic_gguf.SHAPES:
        return synthetic_gguf.build(size, synthetic_gguf.SHAPES[size])
    return checkpoint.gguf_file(size)


def load(path: Path, kind: str) -> Engine:
    return Engine.from_pretrained(str(path), weights=kind, kv_cache_bytes=KV_BYTES)


# -- the step, as the engine runs it --------------------------------------------------


class Clock:
    """Wall time spent inside chosen methods of objects, by part: each method is replaced
    on its instance by one that times the call, until `close`."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self._wrapped: list[tuple[object, str]] = []

    def wrap(self, obj: object, method: str, part: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - t0

        setattr(obj, method, timed)
        self._wrapped.append((obj, method))

    def close(self) -> None:
        for obj, method in self._wrapped:
            delattr(obj, method)  # the class's method shows through again
        self._wrapped.clear()


def engine_clock(engine: Engine) -> Clock:
    clock = Clock()
    model = engine.model
    clock.wrap(model, "embed_tokens", "embed")
    clock.wrap(model, "run_layers", "layers")
    clock.wrap(model, "logits", "head")
    clock.wrap(engine.runner, "verify", "verify")
    return clock


def decode_round(engine: Engine, ids: list[int], tokens: int, clock: Clock) -> dict:
    """Per-step means (ms) of one greedy decode of `tokens` tokens, the first step
    (prefill, first token and the first decode) left out."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    seq = engine.add_request(ids, params, "off")
    engine.step_once()
    clock.seconds.clear()
    steps, t0 = 0, time.perf_counter()
    while not seq.finished:
        engine.step_once()
        steps += 1
    ms = {part: 1e3 * s / steps for part, s in clock.seconds.items()}
    step = 1e3 * (time.perf_counter() - t0) / steps
    inside = ms["embed"] + ms["layers"] + ms["head"]
    return {
        "step_ms": step,
        "embed_ms": ms["embed"],
        "layers_ms": ms["layers"],
        "head_ms": ms["head"],
        "rest_ms": step - inside,
        "setup_ms": ms["verify"] - inside,
        "schedule_sample_ms": step - ms["verify"],
        "steps": steps,
    }


# -- the layers, kernel by kernel ------------------------------------------------------


def layer_split(engine: Engine, context: int, repeats: int) -> dict | None:
    """The layers' kernels called one by one from Python for one new token after
    `context` tokens, against the same calls in the engine's C++ loop (medians of
    `repeats`). None for a model the C++ loop does not run."""
    model, pool = engine.model, engine.pool
    if model.stack is None:
        return None
    table = BlockTable(pool)
    table.reserve(context + 1)  # blocks as they are: attention's time is not the values'
    try:
        batch = model.attention_batch([table.blocks], [context], [1], pool.block_size)
        with torch.inference_mode():
            h = model.embed_tokens(torch.tensor([0]))
            rope = torch.view_as_real(model.rope[batch.positions])
            cpp = [_cpp_loop(model, h, batch, pool.kv, rope) for _ in range(repeats)]
            loops = [_python_loop(model, h, batch, pool.kv, rope) for _ in range(repeats)]
            with threads(1):
                alone = [_cpp_loop(model, h, batch, pool.kv, rope) for _ in range(repeats)]
    finally:
        table.free()
    calls = 5 * model.num_layers  # a layer's four products and its attention
    loop = {k: statistics.median(x[k] for x in loops) for k in loops[0]}
    per_call = max(0.0, (loop["total"] - statistics.median(cpp)) / calls)
    return {
        "context": context,
        "cpp_loop_ms": 1e3 * statistics.median(cpp),
        "cpp_loop_one_thread_ms": 1e3 * statistics.median(alone),
        "threads_speedup": statistics.median(alone) / statistics.median(cpp),
        "python_loop_ms": 1e3 * loop["total"],
        "python_per_call_us": 1e6 * per_call,
        "attention_kernel_ms": 1e3 * max(0.0, loop["attention"] - model.num_layers * per_call),
        "calls_ms": {k: 1e3 * v for k, v in loop.items() if k != "total"},
    }


def _cpp_loop(model, h, batch, kv, rope) -> float:
    every = [True] * model.num_layers
    t0 = time.perf_counter()
    cpu_layers.run(model.stack, h, batch, kv, rope, 0, every, every)
    return time.perf_counter() - t0


def _python_loop(model, h, batch, kv, rope) -> dict[str, float]:
    """Seconds in each kind of kernel call (a product's RMSNorm, SwiGLU or residual add
    fused in), the model's layers run as `Model.run_layers` runs them without C++ loop."""
    heads = (model.num_heads, model.num_kv_heads, model.head_dim)
    spent: Counter[str] = Counter()
    start = t = time.perf_counter()

    def lap(kind: str) -> None:
        nonlocal t
        now = time.perf_counter()
        spent[kind] += now - t
        t = now

    for layer, cache in zip(model.layers, kv, strict=True):
        qkv = layer.qkv(h, False, layer.attn_norm)
        lap("qkv")
        out = cpu_attention.rope_attention(qkv, cache, batch, rope, heads, model.scale)
        lap("attention")
        h = layer.o.add(out, h)
        lap("o")
        a = layer.gate_up.swiglu(h, False, layer.mlp_norm)
        lap("gate_up")
        h = layer.down.add(a, h)
        lap("down")
    spent["total"] = time.perf_counter() - start
    return dict(spent)


@contextlib.contextmanager
def threads(n: int):
    """torch's kernels (and ours) on `n` threads for a while."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fork_join_us(model, repeats: int = 200) -> float:
    """What starting a kernel's threads and waiting for them costs a call: a product
    (48 rows a thread of the LM head, in its format) timed on all of torch's threads
    (`on_all`) and on one (`on_one`), less what its work would take split evenly, the
    work being the time twice as many rows add on one thread."""
    n = torch.get_num_threads()
    rows = 48 * n  # enough for every kernel to split them among the threads
    small, large = (model.head_part(torch.arange(k)) for k in (rows, 2 * rows))
    x = torch.randn(1, model.config.hidden_size)

    def best(part) -> float:  # the least of many: a fixed cost, without the neighbours' noise
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            part(x)
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.inference_mode():
        best(small), best(large)  # threads started, rows in cache
        on_all = best(small)
        with threads(1):
            on_one = best(small)
            work = best(large) - on_one
    return 1e6 * (on_all - (on_one - work + work / n))


# -- one size and kind -------------------------------------------------------------------


def weight_bytes(engine: Engine) -> dict[str, int]:
    total, head = kernels.weight_bytes(engine.model), kernels.linear_bytes(engine.model.head)
    return {"layers": total - head, "head": head, "total": total}


def profile(engine: Engine, ids: list[int], args, bandwidth: float) -> dict:
    """A size and kind's figures: every round's, the median round's, and the split."""
    clock = engine_clock(engine)
    try:
        decode_round(engine, ids, 4, clock)  # warm: caches touched, threads started
        rounds = [decode_round(engine, ids, args.tokens, clock) for _ in range(args.rounds)]
    finally:
        clock.close()
    median = sorted(rounds, key=lambda r: r["step_ms"])[(len(rounds) - 1) // 2]
    row = {"backend": engine.model.backend.describe(), **median}
    split = layer_split(engine, len(ids) + args.tokens // 2, args.repeats)
    attention = split["attention_kernel_ms"] if split else 0.0
    row["attention_ms"] = min(attention, row["layers_ms"])
    row["products_ms"] = row["layers_ms"] - row["attention_ms"]
    row["layer_split"] = split
    calls = 5 * engine.model.num_layers + 1  # and the LM head
    row["kernel_calls"] = calls
    row["fork_join_us"] = fork_join_us(engine.model)
    row["sync_ms"] = max(0.0, calls * row["fork_join_us"] / 1e3)
    row["tok_s"] = 1e3 / row["step_ms"]
    row["load_average"] = os.getloadavg()  # a shared machine's neighbours slow every part
    row.update(bound(weight_bytes(engine), bandwidth, row))
    row["rounds"] = rounds
    return row


def bound(sizes: dict[str, int], bandwidth: float, row: dict) -> dict:
    ms = {part: 1e3 * n / bandwidth for part, n in sizes.items()}
    return {
        "weight_bytes": sizes,
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "weight_read_bound_ms": ms["total"],
        "layers_bound_ms": ms["layers"],
        "head_bound_ms": ms["head"],
        "step_over_bound": row["step_ms"] / ms["total"],
    }


def model_info(engine: Engine, path: Path) -> dict:
    c = engine.model.config
    kv = c.num_key_value_heads * engine.model.head_dim
    h, i = c.hidden_size, c.intermediate_size
    per_layer = h * (2 * h + 2 * kv) + 3 * h * i
    return {
        "file": path.name,
        "hidden": h,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "intermediate": i,
        "vocab": c.vocab_size,
        "parameters": c.num_hidden_layers * per_layer + c.vocab_size * h,  # tied head
    }


def run_size(size: str, args, probe: BandwidthProbe, progress) -> dict:
    path = model_file(size)
    result: dict = {}
    for kind in args.weights:
        progress(f"{size} {kind}: loading")
        probe.release()  # its 1 GiB back while the model loads
        engine = load(path, kind)
        ids = engine.encode(PROMPT, chat=True)
        result.setdefault("model", model_info(engine, path))
        result.setdefault("prompt_tokens", len(ids))
        probe()
        progress(f"{size} {kind}: decoding")
        result[kind] = profile(engine, ids, args, probe.samples[-1])
        progress(f"{size} {kind}: {result[kind]['step_ms']:.2f} ms a step")
        del engine
        gc.collect()
    return result


# -- report ---------------------------------------------------------------------------


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(report["results"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes) + 1, 4.2), squeeze=False)
    colours = ["#999999", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for ax, size in zip(axes[0], sizes, strict=True):
        kinds = [k for k in KINDS if k in report["results"][size]]
        rows = [report["results"][size][k] for k in kinds]
        bottom = [0.0] * len(rows)
        for part, colour in zip(STACK, colours, strict=True):
            values = [r[part] for r in rows]
            label = part.removesuffix("_ms")
            ax.bar(kinds, values, 0.6, bottom=bottom, color=colour, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        bounds = [r["weight_read_bound_ms"] for r in rows]
        ax.scatter(kinds, bounds, marker="_", s=900, color="black", label="weight-read bound")
        speeds = ", ".join(f"{r['tok_s']:.0f}" for r in rows)
        ax.set_title(f"{size}\n{speeds} tok/s ({', '.join(kinds)})", fontsize=9)
        ax.set_ylabel("ms per decode step (batch 1)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False, markerscale=0.4
    )
    m = report["machine"]
    fig.suptitle(f"Where a decode step goes, {m['torch_threads']} threads, {m['cpu']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The printed table's columns: heading, and the figure of a size and kind it shows.
COLUMNS = {
    "step ms": lambda r: f"{r['step_ms']:.2f}",
    "layers": lambda r: f"{r['layers_ms']:.2f}",
    "attn": lambda r: f"{r['attention_ms']:.2f}",
    "head": lambda r: f"{r['head_ms']:.2f}",
    "embed": lambda r: f"{r['embed_ms']:.3f}",
    "rest": lambda r: f"{r['rest_ms']:.2f}",
    "tok/s": lambda r: f"{r['tok_s']:.1f}",
    "MB/token": lambda r: f"{r['weight_bytes']['total'] / 1e6:.0f}",
    "bound ms": lambda r: f"{r['weight_read_bound_ms']:.2f}",
}


def table(report: dict) -> str:
    lines = ["  ".join(f"{h:>12}" for h in ["size", "weights", *COLUMNS])]
    for size, result in report["results"].items():
        for kind in (k for k in KINDS if k in result):
            cells = [size, kind, *(show(result[kind]) for show in COLUMNS.values())]
            lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()

    def progress(message: str) -> None:
        print(f"{message} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    probe = BandwidthProbe()
    results = {size: run_size(size, args, probe, progress) for size in args.sizes}
    machine = machine_info()
    report = {
        "config": {
            "sizes": args.sizes,
            "weights": args.weights,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "prompt": PROMPT,
            "command": "python -m benchmarks.step_profile " + " ".join(argv or sys.argv[1:]),
        },
        "machine": machine,
        "memory_bandwidth_samples_gb_s": [b / 1e9 for b in probe.samples],
        "notes": NOTES,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_profile.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "step_profile.png")
    print(table(report), file=sys.stderr)
    print(f"wrote {args.out / 'step_profile.json'} and step_profile.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
