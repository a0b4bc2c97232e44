"""How much a layer draft can pay on a model: agreement against cost, and the speedup
over plain decoding that the best conceivable implementation of each draft would give.

On the benchmark's prompts (`benchmarks/prompts.jsonl`, `--limit` of each kind, chat
template) the full model first writes its greedy answer, `--max-tokens` long. Then,
teacher-forced over those answers, every candidate draft's next-token choice is recorded
position by position, agreeing with the full model's or not:
- `exit`: early exits after each of `--exit-layers` layers, into the model's own head;
- `trained exit`: the same through an exit adapter trained here for each of
  `--train-layers` (`selfspec train-draft`'s training and local text, never these prompts);
- `skip`: sets of `--skip-sizes` sublayers (attention or MLP blocks), those whose
  skipping alone keeps agreement highest (one pass per sublayer ranks them).

Each candidate's speedup is replayed over its recorded agreements: a draft of k tokens
from position p accepts the run of agreements there (at most k) plus the full model's
own next token. Its cost is charged as the engine runs a layer draft (`drafting.layer`):
the layers below the first one the draft changes run once for each of the k + 1 rows,
shared with verification; each of the k draft steps reads the draft's weights above them;
verification runs the rest over k + 1 rows at the measured cost of a (k + 1)-token pass
(`Tuner`'s curve). A draft step is charged only the share of the model's weights its
layers read; its head, its adapter, attention and Python are free. No implementation of
the draft can beat that; `selfspec bench engine` measures the real steps, which cost
more. Per candidate: the speedup at the best fixed k, and with foresight (`oracle`: each
round drafts the number of tokens that makes the answer cheapest), which no rule for how
long to draft can beat; and whether any candidate's oracle reaches `--target`.

    selfspec bench frontier --weights bf16 --out benchmarks/results/draft-frontier
    python -m benchmarks.draft_frontier --exit-layers 8,24 --train-layers 8 --skip-sizes 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.engine import DEFAULT_PROMPTS, load_prompts, machine_info
from services.engine import Engine, checkpoint, exit_training
from services.engine.drafting import forced
from services.engine.drafting.tune import Tuner
from services.engine.model import LayerPlan

MAX_K = 8  # longest draft replayed
NOTES = {
    "agreement": "share of answer positions where the draft's next token is the full "
    "model's, teacher-forced over the full model's greedy answers",
    "shared": "share of the model's weights (LM head included) below the first layer the "
    "draft changes: run once per row, the draft's rows and verification's alike",
    "step": "share of the weights a draft step reads above `shared`; head and adapter free",
    "speedup": "tokens / cost replayed over the recorded agreements, at the best draft "
    "length k, with a round costing (k + 1) * shared + k * step + (1 - shared) * "
    "verify_cost[k]; plain decoding = 1",
    "oracle": "the same with foresight: each round drafts the number of tokens (up to the "
    "run the full model accepts, at most 8) that makes the whole answer cheapest; no rule "
    "for how long to draft does better",
    "training": "a trained exit's training: held-out agreement on its own local text "
    "before and after, data and time (`selfspec train-draft`)",
    "verify_cost": "time of a full pass over k + 1 tokens / one token, k = 0..8 (the tuner's)",
}


@dataclass
class Candidate:
    family: str  # exit, trained exit, skip
    name: str
    shared: float
    step: float
    hits: list[list[bool]] = field(repr=False)
    training: dict | None = None  # a trained exit's facts (`ExitAdapter.facts`)

    def agreement(self) -> float:
        return sum(map(sum, self.hits)) / max(1, sum(map(len, self.hits)))


def round_cost(drafted: int, shared: float, step: float, verify: list[float]) -> float:
    """A round of `drafted` draft steps and their verification, in plain steps."""
    return (drafted + 1) * shared + drafted * step + (1 - shared) * verify[drafted]


def replay(hits: list[list[bool]], shared: float, step: float, verify: list[float], k: int):
    """Speedup of drafting k tokens at every step, replayed over recorded agreements."""
    tokens, cost = 0, 0.0
    for seq in hits:
        p = 0
        while p < len(seq):
            run = 0
            while run < k and p + run < len(seq) and seq[p + run]:
                run += 1
            tokens += min(run + 1, len(seq) - p)
            cost += round_cost(k, shared, step, verify)
            p += run + 1
    return tokens / cost


def oracle(hits: list[list[bool]], shared: float, step: float, verify: list[float]) -> float:
    """Speedup with foresight: each round drafts the number of tokens (none up to the run
    the full model will accept, at most `MAX_K`) that makes the whole sequence cheapest.
    No rule for how long to draft beats it."""
    tokens, cost = 0, 0.0
    for seq in hits:
        n = len(seq)
        runs = [0] * (n + 1)  # agreements in a row from each position
        for p in range(n - 1, -1, -1):
            runs[p] = runs[p + 1] + 1 if seq[p] else 0
        cheapest = [0.0] * (n + 2)  # to produce the tokens from position p on
        for p in range(n - 1, -1, -1):
            cheapest[p] = min(
                round_cost(d, shared, step, verify) + cheapest[min(n, p + d + 1)]
                for d in range(min(runs[p], MAX_K) + 1)
            )
        tokens += n
        cost += cheapest[0]
    return tokens / cost


def best(c: Candidate, verify: list[float]) -> tuple[float, int]:
    """(speedup, k) at the best fixed draft length."""
    return max((replay(c.hits, c.shared, c.step, verify, k), k) for k in range(1, MAX_K + 1))


class Frontier:
    """The reference answers, the costs and the candidates' recorded agreements."""

    def __init__(self, engine: Engine, prompts: list[list[int]], max_tokens: int) -> None:
        self.engine, self.model = engine, engine.model
        self.tuner = Tuner(engine, max_tokens, prompts)  # answers and verification's curve
        self.sizes = forced.sublayer_sizes(engine)
        self.layer = self.sizes["attn"] + self.sizes["mlp"]

    def exit_hits(self, layer: int, adapter=None) -> list[list[bool]]:
        """Per answer position: does the exit after `layer` layers (through `adapter`)
        pick the full model's token?"""
        out = []
        for prompt, answer in self.tuner.sequences:
            tokens = prompt + answer
            below, _ = self.engine.runner.forced_states([tokens], layer)
            h = below[len(prompt) - 1 : len(tokens) - 1]
            with torch.inference_mode():
                h = adapter(h) if adapter is not None else h
                picks = self.model.logits(h).argmax(-1)
            out.append((picks == torch.tensor(answer, device=picks.device)).tolist())
        return out

    def plan_hits(self, plan: LayerPlan) -> list[list[bool]]:
        tokens = [p + a for p, a in self.tuner.sequences]
        start = [len(p) - 1 for p, _ in self.tuner.sequences]
        answers = [a for _, a in self.tuner.sequences]
        got = forced.hits(self.engine.runner, tokens, answers, start, plan)
        if got is None:
            raise RuntimeError("the KV pool has no room for the teacher-forced passes")
        return [h.tolist() for h in got]

    def exit(self, layer: int, adapter=None) -> Candidate:
        hits = self.exit_hits(layer, adapter)
        if adapter is None:
            return Candidate("exit", f"exit {layer}", layer * self.layer, 0.0, hits)
        name = f"trained exit {layer}"
        return Candidate("trained exit", name, layer * self.layer, 0.0, hits, adapter.facts)

    def skip(self, plan: LayerPlan) -> Candidate:
        first = plan.first_skipped
        above = (self.model.num_layers - first) * self.layer
        step = (
            above
            - len(plan.skip_attn) * self.sizes["attn"]
            - len(plan.skip_mlp) * self.sizes["mlp"]
        )
        name = f"skip {len(plan.skip_attn)} attn + {len(plan.skip_mlp)} mlp"
        return Candidate("skip", name, first * self.layer, step, self.plan_hits(plan))

    def skip_path(self, sizes: list[int], progress) -> list[Candidate]:
        """Skip sets of `sizes` sublayers: those whose skipping alone keeps agreement
        highest, ranked by one teacher-forced pass each."""
        L = self.model.num_layers
        ranked = []
        for kind in ("attn", "mlp"):
            for i in range(L):
                one, none = frozenset({i}), frozenset()
                plan = LayerPlan(one, none) if kind == "attn" else LayerPlan(none, one)
                ranked.append((-self.tuner.agreement(plan), kind, i))
            progress(f"every {kind} sublayer skipped alone")
        ranked.sort()
        path = []
        for n in sizes:
            chosen = ranked[:n]
            attn = frozenset(i for _, kind, i in chosen if kind == "attn")
            mlp = frozenset(i for _, kind, i in chosen if kind == "mlp")
            path.append(self.skip(LayerPlan(attn, mlp)))
            progress(f"{path[-1].name}: agreement {path[-1].agreement():.2f}")
        return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="selfspec bench frontier", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--weights", default="bf16", choices=["auto", "gguf", "bf16", "fp16", "fp32"])
    p.add_argument("--backend", default=None, choices=["cpu", "onednn", "torch", "triton"])
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--limit", type=int, default=1, help="prompts of each kind")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--exit-layers", type=_ints, default=[4, 8, 12, 16, 20, 24, 26, 28])
    p.add_argument("--train-layers", type=_ints, default=[8, 16, 24])
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument(
        "--skip-sizes", type=_ints, default=[1, 2, 4, 8, 12, 16, 24, 32], help="sublayers skipped"
    )
    p.add_argument("--target", type=float, default=1.3, help="the speedup looked for")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/draft-frontier"))
    return p.parse_args(argv)


