"""Engine benchmark: our drafting modes against transformers, side by side, in one run.

Every system decodes the same chat-formatted prompts greedily to exactly
`--max-tokens` new tokens (`ignore_eos` for the engine, `min_new_tokens` for
transformers). For each system and batch size we report tokens per second end to
end (prefill included), per prompt kind and overall; for our drafting modes also
acceptance, tokens per verification, the cost of a draft step and whether the
output equals `off` token for token, and the speedup over `off`. The plain decode step
is set against the time the machine needs to read the weights once.

With `--draft-model PATH` (a smaller model with the same tokenizer, e.g. one written by
`selfspec draft-from-layers`) the engine is loaded with it, and the system `model`
(drafting with it) runs beside the self-drafting modes; `auto` may then use it too.

With `llama-cpp-python` installed (`make bench-peers`) and a GGUF model, llama.cpp joins
as a peer: `benchmarks.peers` runs it plain and with its prompt lookup against our `off`,
`auto` and `ngram` at batch 1, alternating, and its ratios go into engine.json (`peers`),
with peers.json and peers.png beside it.

    python -m benchmarks.engine --limit 1 --max-tokens 16 --batch-sizes 1,2
    selfspec bench engine --out benchmarks/results
    selfspec bench engine --draft-model DIR --systems off,skip,model --limit 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.kernels import weight_bytes
from selfspec_kernels import cpu_memory
from services.engine import DraftConfig, Engine, SamplingParams, checkpoint
from services.engine.profile import load_profile

HF_SYSTEMS = ("hf_generate", "hf_early_exit")
ENGINE_SYSTEMS = ("off", "skip", "early_exit", "ngram", "model", "auto")
SYSTEMS = HF_SYSTEMS + ENGINE_SYSTEMS
DEFAULT_PROMPTS = Path(__file__).with_name("prompts.jsonl")
WARMUP_PROMPT = "Say hello."
WARMUP_TOKENS = 4
BANDWIDTH_BYTES = 1 << 30
HF_BATCH_LIMIT = "transformers' assisted generation supports batch size 1 only"
NOTES = {
    "tok_s": "generated tokens / wall time of generate() calls, prefill included",
    "by_kind": "only groups whose prompts are all of that kind; null for mixed groups",
    "tokens_per_verify": "(accepted + steps) / steps: tokens per full-model verification pass",
    "draft_step_cost": "(draft_s / draft_passes) / (verify_s / verify_passes of off), same batch; "
    "for model, the draft model's catch-up passes count too",
    "speedup_vs_off": "tok_s / off's tok_s, same batch",
    "agreement_with_off": "common prefix with off / off tokens before off's first EOS "
    "(transformers' min_new_tokens forbids EOS, the engine's ignore_eos does not)",
    "roofline": "weight_read_bound_ms = weight_bytes / memory_bandwidth, the median of the "
    "samples (summing 1 GiB of float32, best of 3) taken before each group of off at batch 1 "
    "and after the last; decode_step_ms_b1 = verify_s / verify_passes of that run",
    "peers": "llama.cpp and our modes at batch 1, alternating (benchmarks.peers); "
    "vs_llama_cpp = tok_s / llama.cpp plain's, end to end; decode_vs_llama_cpp after the "
    "first token",
    "hf_dtype": "transformers runs in --dtype as a user would run it (on a CPU without native "
    "bfloat16 that is its emulated bfloat16 path); the engine rounds weights to --dtype and "
    "computes in its compute dtype",
}

Output = tuple[list[int], dict | None]  # token ids, engine stats (None for transformers)
Generate = Callable[[list[list[int]], int], list[Output]]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str
    ids: list[int]  # chat-formatted token ids, the same for every system


@dataclass
class Group:
    kinds: frozenset[str]
    tokens: int
    seconds: float
    verify_s: float = 0.0  # the engine's full-model passes within the group
    verify_passes: int = 0


@dataclass
class Run:
    """One system at one batch size: outputs, engine stats, wall time per group."""

    system: str
    batch_size: int
    outputs: list[list[int]] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


# -- arguments and inputs ---------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="selfspec bench engine", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--weights", default="auto", choices=checkpoint.WEIGHTS)
    p.add_argument("--backend", default=None, choices=("cpu", "onednn", "torch", "triton"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8])
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--limit", type=int, default=None, help="first N prompts of each kind")
    p.add_argument(
        "--systems",
        type=system_list,
        default=None,
        help="default: all (model only with --draft-model)",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        help="a smaller model with the same tokenizer to load beside --model; adds system model",
    )
    p.add_argument(
        "--exit-layer",
        type=int,
        default=None,
        help="default: the trained exit's (selfspec train-draft), else 3/4 of the layers",
    )
    p.add_argument(
        "--peers",
        choices=("auto", "on", "off"),
        default="auto",
        help="llama.cpp as a peer (benchmarks.peers); auto: when installed and the model is a GGUF",
    )
    p.add_argument("--peer-rounds", type=int, default=3, help="alternating rounds of the peers")
    args = p.parse_args(argv)
    if args.max_tokens < 1 or (args.limit is not None and args.limit < 1):
        p.error("--max-tokens and --limit must be at least 1")
    if args.systems is None:
        args.systems = [s for s in SYSTEMS if s != "model" or args.draft_model]
    if "model" in args.systems and args.draft_model is None:
        p.error("system model drafts with a draft model: pass --draft-model PATH")
    return args


def int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers like 1,8")
    return sorted(set(values))


def system_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"systems are {', '.join(SYSTEMS)}; got {unknown}")
    return [s for s in SYSTEMS if s in names]


def load_prompts(path: Path, engine: Engine, limit: int | None) -> list[Prompt]:
    """The prompts in file order, at most `limit` of each kind, chat-formatted once."""
    prompts: list[Prompt] = []
    per_kind: dict[str, int] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        kind = row["kind"]
        if limit is not None and per_kind.get(kind, 0) >= limit:
            continue
        per_kind[kind] = per_kind.get(kind, 0) + 1
        ids = engine.encode(row["messages"][0]["content"], chat=True)
        prompts.append(Prompt(row["id"], kind, ids))
    return prompts


def chunks(prompts: list[Prompt], size: int) -> Iterator[list[Prompt]]:
    for i in range(0, len(prompts), size):
        yield prompts[i : i + size]


# -- the systems --------------------------------------------------------------------


def draft_configs(engine: Engine, exit_layer: int) -> dict[str, DraftConfig]:
    """Each engine system's drafting; `model` only where the engine has a draft model."""
    # The model's profile, not engine.default_draft: with a draft model loaded that is
    # mode model, and may one day not carry the profile's skip set.
    profile, _ = load_profile(engine.model_path, engine.model.num_layers)
    k = profile.max_draft
    configs = {
        "off": DraftConfig(mode="off"),
        "skip": replace(profile, mode="skip"),
        # The profile's draft head (its shortlist) too, through the trained exit if any.
        "early_exit": replace(
            profile, mode="early_exit", skip_attn=(), skip_mlp=(), exit_layer=exit_layer
        ),
        "ngram": DraftConfig(mode="ngram", max_draft=k),
        "model": DraftConfig(mode="model", max_draft=k),
        "auto": replace(profile, mode="auto"),  # free to use the draft model when loaded
    }
    if engine.runner.draft_model is None:
        del configs["model"]
    for cfg in configs.values():
        cfg.check_layers(engine.model.num_layers)
    return configs


