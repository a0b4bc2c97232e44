"""Search a model's skip set: which sublayers a draft may leave out.

Candidates are scored without generating: the full model first writes a
reference continuation of a few calibration prompts; a candidate's draft then
runs teacher-forced over the same tokens in one pass, and its agreement with
the full model's next-token choices estimates acceptance. With the draft's
cost (the share of weights it reads) and the measured cost of verification,
the speculative-decoding speedup model ranks the candidates; the best few are
then timed in real generation, and the fastest is saved.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from services.common.params import DraftConfig, SamplingParams
from services.common.speedup import best_length
from services.engine.drafting.forced import agreement, sublayer_sizes
from services.engine.model import LayerPlan

log = logging.getLogger(__name__)

CALIBRATION = [
    "Summarise the plot of a detective story in which a lighthouse keeper disappears.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "What are three good habits for staying focused while working from home?",
    "Explain the difference between a list and a tuple in Python.",
]
NO_ROOM = "tune: the KV pool has no room for the calibration passes; raise kv_cache_bytes"


@dataclass
class Score:
    skip_attn: tuple[int, ...]
    skip_mlp: tuple[int, ...]
    agreement: float  # share of positions where the draft picks the full model's token
    cost: float  # draft step time relative to a full step
    max_draft: int
    speedup: float  # predicted tokens per unit time against plain decoding


class Tuner:
    def __init__(self, engine, max_tokens: int, prompts: list[list[int]] | None = None) -> None:
        """`prompts`: token ids to calibrate on (default: `CALIBRATION`, chat-formatted)."""
        self.engine = engine
        self.model = engine.model
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        prompts = prompts or [engine.encode(p, chat=True) for p in CALIBRATION]
        outs = engine.generate(prompts, params, "off")
        self.sequences = [(p, o.token_ids) for p, o in zip(prompts, outs, strict=True)]
        self.sizes = sublayer_sizes(engine)
        self.verify = self._verify_costs(max_k=8)
        print(
            "tune: verify cost by drafted tokens: " + " ".join(f"{v:.2f}" for v in self.verify),
            file=sys.stderr,
            flush=True,
        )

    @torch.inference_mode()
    def _verify_costs(self, max_k: int) -> list[float]:
        """Time of a full pass over k + 1 tokens relative to one token, for k = 0..max_k."""
        times = [min(self._time_pass(k + 1) for _ in range(5)) for k in range(max_k + 1)]
        # More tokens never cost less: smooth timing noise into a non-decreasing curve.
        return [max(times[: k + 1]) / times[0] for k in range(max_k + 1)]

    def _time_pass(self, n: int) -> float:
        """Seconds of one full pass over n tokens, as a verification runs it."""
        t0 = time.perf_counter()
        if self.engine.runner.forced([list(range(n))], bulk=False) is None:
            raise RuntimeError(NO_ROOM)
        return time.perf_counter() - t0

    def predict(self, alpha: float, cost: float) -> tuple[float, int]:
        """Best (speedup, k) over k >= 1 for drafts agreeing with probability alpha each,
        a draft step costing `cost` and verification as timed. Under 1, drafting does not
        pay; the search still climbs towards cheaper drafts."""
        extra = [v - 1.0 for v in self.verify[1:]]  # verifying k drafts, beyond one token
        return best_length([alpha] * len(extra), cost, extra, plain=False)

    def agreement(self, plan: LayerPlan, shortlist: int = 0) -> float:
        """Teacher-forced, all calibration sequences in one pass: how often the draft's
        next token equals the full model's (with a head over `shortlist` ids plus the
        ids of the sequence, when given)."""
        tokens = [prompt + output for prompt, output in self.sequences]
        start = [len(prompt) - 1 for prompt, _ in self.sequences]
        targets = [output for _, output in self.sequences]
        got = agreement(self.engine.runner, tokens, targets, start, plan, shortlist)
        if got is None:
            raise RuntimeError(NO_ROOM)
        return got[0] / got[1]

    def with_shortlist(self, sc: Score) -> tuple[Score, int]:
        """The best of no shortlist and a few shortlist sizes for a scored skip set."""
        plan = LayerPlan(frozenset(sc.skip_attn), frozenset(sc.skip_mlp))
        best, size = sc, 0
        for s in (4096, 8192, 16384):
            alpha = self.agreement(plan, s)
            cost = sc.cost - self.sizes["head"] * (1 - s / self.model.vocab_size)
            speedup, k = self.predict(alpha, cost)
            if speedup > best.speedup:
                best, size = Score(sc.skip_attn, sc.skip_mlp, alpha, cost, k, speedup), s
        return best, size

    def score(self, skip_attn: set[int], skip_mlp: set[int]) -> Score:
        plan = LayerPlan(frozenset(skip_attn), frozenset(skip_mlp))
        alpha = self.agreement(plan)
        s = self.sizes
        cost = 1 - len(skip_attn) * s["attn"] - len(skip_mlp) * s["mlp"]
        speedup, k = self.predict(alpha, cost)
        return Score(tuple(sorted(skip_attn)), tuple(sorted(skip_mlp)), alpha, cost, k, speedup)

    def search(self, budget_s: float, per_round: int = 12) -> list[Score]:
        """Greedy: add, one at a time, the sublayer whose skipping most raises the predicted
        speedup, among `per_round` sublayers drawn at random each round."""
        L = self.model.num_layers
        rng = random.Random(0)
        deadline = time.monotonic() + budget_s
        attn: set[int] = set()
        mlp: set[int] = set()
        best: list[Score] = []
        while time.monotonic() < deadline:
            round_best = None
            left = [("attn", i) for i in range(L) if i not in attn]
            left += [("mlp", i) for i in range(L) if i not in mlp]
            for kind, i in rng.sample(left, min(per_round, len(left))):
                chosen = attn if kind == "attn" else mlp
                if time.monotonic() > deadline:
                    break
                chosen.add(i)
                sc = self.score(attn, mlp)
                chosen.discard(i)
                if round_best is None or sc.speedup > round_best[0].speedup:
                    round_best = (sc, kind, i)
            if round_best is None or (best and round_best[0].speedup < 0.8 * best[0].speedup):
                break
            sc, kind, i = round_best
            (attn if kind == "attn" else mlp).add(i)
            best.append(sc)
            best.sort(key=lambda x: -x.speedup)
            print(
                f"tune: skip {len(attn)} attn + {len(mlp)} mlp: agreement {sc.agreement:.2f}, "
                f"cost {sc.cost:.2f}, k={sc.max_draft}, predicted x{sc.speedup:.2f}",
                file=sys.stderr,
                flush=True,
            )
        return best

    def measure(self, cfg: DraftConfig) -> float:
        """Real tokens per second of generating the calibration prompts with `cfg`."""
        params = SamplingParams(max_tokens=len(self.sequences[0][1]), ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.engine.generate([p for p, _ in self.sequences], params, cfg)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


def tune(engine, out: str | Path | None = None, budget_s: float = 600.0, max_tokens: int = 48):
    """Search, time the best candidates, and save the winner as the model's profile."""
    from services.engine.profile import profile_path

    tuner = Tuner(engine, max_tokens)
    candidates = tuner.search(budget_s)[:3]
    measured = [("off", tuner.measure(DraftConfig(mode="off")), None)]
    for sc in candidates:
        sc, shortlist = tuner.with_shortlist(sc)
        cfg = DraftConfig(
            mode="skip",
            skip_attn=sc.skip_attn,
            skip_mlp=sc.skip_mlp,
            max_draft=max(1, sc.max_draft),
            shortlist=shortlist,
        )
        measured.append(("skip", tuner.measure(cfg), (cfg, sc)))
        print(
            f"tune: measured {measured[-1][1]:.1f} tok/s (off: {measured[0][1]:.1f})",
            file=sys.stderr,
            flush=True,
        )
    _, tps, winner = max(measured[1:], key=lambda m: m[1])
    cfg, sc = winner
    path = Path(out) if out else profile_path(engine.model_path)
    record = {
        # auto picks each step's length itself; the tuned skip length is kept as evidence.
        "draft": {**asdict(cfg), "max_draft": max(4, cfg.max_draft)},
        "evidence": {
            "agreement": sc.agreement,
            "draft_cost": sc.cost,
            "predicted_speedup": sc.speedup,
            "skip_max_draft": cfg.max_draft,
            "measured_tokens_per_s": tps,
            "off_tokens_per_s": measured[0][1],
            "verify_cost": tuner.verify,
            "weights_dtype": str(engine.model.store_dtype).removeprefix("torch."),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
