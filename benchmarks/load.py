"""Open-loop load through the gateway: conversations arrive at a given rate (Poisson or
in bursts), each of a few turns sent one after the other on one session, whatever the
fleet's speed. Reports throughput, latency percentiles, goodput under latency targets
and acceptance, for each drafting mode at each rate. The turns go through the gateway's
gRPC API (`GrpcTurns`) or its OpenAI HTTP API with the official `openai` client
(`OpenAITurns`), streaming either way."""

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


def _turn(start: float, first: float | None, n: int, drafted: int, accepted: int, cached: int):
    end = time.perf_counter()
    first = first or end
    return Turn(
        first - start, (end - first) / max(1, n - 1), end - start, n, drafted, accepted, cached
    )


class GrpcTurns:
    """Turns through the gateway's gRPC API (`Generate`, streaming)."""

    errors = (grpc.aio.AioRpcError,)

    def __init__(self, address: str) -> None:
        self.address = address

    async def __aenter__(self) -> GrpcTurns:
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = pb_grpc.GenerationStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    @staticmethod
    def error_name(err: grpc.aio.AioRpcError) -> str:
        return err.code().name

    async def turn(self, session: str, messages, max_tokens: int, mode: str) -> tuple[Turn, str]:
        req = pb.GenerateRequest(session_id=session, max_tokens=max_tokens, ignore_eos=True)
        req.messages.messages.extend(pb.Message(**m) for m in messages)
        req.draft.update({"mode": mode})
        start, first, text, last = time.perf_counter(), None, "", None
        async for response in self.stub.Generate(req, timeout=600):
            if response.token_ids and first is None:
                first = time.perf_counter()
            text += response.text
            last = response
        u = last.usage
        turn = _turn(
            start,
            first,
            u.completion_tokens,
            u.drafted_tokens,
            u.accepted_tokens,
            u.cached_prompt_tokens,
        )
        return turn, text


class OpenAITurns:
    """Turns through the gateway's OpenAI HTTP API with the official client: streamed chat
    completions, the usage in the last chunk (`stream_options.include_usage`), selfspec's
    `draft`, `session_id` and `ignore_eos` in the body."""

    def __init__(self, address: str, api_key: str = "none") -> None:
        import openai

        self.errors = (openai.APIError,)
        self.client = openai.AsyncOpenAI(
            base_url=f"http://{address}/v1", api_key=api_key, max_retries=0, timeout=600
        )

    async def __aenter__(self) -> OpenAITurns:
        self.model = (await self.client.models.list()).data[0].id
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    @staticmethod
    def error_name(err) -> str:
        return f"HTTP {getattr(err, 'status_code', None) or type(err).__name__}"

    async def turn(self, session: str, messages, max_tokens: int, mode: str) -> tuple[Turn, str]:
        start, first, text, usage = time.perf_counter(), None, "", None
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"draft": {"mode": mode}, "session_id": session, "ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content and first is None:
                    first = time.perf_counter()
                text += choice.delta.content or ""
        details = usage.prompt_tokens_details
        turn = _turn(
            start,
            first,
            usage.completion_tokens,
            getattr(usage, "drafted_tokens", 0),
            getattr(usage, "accepted_tokens", 0),
            (details.cached_tokens or 0) if details else 0,
        )
        return turn, text


async def conversation(turns_api, index: int, opening, turns: int, max_tokens, mode: str, out):
    messages = list(opening)
    session = f"{mode}-{index}-{random.getrandbits(32):08x}"
    for t in range(turns):
        try:
            turn, text = await turns_api.turn(session, messages, max_tokens, mode)
        except turns_api.errors as err:
            name = turns_api.error_name(err)
            out.errors[name] = out.errors.get(name, 0) + 1
            return
        out.turns.append(turn)
        messages.append({"role": "assistant", "content": text})
        messages.append({"role": "user", "content": FOLLOW_UPS[t % len(FOLLOW_UPS)]})


async def run_rate(turns_api, rate: float, mode: str, opts) -> tuple[Outcome, float]:
    """Start each conversation at its arrival time; wait for all; return the wall time.
    `turns_api`: a `GrpcTurns` or `OpenAITurns`, not yet entered."""
    starts = arrivals(opts.conversations, rate, opts.pattern, opts.seed)
    openings = conversations(opts.conversations, opts.turns, opts.seed)
    out = Outcome()
    async with turns_api as api:
        t0 = time.perf_counter()

        async def later(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + starts[i] - time.perf_counter()))
            await conversation(api, i, openings[i], opts.turns, opts.max_tokens, mode, out)

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


def plot(load: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = (
        ("ttft", "p90", "time to first token, p90 (s)"),
        ("tpot", "p90", "inter-token latency, p90 (s)"),
        ("e2e", "p90", "end-to-end latency, p90 (s)"),
        ("goodput_req_s", None, "goodput (good requests / s)"),
    )
    for ax, (metric, q, panel) in zip(axes, panels, strict=True):
        for mode, by_rate in load.items():
            rates = sorted(by_rate, key=float)
            ys = [by_rate[r][metric][q] if q else by_rate[r][metric] for r in rates]
            ax.plot([float(r) for r in rates], ys, marker="o", label=f"drafting {mode}")
        ax.set_title(panel)
        ax.set_xlabel("conversations started per second")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
