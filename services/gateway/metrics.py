"""The gateway's Prometheus metrics, named as vLLM names them where vLLM has one, so
existing dashboards and autoscalers read them; ours go under `selfspec_`."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.gen.selfspec.v1 import generation_pb2 as pb

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)

TTFT = Histogram(
    "vllm:time_to_first_token_seconds", "Time to the first token.", buckets=LATENCY_BUCKETS
)
TPOT = Histogram(
    "vllm:time_per_output_token_seconds",
    "Time per output token after the first.",
    buckets=TOKEN_BUCKETS,
)
ITL = Histogram(
    "vllm:inter_token_latency_seconds",
    "Time between successive replies carrying tokens (a verify step may yield several).",
    buckets=TOKEN_BUCKETS,
)
E2E = Histogram(
    "vllm:e2e_request_latency_seconds", "Request latency, end to end.", buckets=LATENCY_BUCKETS
)
SUCCESS = Counter("vllm:request_success", "Requests finished.", ["finished_reason"])
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Prompt tokens processed.")
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Tokens generated.")
DRAFT_TOKENS = Counter("vllm:spec_decode_num_draft_tokens", "Tokens drafted.")
ACCEPTED_TOKENS = Counter("vllm:spec_decode_num_accepted_tokens", "Drafted tokens accepted.")
CALLS = Counter(
    "selfspec_gateway_calls", "Calls answered, by method and status.", ["method", "code"]
)
HTTP_CALLS = Counter(
    "selfspec_gateway_http_requests",
    "HTTP calls of the OpenAI-compatible API answered, by route and status code.",
    ["route", "code"],
)
IN_FLIGHT = Gauge("selfspec_gateway_streams_in_flight", "Generation calls in flight.")


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics over HTTP in a background thread."""
    start_http_server(port, addr=host)


class RequestClock:
    """Times one generation call and records it when it ends."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None  # when the latest tokens arrived
        IN_FLIGHT.inc()

    def saw(self, response: pb.GenerateResponse) -> None:
        if not response.token_ids:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            TTFT.observe(now - self.start)
        else:
            ITL.observe(now - self.last)
        self.last = now

    def finish(self, last: pb.GenerateResponse | None) -> None:
        IN_FLIGHT.dec()
        if last is None or not last.finish_reason:
            return
        end = time.perf_counter()
        u = last.usage
        E2E.observe(end - self.start)
        if self.first is not None and u.completion_tokens > 1:
            TPOT.observe((end - self.first) / (u.completion_tokens - 1))
        reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        SUCCESS.labels(reason).inc()
        PROMPT_TOKENS.inc(u.prompt_tokens)
        GENERATION_TOKENS.inc(u.completion_tokens)
        DRAFT_TOKENS.inc(u.drafted_tokens)
        ACCEPTED_TOKENS.inc(u.accepted_tokens)
