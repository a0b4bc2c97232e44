"""Open-loop load through the gateway: conversations arrive at a given rate (Poisson or
in bursts), each of a few turns sent one after the other on one session, whatever the
fleet's speed. Reports throughput, latency percentiles, goodput under latency targets
and acceptance, for each drafting mode at each rate."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc

PROMPTS = Path(__file__).with_name("prompts.jsonl")
PCTS = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
FOLLOW_UPS = ("Go on.", "Summarise that in one sentence.", "Now say it more simply.")


@dataclass
class Targets:
    """A request is good when it meets both."""

    ttft_s: float = 5.0
    tpot_s: float = 0.25


@dataclass
class Turn:
    ttft: float
    tpot: float
    e2e: float
    tokens: int
    drafted: int
    accepted: int
    cached: int


@dataclass
class Outcome:
    turns: list[Turn] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


def conversations(n: int, turns: int, seed: int) -> list[list[dict]]:
    """`n` opening messages from the shipped prompt set; each conversation runs `turns`."""
    rows = [json.loads(x) for x in PROMPTS.read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    return [list(rng.choice(rows)["messages"]) for _ in range(n)]


def arrivals(n: int, rate: float, pattern: str, seed: int) -> list[float]:
    """Start times in seconds: Poisson at `rate`, or bursts of 4 at the same mean rate."""
    rng = random.Random(seed)
    if pattern == "bursty":
        return [4 * (i // 4) / rate + rng.random() * 0.05 for i in range(n)]
    t, times = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


async def one_turn(stub, session: str, messages, max_tokens: int, mode: str) -> tuple:
    req = pb.GenerateRequest(session_id=session, max_tokens=max_tokens, ignore_eos=True)
    req.messages.messages.extend(pb.Message(**m) for m in messages)
    req.draft.update({"mode": mode})
    start, first, text, last = time.perf_counter(), None, "", None
    async for response in stub.Generate(req, timeout=600):
        if response.token_ids and first is None:
            first = time.perf_counter()
        text += response.text
        last = response
    end = time.perf_counter()
    first = first or end
    u = last.usage
    n = u.completion_tokens
    turn = Turn(
        first - start,
        (end - first) / max(1, n - 1),
        end - start,
        n,
        u.drafted_tokens,
        u.accepted_tokens,
        u.cached_prompt_tokens,
    )
    return turn, text


async def conversation(stub, index: int, opening, turns: int, max_tokens: int, mode: str, out):
    messages = list(opening)
    session = f"{mode}-{index}-{random.getrandbits(32):08x}"
    for t in range(turns):
        try:
            turn, text = await one_turn(stub, session, messages, max_tokens, mode)
        except grpc.aio.AioRpcError as err:
            out.errors[err.code().name] = out.errors.get(err.code().name, 0) + 1
            return
        out.turns.append(turn)
        messages.append({"role": "assistant", "content": text})
        messages.append({"role": "user", "content": FOLLOW_UPS[t % len(FOLLOW_UPS)]})


async def run_rate(address: str, rate: float, mode: str, opts) -> tuple[Outcome, float]:
    """Start each conversation at its arrival time; wait for all; return the wall time."""
    starts = arrivals(opts.conversations, rate, opts.pattern, opts.seed)
    openings = conversations(opts.conversations, opts.turns, opts.seed)
    out = Outcome()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        t0 = time.perf_counter()

        async def later(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + starts[i] - time.perf_counter()))
            await conversation(stub, i, openings[i], opts.turns, opts.max_tokens, mode, out)

        await asyncio.gather(*(later(i) for i in range(len(starts))))
    return out, time.perf_counter() - t0


def summarize(out: Outcome, wall: float, targets: Targets) -> dict:
    turns = out.turns

    def pct(values: list[float], q: float) -> float | None:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    good = [t for t in turns if t.ttft <= targets.ttft_s and t.tpot <= targets.tpot_s]
    drafted = sum(t.drafted for t in turns)
    return {
        "requests": len(turns),
        "errors": out.errors,
        "wall_s": wall,
        "throughput_tok_s": sum(t.tokens for t in turns) / wall,
        "goodput_req_s": len(good) / wall,
        "good_fraction": len(good) / len(turns) if turns else 0.0,
        "acceptance": sum(t.accepted for t in turns) / drafted if drafted else 0.0,
        "cached_prompt_tokens": sum(t.cached for t in turns),
        **{
            name: {q: pct([getattr(t, name) for t in turns], v) for q, v in PCTS.items()}
            for name in ("ttft", "tpot", "e2e")
        },
    }


def plot(load: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = (
        ("ttft", "p90", "time to first token, p90 (s)"),
        ("tpot", "p90", "time per output token, p90 (s)"),
        ("e2e", "p90", "end-to-end latency, p90 (s)"),
        ("goodput_req_s", None, "goodput (good requests / s)"),
    )
    for ax, (metric, q, title) in zip(axes, panels, strict=True):
        for mode, by_rate in load.items():
            rates = sorted(by_rate, key=float)
            ys = [by_rate[r][metric][q] if q else by_rate[r][metric] for r in rates]
            ax.plot([float(r) for r in rates], ys, marker="o", label=f"drafting {mode}")
        ax.set_title(title)
        ax.set_xlabel("conversations started per second")
        ax.legend()
    fig.suptitle("Open-loop load through the gateway: drafting auto against off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