def bad_args(args, layers: int) -> str | None:
    """What is wrong with the layers and sizes asked for, on a model of `layers` layers."""
    exits = [n for n in args.exit_layers + args.train_layers if not 1 <= n < layers]
    if exits:
        return f"exit layers must be between 1 and {layers - 1}; got {exits}"
    sizes = [n for n in args.skip_sizes if not 1 <= n < 2 * layers]
    if sizes:
        return f"skip sizes must be between 1 and {2 * layers - 1} sublayers; got {sizes}"
    return None


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def candidates(frontier: Frontier, args, text: list[list[int]], progress) -> list[Candidate]:
    """The exits, trained exits (on token pieces `text`) and skip sets `args` names."""
    found = []
    for layer in args.exit_layers:
        found.append(frontier.exit(layer))
        progress(f"{found[-1].name}: agreement {found[-1].agreement():.2f}")
    key = checkpoint.model_key(frontier.engine.model_path)
    for layer in args.train_layers:
        adapter = exit_training.train(
            frontier.engine, key, layer, steps=args.train_steps, pieces=text, quiet=True
        )
        found.append(frontier.exit(layer, adapter))
        progress(f"{found[-1].name}: agreement {found[-1].agreement():.2f}")
    if args.skip_sizes:
        found += frontier.skip_path(args.skip_sizes, progress)
    return found


