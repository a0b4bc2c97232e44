"""OpenTelemetry tracing for every component, and the `gen_ai.*` span of one request.

`setup_tracing(service)` installs a tracer provider for the process when spans have
somewhere to go: OTLP over gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, a JSON-lines
file when `SELFSPEC_TRACE_FILE` is set (one file per process: the pid goes into the
name). With neither it installs nothing, and `enabled()` is False, so callers skip their
spans altogether. Sampling is parent-based: a request that arrives with a sampled
`traceparent` is traced; a new trace is sampled at `OTEL_TRACES_SAMPLER_ARG` (default 1).

Inside Ray Serve, set `RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH` to
`services.common.telemetry:serve_span_processors`: Serve then traces its gRPC proxy, its
router and its replicas into our provider, and carries the gateway's `traceparent` from
the gRPC metadata through the proxy to the replica.

Prompt and output text are recorded only when `SELFSPEC_TRACE_CONTENT=1`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

SERVE_HOOK = "services.common.telemetry:serve_span_processors"
PROVIDER = "selfspec"  # gen_ai.provider.name: who serves the model
_W3C = TraceContextTextMapPropagator()
_lock = threading.Lock()
_state: dict[str, bool] = {}  # "enabled" once set up in this process


def setup_tracing(service: str) -> bool:
    """Install tracing for this process as `service` (its `service.name`), once; returns
    whether spans are exported. Cheap and safe to call again."""
    with _lock:
        if "enabled" in _state:
            return _state["enabled"]
        processors = _processors()
        if processors:
            trace.set_tracer_provider(_provider(service, processors))
        _state["enabled"] = bool(processors)
        return _state["enabled"]


def enabled() -> bool:
    return _state.get("enabled", False)


def content_enabled() -> bool:
    return os.environ.get("SELFSPEC_TRACE_CONTENT") == "1"


def serve_span_processors() -> list:
    """Ray Serve's tracing hook (`RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`). Serve calls it in
    each proxy and replica before it creates its own provider; we install ours first (with
    the component's service.name and our sampler), Serve's is then refused with a warning,
    and Serve's spans land in ours. So the processors are already attached: none to return."""
    setup_tracing(_serve_component())
    return []


def _serve_component() -> str:
    try:
        import ray

        name = ray.get_runtime_context().get_actor_name() or ""
    except Exception:  # not in a Ray actor
        name = ""
    return "selfspec-proxy" if "PROXY" in name else "selfspec-engine"


def _processors() -> list:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    out = []
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        out.append(BatchSpanProcessor(OTLPSpanExporter()))  # reads the OTEL_EXPORTER_* env
    path = os.environ.get("SELFSPEC_TRACE_FILE")
    if path:
        # Synchronous, so that a test sees a span as soon as it ends; for debugging only.
        out.append(SimpleSpanProcessor(JsonLinesExporter(per_process(path))))
    return out


def _provider(service: str, processors: list):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    resource = Resource.create({"service.name": service, "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(ratio)))
    for p in processors:
        provider.add_span_processor(p)
    return provider


def per_process(path: str) -> Path:
    """`traces.jsonl` becomes `traces-<pid>.jsonl`: processes never share a file."""
    p = Path(path)
    return p.with_name(f"{p.stem}-{os.getpid()}{p.suffix or '.jsonl'}")


class JsonLinesExporter(SpanExporter):
    """One JSON object per finished span, one span per line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process
        self._lock = threading.Lock()

    def export(self, spans: Sequence) -> SpanExportResult:
        lines = "".join(json.dumps(_span_dict(s), default=str) + "\n" for s in spans)
        with self._lock:
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _span_dict(span) -> dict:
    ctx, parent = span.context, span.parent
    return {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in span.events
        ],
    }


# -- context in and out of gRPC metadata -------------------------------------------------


def context_from_metadata(metadata: Iterable[tuple[str, str]] | None) -> Context | None:
    """The trace context a caller sent as W3C `traceparent`/`tracestate` metadata."""
    carrier = {k: v for k, v in metadata or () if k in ("traceparent", "tracestate")}
    return _W3C.extract(carrier) if carrier else None


def metadata_for(span: Span) -> list[tuple[str, str]]:
    """`traceparent` (and `tracestate`) naming `span`, for an outgoing call's metadata."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    return list(carrier.items())


def routing_span(request, candidates: list, ranks: list[list]) -> None:
    """A span for one routing decision of the request router, as the child of Serve's
    `route_to_replica` span (whose context Serve puts in the request's metadata). It
    records the session and the replicas ranked first; which one took the request is
    Serve's `replica_handle_request` span's `replica_id`."""
    metadata = getattr(request, "metadata", None)
    carrier = getattr(metadata, "tracing_context", None)
    if not enabled() or not carrier:
        return
    session = getattr(metadata, "session_id", "") or ""
    first = [r.replica_id.unique_id for r in ranks[0]] if ranks else []
    attrs = {
        "selfspec.request_id": getattr(metadata, "request_id", "") or "",
        "selfspec.router.candidates": len(candidates),
        "selfspec.router.first_rank": first,
        # With a session, a first rank of one replica is its pinned or hashed replica.
        "selfspec.router.affinity": bool(session) and len(ranks) > 1,
    }
    if session:
        attrs["selfspec.session_id"] = session
    span = trace.get_tracer(__name__).start_span(
        "choose_replicas session_affinity", context=_W3C.extract(carrier), attributes=attrs
    )
    span.end()


# -- the span of one generation request --------------------------------------------------


class GenerationSpan:
    """The `gen_ai.*` span of one request, named `{operation} {model}`. Not made current:
    it lives across the `yield`s of a stream, where attaching a context is unsafe; callers
    pass it on explicitly (`metadata_for`). Use only when `enabled()`."""

    def __init__(
        self,
        tracer: str,
        request,
        model: str,
        *,
        kind: SpanKind = SpanKind.SERVER,
        parent: Context | None = None,
        attributes: dict | None = None,
    ) -> None:
        operation = "chat" if request.HasField("messages") else "text_completion"
        attrs = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": model,
            **request_attributes(request),
            **(attributes or {}),
        }
        if content_enabled():
            attrs["gen_ai.input.messages"] = _input_messages(request)
        self.start = time.perf_counter()
        self.first: float | None = None
        self.output: list[str] | None = [] if content_enabled() else None
        self.span = trace.get_tracer(tracer).start_span(
            f"{operation} {model}", context=parent, kind=kind, attributes=attrs
        )

    def saw(self, response) -> None:
        """A message of the reply went out: the first with tokens is the first token."""
        if self.first is None and response.token_ids:
            self.first = time.perf_counter()
            self.span.add_event("first_token", {"selfspec.ttft_s": self.first - self.start})
        if self.output is not None:
            self.output.append(response.text)

    def event(self, name: str, attributes: dict | None = None) -> None:
        self.span.add_event(name, attributes or {})

    def finish(self, last=None, error: tuple | None = None) -> None:
        """End the span with the last message's usage, or with `error` (code, message)."""
        if last is not None:
            self.span.set_attributes(response_attributes(last))
            if self.output is not None:
                self.span.set_attribute("gen_ai.output.messages", _output_messages(self.output))
        if error is not None:
            code, message = error
            self.span.set_attribute("error.type", getattr(code, "name", str(code)))
            self.span.set_status(Status(StatusCode.ERROR, message))
        self.span.end()


def request_attributes(request) -> dict:
    """The sampling parameters the caller set (unset ones take the engine's defaults)."""
    attrs = {"gen_ai.response.id": request.request_id}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        if request.HasField(name):
            attrs[f"gen_ai.request.{name}"] = getattr(request, name)
    if request.session_id:
        attrs["gen_ai.conversation.id"] = request.session_id
        attrs["selfspec.session_id"] = request.session_id
    if "mode" in request.draft:
        attrs["selfspec.drafting_mode"] = str(request.draft["mode"])
    return attrs


def response_attributes(last) -> dict:
    """Usage and finish reason from a reply's last message (the totals)."""
    from services.gen.selfspec.v1 import generation_pb2 as pb

    u = last.usage
    reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    attrs = {
        "gen_ai.usage.input_tokens": u.prompt_tokens,
        "gen_ai.usage.output_tokens": u.completion_tokens,
        "selfspec.drafted_tokens": u.drafted_tokens,
        "selfspec.accepted_tokens": u.accepted_tokens,
        "selfspec.cached_prompt_tokens": u.cached_prompt_tokens,
        "selfspec.verify_steps": u.verify_steps,
    }
    if last.finish_reason:
        attrs["gen_ai.response.finish_reasons"] = (reason,)
    if last.replica_id:
        attrs["selfspec.replica_id"] = last.replica_id
    return attrs


def _input_messages(request) -> str:
    if request.HasField("messages"):
        turns = [{"role": m.role, "content": m.content} for m in request.messages.messages]
    elif request.HasField("prompt_token_ids"):
        turns = [{"role": "user", "token_ids": list(request.prompt_token_ids.ids)}]
    else:
        turns = [{"role": "user", "content": request.prompt}]
    return json.dumps(turns)


def _output_messages(parts: list[str]) -> str:
    return json.dumps([{"role": "assistant", "content": "".join(parts)}])