def engine_generator(engine: Engine, draft: DraftConfig) -> Generate:
    def generate(group: list[list[int]], n: int) -> list[Output]:
        params = SamplingParams(max_tokens=n, ignore_eos=True)
        return [(o.token_ids, o.stats) for o in engine.generate(group, params, draft=draft)]

    return generate


def load_hf(engine: Engine, dtype: str):
    """transformers' model and a left-padding tokenizer for the engine's checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=getattr(torch, dtype))
    model = model.eval()
    tokenizer = AutoTokenizer.from_pretrained(engine.model_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def hf_generator(model, tokenizer, early_exit: int | None) -> Generate:
    extra = {} if early_exit is None else {"assistant_early_exit": early_exit}

    def generate(group: list[list[int]], n: int) -> list[Output]:
        batch = tokenizer.pad({"input_ids": group}, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **extra,
            )
        return [(row.tolist(), None) for row in out[:, batch["input_ids"].shape[1] :]]

    return generate


# -- timing -------------------------------------------------------------------------


def run_system(
    name: str,
    generate: Generate,
    prompts: list[Prompt],
    batch_size: int,
    max_tokens: int,
    engine: Engine,
    progress: Progress,
    probe: Callable[[], None] | None = None,
) -> Run:
    """Warm up on a short prompt, then time every group of `batch_size` prompts;
    `probe` runs before each group and after the last, outside the timings."""
    warmup = engine.encode(WARMUP_PROMPT, chat=True)
    generate([warmup] * batch_size, WARMUP_TOKENS)
    timing = engine.runner.timing
    timing.reset()
    run = Run(name, batch_size)
    for group in chunks(prompts, batch_size):
        if probe:
            probe()
        verify_s, passes = timing.verify_s, timing.verify_passes
        t0 = time.perf_counter()
        outs = generate([p.ids for p in group], max_tokens)
        seconds = time.perf_counter() - t0
        tokens = sum(len(ids) for ids, _ in outs)
        run.outputs += [ids for ids, _ in outs]
        run.stats += [stats for _, stats in outs if stats is not None]
        kinds = frozenset(p.kind for p in group)
        verify = (timing.verify_s - verify_s, timing.verify_passes - passes)
        run.groups.append(Group(kinds, tokens, seconds, *verify))
        label = "+".join(dict.fromkeys(p.kind for p in group))
        progress(f"{name} b={batch_size} {label}: {tokens / seconds:.1f} tok/s")
    if probe:
        probe()
    if name in ENGINE_SYSTEMS:
        run.timing = asdict(timing)
    return run


def throughput(groups: list[Group]) -> dict:
    tokens = sum(g.tokens for g in groups)
    seconds = sum(g.seconds for g in groups)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds if seconds else None}


def per_kind(groups: list[Group], kinds: list[str]) -> dict[str, dict | None]:
    out: dict[str, dict | None] = {}
    for kind in kinds:
        alone = [g for g in groups if g.kinds == {kind}]
        out[kind] = throughput(alone) if alone else None
    return out


# -- statistics ---------------------------------------------------------------------


def agreement(outputs: list[list[int]], reference: list[list[int]], stop: frozenset) -> float:
    """Share of the reference's tokens before its first EOS reproduced as a common prefix."""
    matched = total = 0
    for out, ref in zip(outputs, reference, strict=True):
        end = next((i for i, t in enumerate(ref) if t in stop), len(ref))
        n = 0
        while n < min(end, len(out)) and out[n] == ref[n]:
            n += 1
        matched, total = matched + n, total + end
    return matched / total if total else 1.0