def row(c: Candidate, verify: list[float]) -> dict:
    speedup, k = best(c, verify)
    return {
        "family": c.family,
        "name": c.name,
        "agreement": round(c.agreement(), 4),
        "shared": round(c.shared, 4),
        "step": round(c.step, 4),
        "speedup": round(speedup, 4),
        "k": k,
        "oracle": round(oracle(c.hits, c.shared, c.step, verify), 4),
        **({"training": c.training} if c.training else {}),
    }


def write(args, frontier: Frontier, rows: list[dict], prompt_ids: list[str], argv) -> dict:
    """frontier.json and frontier.png under `args.out`; returns the report."""
    top = max(rows, key=lambda r: r["oracle"])
    report = {
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model_name": frontier.engine.model_path.name,
            "backend": str(frontier.model.backend),
            "prompt_ids": prompt_ids,
            "command": "selfspec bench frontier "
            + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "machine": machine_info(),
        "verify_cost": frontier.tuner.verify,
        "notes": NOTES,
        "best": top,
        "reaches_target": top["oracle"] >= args.target,
        "candidates": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "frontier.png")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()

    def progress(message: str) -> None:
        print(
            f"frontier: {message} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True
        )

    engine = Engine.from_pretrained(args.model, weights=args.weights, backend=args.backend)
    problem = bad_args(args, engine.model.num_layers)
    if problem:
        print(f"selfspec bench frontier: {problem}", file=sys.stderr)
        return 2
    prompts = load_prompts(args.prompts, engine, args.limit)
    progress(f"{len(prompts)} prompts; the full model's answers and verification's cost")
    frontier = Frontier(engine, [p.ids for p in prompts], args.max_tokens)
    tokens = exit_training.ANSWER_TOKENS, exit_training.TEXT_TOKENS  # train-draft's text
    text = exit_training.texts(engine, *tokens, quiet=True) if args.train_layers else []
    found = candidates(frontier, args, text, progress)
    rows = [row(c, frontier.tuner.verify) for c in found]
    report = write(args, frontier, rows, [p.id for p in prompts], argv)
    top = report["best"]
    print(table(rows), file=sys.stderr)
    print(
        f"best: {top['name']}, x{top['speedup']:.2f} at k={top['k']}, x{top['oracle']:.2f} "
        f"with foresight; wrote {args.out}",
        file=sys.stderr,
    )
    return 0


def table(rows: list[dict]) -> str:
    lines = [
        f"{'draft':28} {'agree':>6} {'shared':>7} {'step':>6} {'speedup':>8} {'k':>3} {'oracle':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r['name']:28} {r['agreement']:6.3f} {r['shared']:7.3f} {r['step']:6.3f} "
            f"{r['speedup']:8.3f} {r['k']:3d} {r['oracle']:7.3f}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cfg = report["candidates"], report["config"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    for family in dict.fromkeys(r["family"] for r in rows):
        part = [r for r in rows if r["family"] == family]
        cost = [r["shared"] + r["step"] for r in part]
        left.plot(cost, [r["agreement"] for r in part], "o-", label=family)
        line = right.plot(cost, [r["speedup"] for r in part], "o-", label=f"{family}, best k")
        right.plot(
            cost,
            [r["oracle"] for r in part],
            "x--",
            color=line[0].get_color(),
            label=f"{family}, with foresight",
        )
    left.set_xlabel("weights a draft pass reads (share of the model)")
    left.set_ylabel("agreement with the full model")
    right.set_xlabel("weights a draft pass reads (share of the model)")
    right.set_ylabel("speedup over plain decoding (bound: weights read only)")
    right.axhline(cfg["target"], color="red", ls="--", lw=1, label=f"target x{cfg['target']}")
    right.axhline(1.0, color="grey", ls=":", lw=1)
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    m = report["machine"]
    fig.suptitle(
        f"layer drafts of {cfg['model_name']} ({cfg['weights']}), {cfg['max_tokens']} tokens of "
        f"{len(cfg['prompt_ids'])} prompts - {m['cpu']}, {m['torch_threads']} threads",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
