"""The gateway's own cost: the same requests to the engine called directly and through
the whole path (gateway, Serve's gRPC proxy, engine replica), in one run.

`selfspec bench serve [--concurrency 1,8] [--requests 16] [--max-tokens 64]` starts a
local fleet with one replica, runs every concurrency level against the engine in this
process and then through the gateway (one after the other, so they never share the CPU),
and writes `serve.json` and `serve.png`: time to first token, time per output token
and end-to-end latency, and the ratio of each, gateway over direct.
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
    p.add_argument("--draft", default="auto")
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
    from services.engine import SamplingParams

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
    options = FleetOptions(config=config, listen=f"127.0.0.1:{free_port()}", controller=False)
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
    fig.suptitle("The gateway's cost: engine called directly against the whole gRPC path")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    messages = load_messages(args.requests)
    import grpc
    import torch

    from services.engine import Engine
    from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc

    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained("default", dtype="bfloat16", kv_cache_bytes=1 << 29)
    print("direct: the engine in this process", flush=True)
    send = direct_sender(engine, args.max_tokens, args.draft)
    direct = asyncio.run(measure(send, messages, levels, "direct"))
    engine.shutdown()
    del engine
    fleet = start_fleet(args, say=lambda line: print(line, file=sys.stderr, flush=True))
    try:
        print(f"gateway: grpc://{fleet.options.listen} -> Serve -> one replica", flush=True)

        async def through_gateway() -> dict:
            async with grpc.aio.insecure_channel(fleet.options.listen) as channel:
                send = gateway_sender(pb_grpc.GenerationStub(channel), args.max_tokens, args.draft)
                return await measure(send, messages, levels, "gateway")

        gateway = asyncio.run(through_gateway())
    finally:
        fleet.stop()
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "direct": {str(c): r for c, r in direct.items()},
        "gateway": {str(c): r for c, r in gateway.items()},
        "overhead": {str(c): overhead(direct[c], gateway[c]) for c in levels},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "serve.png")
    for c in levels:
        o = report["overhead"][str(c)]
        print(
            f"concurrency {c}: gateway/direct  ttft {o['ttft']:.3f}x  "
            f"tpot {o['tpot']:.3f}x  e2e {o['e2e']:.3f}x"
        )
    print(f"wrote {out / 'serve.json'} and {out / 'serve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
