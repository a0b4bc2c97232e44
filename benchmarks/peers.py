"""selfspec against llama.cpp on one GGUF file, side by side, alternating.

Every system decodes the same chat-formatted token ids greedily to exactly
`--max-tokens` new tokens (end-of-sequence ignored), at batch 1, with the same number
of threads. selfspec runs the GGUF's quantized blocks as stored (`--weights gguf`) in
each drafting mode asked for, and once with dense bfloat16 weights; llama.cpp (through
`llama-cpp-python`, `make bench-peers`) runs plain and with its prompt-lookup
speculation. Each round runs every system on every prompt in turn, starting each round
with another system, so that the machine's load hits all alike. Reported per system:
tokens per second end to end (prefill included) and decode alone (after the first
token), medians over rounds, their ratios to llama.cpp plain, the bytes of weights a
token reads, and how far each output agrees with selfspec `off`.

    python -m benchmarks.peers --rounds 3 --limit 1 --max-tokens 128
    selfspec bench peers --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import kernels
from benchmarks.engine import DEFAULT_PROMPTS, Prompt, load_prompts, machine_info
from selfspec_kernels.cpu_build import cpu_flags
from services.engine import DraftConfig, Engine, SamplingParams, checkpoint

SELFSPEC = ("off", "auto", "ngram", "skip", "dense_off", "dense_auto")
LLAMA_CPP = ("llama_cpp", "llama_cpp_lookup")
DEFAULT_SYSTEMS = ("off", "auto", "dense_off", "llama_cpp", "llama_cpp_lookup")
LOOKUP_TOKENS = 10  # llama-cpp-python's own default for LlamaPromptLookupDecoding


@dataclass
class Timed:
    tokens: list[int]
    seconds: float  # end to end: prefill, first token and the rest
    decode_s: float  # after the first token


Run = Callable[[list[int], int], Timed]  # (token ids, new tokens) -> the output, timed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="selfspec bench peers", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default", help="a .gguf file, or `default`")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--limit", type=int, default=1, help="first N prompts of each kind")
    p.add_argument(
        "--systems", default=",".join(DEFAULT_SYSTEMS), help=", ".join(SELFSPEC + LLAMA_CPP)
    )
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SELFSPEC + LLAMA_CPP)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SELFSPEC + LLAMA_CPP)}")
    if min(args.max_tokens, args.rounds, args.limit) < 1:
        p.error("--max-tokens, --rounds and --limit must be at least 1")
    return args


# -- the systems --------------------------------------------------------------------


def selfspec_run(engine: Engine, mode: str) -> Run:
    draft = DraftConfig(mode=mode)

    def run(ids: list[int], n: int) -> Timed:
        params = SamplingParams(max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        seq = engine.add_request(ids, params, draft)
        while not seq.output:
            engine.step_once()
        t1 = time.perf_counter()
        while not seq.finished:
            engine.step_once()
        t2 = time.perf_counter()
        return Timed(list(seq.output), t2 - t0, t2 - t1)

    return run


def llama_cpp_extra_buffers() -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types. Not on a CPU with
    AMX: there llama-cpp-python 0.3.36 (built with GGML_NATIVE) repacks the GGUF for AMX
    and its first pass dies of a general protection fault in libggml-cpu (seen on an
    Intel Xeon under KVM, 2026-12-04), so it runs its AVX-512 kernels instead."""
    flags = cpu_flags()
    return flags is None or "amx_tile" not in flags


def llama_cpp_run(gguf: Path, lookup: bool) -> Run:
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    module = llama_cpp.llama_cpp  # where `Llama` takes its default model params from
    if not llama_cpp_extra_buffers() and not hasattr(module, "with_extra_buffers"):
        module.with_extra_buffers = module.llama_model_default_params

        def without_extra_buffers():
            params = module.with_extra_buffers()
            params.use_extra_bufts = False
            return params

        module.llama_model_default_params = without_extra_buffers
    threads = torch.get_num_threads()
    draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS) if lookup else None
    llm = Llama(
        model_path=str(gguf),
        n_ctx=4096,
        n_threads=threads,
        n_threads_batch=threads,
        draft_model=draft,
        logits_all=lookup,  # llama-cpp-python's speculation reads every position's logits
        verbose=False,
    )

    def run(ids: list[int], n: int) -> Timed:
        llm.reset()  # no prefix reused from the last run
        out: list[int] = []
        t0 = time.perf_counter()
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if not out:
                t1 = time.perf_counter()
            out.append(token)
            if len(out) == n:
                break
        t2 = time.perf_counter()
        return Timed(out, t2 - t0, t2 - t1)

    return run


def systems(args, gguf: Path) -> tuple[dict[str, Run], dict[str, Engine]]:
    # Always loaded: it also tokenizes the prompts for every system.
    engines = {"gguf": Engine.from_pretrained(str(gguf), weights="gguf")}
    if any(s.startswith("dense_") for s in args.systems):
        engines["dense"] = Engine.from_pretrained(str(gguf), dtype="bfloat16")
    runs: dict[str, Run] = {}
    for s in args.systems:
        if s in LLAMA_CPP:
            runs[s] = llama_cpp_run(gguf, lookup=s == "llama_cpp_lookup")
        elif s.startswith("dense_"):
            runs[s] = selfspec_run(engines["dense"], s.removeprefix("dense_"))
        else:
            runs[s] = selfspec_run(engines["gguf"], s)
    return runs, engines


# -- measuring ----------------------------------------------------------------------