def draft_stats(run: Run, off: Run | None) -> dict:
    drafted = sum(s["drafted_tokens"] for s in run.stats)
    accepted = sum(s["accepted_tokens"] for s in run.stats)
    steps = sum(s["steps"] for s in run.stats)
    t = run.timing
    draft_step = t["draft_s"] / t["draft_passes"] if t["draft_passes"] else None
    full_step = off.timing["verify_s"] / off.timing["verify_passes"] if off else None
    return {
        "acceptance_rate": accepted / drafted if drafted else None,
        "tokens_per_verify": (accepted + steps) / steps if steps else None,
        "draft_step_ms": draft_step * 1e3 if draft_step else None,
        "draft_step_cost": draft_step / full_step if draft_step and full_step else None,
    }


def summarize(run: Run, off: Run | None, kinds: list[str], stop: frozenset) -> dict:
    result = {**throughput(run.groups), "by_kind": per_kind(run.groups, kinds)}
    if run.timing:
        t = run.timing
        result["timing"] = t
        result["verify_step_ms"] = 1e3 * t["verify_s"] / t["verify_passes"]
    if run.system not in ("off", *HF_SYSTEMS):
        result.update(draft_stats(run, off))
    if off is not None and run is not off:
        off_tok_s = throughput(off.groups)["tok_s"]
        result["speedup_vs_off"] = result["tok_s"] / off_tok_s if off_tok_s else None
        result["identical_to_off"] = run.outputs == off.outputs
        result["agreement_with_off"] = agreement(run.outputs, off.outputs, stop)
    return result


