"""`selfspec bench serve`: the fleet under load, in two parts, one run.

1. Overhead: the same requests to the engine called directly (in this process) and
   through the whole path (gateway, Serve's gRPC proxy, engine replica), at each
   `--concurrency`, one path after the other so they never share the CPU: time to first
   token, time per output token, end-to-end latency, and gateway-over-direct ratios.
2. Load (`benchmarks/load.py`): open-loop arrivals of multi-turn conversations at each
   of `--rates`, drafting `auto` against `off` in the same run: throughput, latency
   percentiles, goodput under `--slo-ttft`/`--slo-tpot`, acceptance.

`--api openai` sends both parts to the gateway's OpenAI HTTP API with the official
`openai` client instead of its gRPC API.

Writes `serve.json`, `serve_overhead.png` and `serve_load.png` under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import load

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROMPTS = Path(__file__).with_name("prompts.jsonl")


@dataclass
class Timing:
    ttft: float  # seconds to the first token
    tpot: float  # seconds per output token after the first
    e2e: float
    tokens: int


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="selfspec bench serve", description=__doc__)
    p.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    p.add_argument("--requests", type=int, default=16, help="requests per level and path")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--draft", default="auto", help="drafting of the overhead part")
    p.add_argument("--rates", default="0.1,0.2,0.4", help="conversations started per second")
    p.add_argument("--conversations", type=int, default=8, help="per rate and mode")
    p.add_argument("--turns", type=int, default=2, help="turns per conversation")
    p.add_argument("--pattern", choices=["poisson", "bursty"], default="poisson")
    p.add_argument("--modes", default="auto,off", help="drafting modes compared under load")
    p.add_argument("--slo-ttft", type=float, default=5.0, help="seconds; goodput target")
    p.add_argument("--slo-tpot", type=float, default=0.25, help="seconds; goodput target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", choices=["overhead", "load"], help="leave one part out")
    p.add_argument(
        "--api",
        choices=["grpc", "openai"],
        default="grpc",
        help="the gateway API the requests go through: gRPC, or OpenAI HTTP (`openai` client)",
    )
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def load_messages(n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)]["messages"] for i in range(n)]


async def run_level(send, messages: list[list[dict]], concurrency: int) -> list[Timing]:
    """Send every request, at most `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(m: list[dict]) -> Timing:
        async with gate:
            return await send(m)

    return list(await asyncio.gather(*(one(m) for m in messages)))


def timing(start: float, first: float | None, end: float, tokens: int) -> Timing:
    first = first or end
    return Timing(first - start, (end - first) / max(1, tokens - 1), end - start, tokens)


def direct_sender(engine, max_tokens: int, draft: str):
    from services.common.params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    async def send(messages: list[dict]) -> Timing:
        start, first, tokens = time.perf_counter(), None, 0
        async for delta in engine.submit(messages, params, draft):
            if delta.token_ids and first is None:
                first = time.perf_counter()
            tokens += len(delta.token_ids)
        return timing(start, first, time.perf_counter(), tokens)

    return send


def gateway_sender(stub, max_tokens: int, draft: str):
    from services.gen.selfspec.v1 import generation_pb2 as pb

    async def send(messages: list[dict]) -> Timing:
        req = pb.GenerateRequest(max_tokens=max_tokens, ignore_eos=True)
        req.messages.messages.extend(pb.Message(**m) for m in messages)
        req.draft.update({"mode": draft})
        start, first, tokens = time.perf_counter(), None, 0
        async for response in stub.Generate(req, timeout=600):
            if response.token_ids and first is None:
                first = time.perf_counter()
            tokens += len(response.token_ids)
        return timing(start, first, time.perf_counter(), tokens)

    return send


def openai_sender(client, model: str, max_tokens: int, draft: str):
    async def send(messages: list[dict]) -> Timing:
        start, first, tokens = time.perf_counter(), None, 0
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"draft": {"mode": draft}, "ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return timing(start, first, time.perf_counter(), tokens)

    return send


def summarize(timings: list[Timing]) -> dict:
    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    out = {"requests": len(timings), "tokens": sum(t.tokens for t in timings)}
    for name in ("ttft", "tpot", "e2e"):
        values = [getattr(t, name) for t in timings]
        out[name] = {
            "mean": statistics.fmean(values),
            "p50": pct(values, 0.5),
            "p90": pct(values, 0.9),
        }
    return out


def overhead(direct: dict, gateway: dict) -> dict:
    return {k: gateway[k]["mean"] / direct[k]["mean"] for k in ("ttft", "tpot", "e2e")}


def start_fleet(args: argparse.Namespace, say):
    from services.serve.local import DEFAULT_CONFIG, Fleet, FleetOptions, free_port, load_config

    config = load_config(DEFAULT_CONFIG)
    config["http_options"]["port"] = free_port()
    config["grpc_options"]["port"] = free_port()
    app = config["applications"][0]
    app["args"].update(threads=args.threads)
    (engine,) = app["deployments"]
    engine.pop("autoscaling_config", None)
    engine["num_replicas"] = 1
    options = FleetOptions(
        config=config,
        listen=f"127.0.0.1:{free_port()}",
        http_listen=f"127.0.0.1:{free_port()}",
        controller=False,
    )
    return Fleet(options, say=say).start()


async def measure(send, messages, levels: list[int], label: str) -> dict[int, dict]:
    await run_level(send, messages[:2], 2)  # warm up
    results = {}
    for c in levels:
        t0 = time.perf_counter()
        results[c] = summarize(await run_level(send, messages, c))
        print(f"  {label:8s} concurrency {c:2d}: {time.perf_counter() - t0:6.1f} s", flush=True)
    return results


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [int(c) for c in report["direct"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric, title in zip(
        axes,
        ("ttft", "tpot", "e2e"),
        ("time to first token", "time per output token", "end-to-end latency"),
        strict=True,
    ):
        for path_name in ("direct", "gateway"):
            values = [report[path_name][str(c)][metric]["mean"] * 1000 for c in levels]
            ax.plot(levels, values, marker="o", label=path_name)
        ax.set_title(title)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("ms (mean)")
        ax.set_xticks(levels)
        ax.legend()
    api = "OpenAI HTTP" if report.get("api") == "openai" else "gRPC"
    fig.suptitle(f"The gateway's cost: engine called directly against the whole {api} path")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def overhead_part(args, fleet) -> dict:
    """The engine direct, then the same requests through the gateway."""
    import torch

    from services.engine import Engine

    levels = [int(c) for c in args.concurrency.split(",")]
    messages = load_messages(args.requests)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained("default", dtype="bfloat16", kv_cache_bytes=1 << 29)
    print("overhead: the engine in this process", flush=True)
    direct = asyncio.run(
        measure(direct_sender(engine, args.max_tokens, args.draft), messages, levels, "direct")
    )
    backend = engine.model.backend.describe()
    engine.shutdown()
    torch.set_num_threads(threads)
    gateway = asyncio.run(through_gateway(args, fleet, messages, levels))
    for c in levels:
        o = overhead(direct[c], gateway[c])
        print(
            f"  concurrency {c}: gateway/direct ttft {o['ttft']:.3f}x tpot {o['tpot']:.3f}x "
            f"e2e {o['e2e']:.3f}x",
            flush=True,
        )
    return {
        "api": args.api,
        "backend": backend,
        "direct": {str(c): r for c, r in direct.items()},
        "gateway": {str(c): r for c, r in gateway.items()},
        "ratio": {str(c): overhead(direct[c], gateway[c]) for c in levels},
    }


async def through_gateway(args, fleet, messages, levels: list[int]) -> dict:
    """The overhead part's requests through the gateway, by `args.api`."""
    if args.api == "openai":
        import openai

        address = fleet.options.http_listen
        print(f"overhead: http://{address}/v1 -> Serve -> one replica", flush=True)
        client = openai.AsyncOpenAI(base_url=f"http://{address}/v1", api_key="none", max_retries=0)
        async with client:
            model = (await client.models.list()).data[0].id
            send = openai_sender(client, model, args.max_tokens, args.draft)
            return await measure(send, messages, levels, "gateway")
    import grpc

    from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc

    print(f"overhead: grpc://{fleet.options.listen} -> Serve -> one replica", flush=True)
    async with grpc.aio.insecure_channel(fleet.options.listen) as channel:
        send = gateway_sender(pb_grpc.GenerationStub(channel), args.max_tokens, args.draft)
        return await measure(send, messages, levels, "gateway")


def turns_api(args, fleet) -> load.GrpcTurns | load.OpenAITurns:
    if args.api == "openai":
        return load.OpenAITurns(fleet.options.http_listen)
    return load.GrpcTurns(fleet.options.listen)


def load_part(args, fleet) -> dict:
    """Each drafting mode at each arrival rate, through the gateway."""
    targets = load.Targets(args.slo_ttft, args.slo_tpot)
    results: dict[str, dict] = {}
    for mode in args.modes.split(","):
        for rate in [float(r) for r in args.rates.split(",")]:
            t0 = time.perf_counter()
            outcome, wall = asyncio.run(load.run_rate(turns_api(args, fleet), rate, mode, args))
            row = load.summarize(outcome, wall, targets)
            results.setdefault(mode, {})[str(rate)] = row
            print(
                f"  load {mode:5s} {rate:5.2f}/s: {row['requests']} requests, "
                f"{row['throughput_tok_s']:.1f} tok/s, good {row['good_fraction']:.0%}, "
                f"errors {row['errors'] or 0} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return {"api": args.api, "targets": vars(targets), "by_mode": results}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.engine import cpu_model

    report: dict = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "cpu": cpu_model(),
        "threads": os.cpu_count(),
    }
    fleet = start_fleet(args, say=lambda line: print(line, file=sys.stderr, flush=True))
    try:
        if args.skip != "overhead":
            report["overhead"] = overhead_part(args, fleet)
            plot(report["overhead"], out / "serve_overhead.png")
        if args.skip != "load":
            report["load"] = load_part(args, fleet)
            api = "the OpenAI HTTP API" if args.api == "openai" else "gRPC"
            title = f"Open-loop load through the gateway ({api}): drafting auto against off"
            load.plot(report["load"]["by_mode"], out / "serve_load.png", title)
    finally:
        fleet.stop()
    (out / "serve.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'serve.json'} and the plots beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
