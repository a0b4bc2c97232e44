"""The fleet controller adapting drafting: acceptance and tokens per second over time.

In one process: a real `redis-server` on a free port, `--replicas` engine replicas of
the model (sharing its weights, each with its own KV pool, loop and FleetLink), and
a controller. Every replica starts from a deliberately poor skip set. In rounds, each
replica serves the same prompt mix (greedy, concurrently), with the fleet's config
and then with drafting off for reference; between rounds the engines
idle for `--pause` seconds, the spare moments in which replicas score the
controller's skip-set candidates. Each round records the config version the
replicas run, its skip set and mode, the acceptance of what was drafted, and tokens
per second. Writes controller.json and controller.png.

    python -m benchmarks.controller --duration 120 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [
    "Write a Python function that returns the square of a number.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits and their colours.",
    "What is the capital of France? Answer in one sentence.",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selfspec bench controller",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="float32", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--backend", default=None, choices=("cpu", "onednn", "torch", "triton"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--duration", type=float, default=150.0, help="seconds of rounds")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--pause", type=float, default=3.0, help="idle seconds between rounds")
    p.add_argument("--modes", default="skip", help="modes decisions may choose (comma list)")
    p.add_argument("--min-positions", type=int, default=150)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server is not installed: apt-get install redis-server", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with _redis() as url:
        report = _run(args, url)
    (args.out / "controller.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, args.out / "controller.png")
    first, last = report["rounds"][0], report["rounds"][-1]
    print(
        f"acceptance {first['acceptance']:.2f} -> {last['acceptance']:.2f}, "
        f"tok/s vs off x{first['ratio_to_off']:.2f} -> x{last['ratio_to_off']:.2f}, "
        f"versions {first['version']} -> {last['version']}; "
        f"wrote {args.out / 'controller.json'} and controller.png",
        file=sys.stderr,
    )
    return 0


class _redis:
    """A throwaway redis-server on a free loopback port."""

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.dir = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.name,
            ],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        from services.common.redis_schema import connect

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                connect(url).ping()
                return url
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.dir.cleanup()


def _run(args, url: str) -> dict:
    from services.common.redis_schema import model_key
    from services.controller.controller import Controller, Settings
    from services.engine import DraftConfig, Engine, SamplingParams
    from services.serve.fleet_link import FleetLink

    base = Engine.from_pretrained(args.model, dtype=args.dtype, backend=args.backend)
    middle = tuple(range(2, 2 * base.model.num_layers // 3))
    poor = DraftConfig(mode="skip", skip_attn=middle, skip_mlp=middle, max_draft=3)
    engines = [
        Engine(base.model, base.tokenizer, base.model_path, kv_cache_bytes=128 << 20, draft=poor)
        for _ in range(args.replicas)
    ]
    links = [
        FleetLink(e, url, "bench", f"replica-{i}", interval_s=0.5, poll_s=0.5)
        for i, e in enumerate(engines)
    ]
    modes = tuple(m for m in args.modes.split(",") if m)
    settings = Settings(
        lease_s=3.0,
        tick_s=0.25,
        decide_every_s=2.0,
        min_positions=args.min_positions,
        round_timeout_s=30,
        modes=modes,
    )
    controller = Controller(url, "bench-controller", settings)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    rounds = []
    for e in engines:
        e.start()
    for fl in links:
        fl.start()
    controller.start()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < args.duration:
            rounds.append(_round(engines, params, t0))
            r = rounds[-1]
            print(
                f"t={r['t']:6.1f}s v{r['version']} {r['mode']:<5} skip {r['skip_set']:<24.24} "
                f"acceptance {r['acceptance']:.2f} {r['tok_s']:.1f} tok/s "
                f"(off {r['off_tok_s']:.1f})",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(args.pause)
    finally:
        controller.stop()
        for fl in links:
            fl.stop()
        for e in engines:
            e.shutdown()
    search = controller.redis.get(model_key("bench", "search"))
    return {
        "benchmark": "controller",
        "model": str(base.model_path.name),
        "dtype": args.dtype,
        "backend": base.model.backend.describe(),
        "replicas": args.replicas,
        "prompts": PROMPTS,
        "max_tokens": args.max_tokens,
        "modes": list(modes),
        "start_draft": {
            "mode": poor.mode,
            "skip_attn": list(poor.skip_attn),
            "skip_mlp": list(poor.skip_mlp),
            "max_draft": poor.max_draft,
        },
        "rounds": rounds,
        "search": json.loads(search) if search else None,
        "notes": {
            "acceptance": "accepted / drafted tokens over the round's outputs, all replicas",
            "tok_s": "generated tokens / wall time of the round, replicas serving concurrently",
            "off_tok_s": "the same mix with drafting off, right after (a load reference)",
            "identical_to_off": "greedy outputs equal drafting off's, token for token",
        },
    }


def _serve(engines, params, draft=None) -> tuple[list, float]:
    """Every replica serves the prompt mix at once; returns the completions and wall time."""
    results: list = [None] * len(engines)

    def serve(i):
        results[i] = engines[i].generate(PROMPTS, params, draft, chat=True)

    start = time.perf_counter()
    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [c for r in results for c in r], time.perf_counter() - start


def _round(engines, params, t0: float) -> dict:
    """The mix with the fleet's config, then with drafting off: the calls alternate, so
    a change in the machine's load hits both alike."""
    from services.common.redis_schema import skip_key

    versions = [e.config_version for e in engines]
    cfg = engines[0].default_draft
    done, wall = _serve(engines, params)
    off, off_wall = _serve(engines, params, "off")
    drafted = sum(c.stats["drafted_tokens"] for c in done)
    accepted = sum(c.stats["accepted_tokens"] for c in done)
    tok_s = sum(len(c.token_ids) for c in done) / wall
    off_tok_s = sum(len(c.token_ids) for c in off) / off_wall
    return {
        "t": round(time.monotonic() - t0, 2),
        "version": min(versions),
        "mode": cfg.mode,
        "max_draft": cfg.max_draft,
        "skip_set": skip_key(cfg.skip_attn, cfg.skip_mlp),
        "acceptance": accepted / drafted if drafted else 0.0,
        "drafted": drafted,
        "tok_s": tok_s,
        "off_tok_s": off_tok_s,
        "ratio_to_off": tok_s / off_tok_s,
        "identical_to_off": [c.token_ids for c in done] == [c.token_ids for c in off],
    }


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    t = [r["t"] for r in rounds]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(t, [r["acceptance"] for r in rounds], marker="o")
    ax1.set_ylabel("acceptance")
    ax1.set_ylim(0, 1)
    ax2.plot(t, [r["tok_s"] for r in rounds], marker="o", color="tab:green", label="fleet config")
    ax2.plot(
        t, [r["off_tok_s"] for r in rounds], marker="x", color="tab:grey", label="drafting off"
    )
    ax2.set_ylabel("tokens / s")
    ax2.legend(loc="lower right", fontsize=8)
    ax2.set_xlabel("seconds since start")
    for prev, r in zip(rounds, rounds[1:], strict=False):
        if r["version"] != prev["version"]:
            for ax in (ax1, ax2):
                ax.axvline(r["t"], color="grey", linestyle=":", linewidth=1)
            ax1.annotate(f"v{r['version']}", (r["t"], 0.02), fontsize=8)
    fig.suptitle(
        f"controller adapting {report['model']} ({report['replicas']} replicas, "
        f"modes {','.join(report['modes'])})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