# -- the machine --------------------------------------------------------------------


def memory_bandwidth(repeats: int = 5, x: torch.Tensor | None = None) -> float:
    """Bytes per second read by summing a 1 GiB float32 tensor (or `x`), best of `repeats`.
    The tensor is on huge pages where Linux gives them, as the engine's weights are."""
    if x is None:
        x = _bandwidth_buffer()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best


def _bandwidth_buffer() -> torch.Tensor:
    return cpu_memory.empty((BANDWIDTH_BYTES // 4,), torch.float32).fill_(1.0)


class BandwidthProbe:
    """Memory bandwidth sampled between the groups of the run that the roofline reads.

    On a shared machine the bandwidth a run gets moves with its neighbours' load, by a
    third from one run to the next here: sampled in between, the bound and the step it
    is set against see the same neighbours."""

    def __init__(self, repeats: int = 3) -> None:
        self.repeats = repeats
        self.samples: list[float] = []
        self._x: torch.Tensor | None = None

    def __call__(self) -> None:
        if self._x is None:
            self._x = _bandwidth_buffer()
        self.samples.append(memory_bandwidth(self.repeats, self._x))

    def release(self) -> None:
        self._x = None


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import transformers

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }


def roofline(samples: list[float], weight_bytes: int, off: Run | None, kinds: list[str]) -> dict:
    """How far the plain decode step at batch 1 is from reading every weight once, at the
    median bandwidth sampled between that run's groups."""
    bandwidth = statistics.median(samples) if samples else None
    bound_ms = 1e3 * weight_bytes / bandwidth if bandwidth else None
    step_ms = 1e3 * off.timing["verify_s"] / off.timing["verify_passes"] if off else None
    by_kind = {}
    for kind in kinds:
        alone = [g for g in off.groups if g.kinds == {kind}] if off else []
        passes = sum(g.verify_passes for g in alone)
        by_kind[kind] = 1e3 * sum(g.verify_s for g in alone) / passes if passes else None
    return {
        "memory_bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
        "memory_bandwidth_samples_gb_s": [b / 1e9 for b in samples],
        "weight_bytes": weight_bytes,
        "weight_read_bound_ms": bound_ms,
        "decode_step_ms_b1": step_ms,
        "decode_step_ms_b1_by_kind": by_kind,
        "decode_step_over_bound": step_ms / bound_ms if step_ms and bound_ms else None,
    }


def headline(results: dict, kinds: list[str]) -> dict | None:
    """Our fastest system at batch 1 against transformers' generate, overall and per kind."""
    b1 = results.get("1", {})
    ours = [s for s in ENGINE_SYSTEMS if s in b1]
    if "hf_generate" not in b1 or not ours:
        return None
    best = max(ours, key=lambda s: b1[s]["tok_s"])
    hf = b1["hf_generate"]

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return a["tok_s"] / b["tok_s"] if a and b and a["tok_s"] and b["tok_s"] else None

    return {
        "best_mode": best,
        "best_tok_s": b1[best]["tok_s"],
        "hf_generate_tok_s": hf["tok_s"],
        "speedup_vs_hf_generate": ratio(b1[best], hf),
        "speedup_by_kind": {k: ratio(b1[best]["by_kind"][k], hf["by_kind"][k]) for k in kinds},
    }


# -- the chart ----------------------------------------------------------------------


def bars(ax, categories: list[str], series: dict[str, list[float | None]], title: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
        heights = [v if v is not None else 0.0 for v in values]
        drawn = ax.bar(xs, heights, width, label=name)
        labels = [f"{v:.1f}" if v is not None else "n/a" for v in values]
        ax.bar_label(drawn, labels=labels, fontsize=7, padding=2)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel("tokens / s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.12)


def kind_tok_s(result: dict, kind: str) -> float | None:
    part = (result.get("by_kind") or {}).get(kind)
    return part["tok_s"] if part else None


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, cfg = report["results"], report["config"]
    systems, kinds = cfg["systems"], cfg["kinds"]
    batches = [str(b) for b in cfg["batch_sizes"]]
    kind_batch = batches[0]
    peers = report.get("peers")
    fig, axes = plt.subplots(1, 3 if peers else 2, figsize=(22 if peers else 15, 5.5))
    left, right = axes[:2]
    by_batch = {f"batch {b}": [results[b][s].get("tok_s") for s in systems] for b in batches}
    bars(left, systems, by_batch, "all prompts")
    by_kind = {s: [kind_tok_s(results[kind_batch][s], k) for k in kinds] for s in systems}
    bars(right, kinds, by_kind, f"per prompt kind, batch {kind_batch}")
    if peers:
        from benchmarks.peers import draw

        draw(axes[2], peers["results"], "against llama.cpp, batch 1, alternating")
    fig.suptitle(
        f"{cfg['model_name']}, {cfg['weights']} weights (compute {cfg['compute_dtype']}, "
        f"backend {cfg.get('backend', {}).get('backend', '?')}), "
        f"{cfg['max_tokens']} new tokens{drafter_note(cfg)} - {report['machine']['cpu']}, "
        f"{report['machine']['torch_threads']} threads",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def drafter_note(cfg: dict) -> str:
    """The draft model that system `model` ran, for the chart's title."""
    path = cfg.get("draft_model")
    return f", draft model {Path(path).name}" if path else ""


# -- putting it together ------------------------------------------------------------


def make_progress(total: int) -> Progress:
    start, done = time.perf_counter(), [0]

    def progress(message: str) -> None:
        done[0] += 1
        elapsed = time.perf_counter() - start
        print(f"[{done[0]}/{total}] {message} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    return progress


def generators(engine: Engine, args: argparse.Namespace, exit_layer: int) -> dict[str, Generate]:
    drafts = draft_configs(engine, exit_layer)
    gens = {s: engine_generator(engine, cfg) for s, cfg in drafts.items()}
    if set(args.systems) & set(HF_SYSTEMS):
        model, tokenizer = load_hf(engine, hf_dtype(engine))
        gens["hf_generate"] = hf_generator(model, tokenizer, None)
        gens["hf_early_exit"] = hf_generator(model, tokenizer, exit_layer)
    return {s: gens[s] for s in args.systems}


def runs_for(system: str, batch_size: int) -> bool:
    return not (system == "hf_early_exit" and batch_size > 1)


def run_all(
    engine, args, prompts, gens: dict[str, Generate], probe: BandwidthProbe
) -> tuple[dict[str, dict], Run | None]:
    """Every system at every batch size; `off` first so the others compare with it.
    Returns the results and the run of `off` at batch 1, which `probe` samples around."""
    order = sorted(gens, key=lambda s: s != "off")
    total = sum(
        math.ceil(len(prompts) / b) for s in order for b in args.batch_sizes if runs_for(s, b)
    )
    progress = make_progress(total)
    kinds = list(dict.fromkeys(p.kind for p in prompts))
    results: dict[str, dict] = {}
    off_b1 = None
    for b in args.batch_sizes:
        off, row = None, {}
        for system in order:
            if not runs_for(system, b):
                row[system] = {"skipped": HF_BATCH_LIMIT}
                continue
            sample = probe if (system, b) == ("off", 1) else None
            run = run_system(
                system, gens[system], prompts, b, args.max_tokens, engine, progress, sample
            )
            off = run if system == "off" else off
            if sample:
                off_b1 = run
                probe.release()
            row[system] = summarize(run, off, kinds, engine.eos_ids)
        results[str(b)] = {s: row[s] for s in args.systems}
    return results, off_b1


def hf_dtype(engine: Engine) -> str:
    """transformers' dtype: the engine's dense one; float32 beside GGUF blocks, whose
    arithmetic is float32."""
    if engine.model.backend.quantized:
        return "float32"
    return str(engine.model.store_dtype).removeprefix("torch.")


def peers(args: argparse.Namespace) -> dict | None:
    """llama.cpp beside our modes (`benchmarks.peers`), or None where it doesn't run."""
    if args.peers == "off":
        return None
    wanted = args.peers == "on"
    if importlib.util.find_spec("llama_cpp") is None:
        if wanted:
            raise SystemExit("--peers on needs llama-cpp-python: run `make bench-peers`")
        return None
    try:
        checkpoint.gguf_file(args.model)
    except checkpoint.ModelLoadError:
        if wanted:
            raise
        return None
    from benchmarks import peers as peer_bench

    systems = "off,auto,ngram,llama_cpp,llama_cpp_lookup"
    argv = ["--model", args.model, "--out", str(args.out), "--max-tokens", str(args.max_tokens)]
    argv += ["--rounds", str(args.peer_rounds), "--limit", "1", "--systems", systems]
    print("llama.cpp installed: running the peers, alternating", file=sys.stderr, flush=True)
    report = peer_bench.run(argv)
    keep = ("tok_s", "decode_tok_s", "vs_llama_cpp", "decode_vs_llama_cpp")
    rows = {name: {k: row[k] for k in keep} for name, row in report["results"].items()}
    return {"command": report["config"]["command"], "results": rows}


def main(argv: list[str] | None = None) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"
    args = parse_args(argv)
    torch.manual_seed(0)
    machine = machine_info()
    print("measuring memory bandwidth", file=sys.stderr, flush=True)
    machine["memory_bandwidth_start_gb_s"] = memory_bandwidth() / 1e9
    engine = Engine.from_pretrained(
        args.model,
        dtype=args.dtype,
        backend=args.backend,
        weights=args.weights,
        draft_model=args.draft_model,
    )
    # The model's trained exit (`selfspec train-draft`), else the untuned default.
    exit_layer = args.exit_layer or engine.draft_config("early_exit").exit_layer
    prompts = load_prompts(args.prompts, engine, args.limit)
    gens = generators(engine, args, exit_layer)
    probe = BandwidthProbe()
    results, off_b1 = run_all(engine, args, prompts, gens, probe)
    kinds = list(dict.fromkeys(p.kind for p in prompts))
    machine["load_average_end"] = os.getloadavg()
    report = {
        "config": {
            "model": args.model,
            "model_name": engine.model_path.name,
            "draft_model": args.draft_model,
            "weights": engine.model.backend.describe()["weights"],
            "compute_dtype": str(engine.model.dtype).removeprefix("torch."),
            "backend": engine.model.backend.describe(),
            "max_tokens": args.max_tokens,
            "batch_sizes": args.batch_sizes,
            "systems": args.systems,
            "exit_layer": exit_layer,
            "prompts": str(args.prompts),
            "num_prompts": len(prompts),
            "kinds": kinds,
            "drafts": {s: draft_dict(c) for s, c in draft_configs(engine, exit_layer).items()},
        },
        "machine": machine,
        "roofline": roofline(probe.samples, weight_bytes(engine.model), off_b1, kinds),
        "headline": headline(results, kinds),
        "peers": peers(args),
        "results": results,
        "notes": NOTES,
    }
    write(report, args.out)
    return 0


def draft_dict(cfg: DraftConfig) -> dict:
    return asdict(cfg)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "engine.png")
    head = report["headline"]
    if head:
        print(
            f"best mode {head['best_mode']}: {head['best_tok_s']:.1f} tok/s, "
            f"{head['speedup_vs_hf_generate']:.2f}x transformers' generate at batch 1",
            file=sys.stderr,
        )
    print(f"wrote {out / 'engine.json'} and {out / 'engine.png'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