def alternate(runs: dict[str, Run], prompts: list[Prompt], args) -> dict[str, list[dict]]:
    """Every system on every prompt, round after round; round r starts with system r."""
    names = list(runs)
    for name in names:  # warm up: kernels built, caches touched
        runs[name](prompts[0].ids, 4)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for p in prompts:
            for name in order:
                t = runs[name](p.ids, args.max_tokens)
                samples[name].append(
                    {
                        "round": r,
                        "prompt": p.id,
                        "tokens": t.tokens,
                        "seconds": t.seconds,
                        "decode_s": t.decode_s,
                    }
                )
            done = ", ".join(f"{n} {_last_tok_s(samples[n]):.1f}" for n in names)
            print(f"round {r + 1}/{args.rounds} {p.id}: {done} tok/s", file=sys.stderr, flush=True)
    return samples


def _last_tok_s(rows: list[dict]) -> float:
    return len(rows[-1]["tokens"]) / rows[-1]["seconds"]


def summarize(samples: dict[str, list[dict]]) -> dict[str, dict]:
    """Per system: the median over rounds of tokens per second over all prompts, end to
    end and decode alone; agreement with `off` (common prefix / tokens)."""
    out: dict[str, dict] = {}
    reference = {
        row["prompt"]: row["tokens"] for row in samples.get("off", []) if row["round"] == 0
    }
    for name, rows in samples.items():
        rounds = sorted({row["round"] for row in rows})
        e2e, decode = [], []
        for r in rounds:
            mine = [row for row in rows if row["round"] == r]
            tokens = sum(len(row["tokens"]) for row in mine)
            e2e.append(tokens / sum(row["seconds"] for row in mine))
            decode.append((tokens - len(mine)) / sum(row["decode_s"] for row in mine))
        out[name] = {
            "tok_s": statistics.median(e2e),
            "decode_tok_s": statistics.median(decode),
            "tok_s_rounds": e2e,
            "agreement_with_off": _agreement(rows, reference),
        }
    base = out.get("llama_cpp")
    for row in out.values():
        row["vs_llama_cpp"] = row["tok_s"] / base["tok_s"] if base else None
        row["decode_vs_llama_cpp"] = row["decode_tok_s"] / base["decode_tok_s"] if base else None
    return out


def _agreement(rows: list[dict], reference: dict[str, list[int]]) -> float | None:
    if not reference:
        return None
    same = total = 0
    for row in rows:
        ref = reference[row["prompt"]]
        pairs = zip(row["tokens"], ref, strict=False)
        n = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ref), len(row["tokens"])))
        same, total = same + n, total + len(ref)
    return same / total


def weight_bytes(gguf: Path, engines: dict[str, Engine]) -> dict[str, int]:
    """Bytes of matrices a token reads: the GGUF's tensors as stored (what llama.cpp and
    `--weights gguf` read; a tied embedding is read whole as the head), and each of our
    engines' as it keeps them."""
    from gguf import GGUFReader

    sizes = {"gguf_file_tensors": sum(int(t.n_bytes) for t in GGUFReader(gguf).tensors)}
    for kind, engine in engines.items():
        sizes[f"selfspec_{kind}"] = kernels.weight_bytes(engine.model)
    return sizes


# -- report -------------------------------------------------------------------------


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(report["results"])), 4))
    m = report["machine"]
    title = f"{report['config']['model_name']}, batch 1, {m['torch_threads']} threads\n{m['cpu']}"
    draw(ax, report["results"], title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw(ax, results: dict, title: str) -> None:
    """Each system's tokens per second, end to end and decode alone, with its ratio to
    llama.cpp plain over the first bar."""
    names = list(results)
    x = range(len(names))
    e2e = [results[n]["tok_s"] for n in names]
    dec = [results[n]["decode_tok_s"] for n in names]
    ax.bar([i - 0.2 for i in x], e2e, 0.4, label="end to end")
    ax.bar([i + 0.2 for i in x], dec, 0.4, label="decode alone")
    for i, n in enumerate(names):
        ratio = results[n]["vs_llama_cpp"]
        if ratio is not None:
            ax.annotate(f"{ratio:.2f}x", (i - 0.2, e2e[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("tokens / s (median of rounds)")
    ax.set_title(title, fontsize=9)
    ax.legend()


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict:
    """The comparison `argv` asks for, written to --out; returns the report."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    args = parse_args(argv)
    gguf = checkpoint.gguf_file(args.model)
    runs, engines = systems(args, gguf)
    prompts = load_prompts(args.prompts, engines["gguf"], args.limit)
    samples = alternate(runs, prompts, args)
    machine = machine_info()
    report = {
        "config": {
            "model": args.model,
            "model_name": gguf.name,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "prompts": [p.id for p in prompts],
            "systems": args.systems,
            "backends": {k: e.model.backend.describe() for k, e in engines.items()},
            "llama_cpp_extra_buffers": llama_cpp_extra_buffers(),
            "command": "python -m benchmarks.peers " + " ".join(argv or sys.argv[1:]),
        },
        "machine": machine,
        "weight_bytes": weight_bytes(gguf, engines),
        "results": summarize(samples),
        "samples": samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "peers.png")
    for name, row in report["results"].items():
        ratio = row["vs_llama_cpp"]
        shown = "" if ratio is None else f", {ratio:.2f}x llama.cpp"
        print(f"{name}: {row['tok_s']:.1f} tok/s end to end{shown}", file=sys.stderr)
    print(f"wrote {args.out / 'peers.json'} and {args.out / 'peers.png'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(main())
