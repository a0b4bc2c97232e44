"""The Serve application: engine replicas behind Serve's gRPC proxy.

Each replica of the `Engine` deployment runs one engine and implements the public
`selfspec.v1.Generation` service itself, so Serve's gRPC proxy is the ingress: it
routes each call with `SessionAffinityRouter` straight to a replica, one hop, with
streaming end to end. A call that goes away (client gone, deadline passed) is
cancelled on the replica, which aborts the request and frees its KV blocks.

Only gateways may call: Serve's proxy answers whoever reaches its port, so each replica
refuses, with UNAUTHENTICATED, a call without the fleet's internal credential
(`services.common.internal_auth`). A replica started without one accepts every call and
says so at start, for development. An Abort ends only a request of the same owner (the
gateway's digest of the caller), and answers found=false for any other, so that request
ids cannot be probed.

Observability: each request gets a `gen_ai.*` span (see `services.common.telemetry`), a
child of Serve's replica span when Serve traces, else of the gateway's `traceparent`.
With the app arg `metrics_port` each replica serves Prometheus /metrics
(`services.serve.metrics`).

Ready means able to generate: a replica runs a short generation through its engine
before it reports ready, and `check_health` fails (so that Serve replaces the replica)
when that warm-up failed or when its last requests all failed (engine faults).

`build` is the app builder that Serve config files name (`services.serve.app:build`);
its `args` are `EngineSettings`' fields.

Back-pressure: every queue on the way is bounded, and a full one refuses at once with
RESOURCE_EXHAUSTED rather than letting a call wait out its deadline. A replica holds at
most `max_ongoing_requests` calls (Serve's option, set by `build` from the args), each
Serve proxy queues at most `max_queued_requests` more, and the engine's own waiting queue
is sized from them so that it does not refuse what Serve admitted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, fields, replace

import grpc
from ray import serve
from ray.serve.config import RequestRouterConfig

from services.common import api, internal_auth, metrics_push, telemetry
from services.gen.selfspec.v1 import generation_pb2 as pb
from services.serve.metrics import ReplicaMetrics

log = logging.getLogger(__name__)

APP_NAME = "selfspec"
DEPLOYMENT = "Engine"
SERVICER = "services.gen.selfspec.v1.generation_pb2_grpc.add_GenerationServicer_to_server"
# Requests that may fail in a row (none completing between) before the replica reports
# itself unhealthy: a failure ends its own request, which the engine survives; a run of
# them is a broken engine (a lost device, a corrupted pool) that only a new replica fixes.
FAILED_REQUESTS_UNHEALTHY = 5
WARMUP_PROMPT = "Say hello."  # as a chat turn, so that the chat template is exercised too
WARMUP_TOKENS = 8  # enough for a draft and its verification
# Test only, never set in production: `SELFSPEC_FAULT=warmup` makes every model pass of the
# replica's engine raise, so that its warm-up fails; `steps` lets the warm-up through and
# makes every later pass raise. The fleet tests use it to check how failures are reported.
FAULT_ENV = "SELFSPEC_FAULT"
FAULTS = ("warmup", "steps")


# Settings that `Engine.from_pretrained` takes under the same names.
ENGINE_ARGS = (
    "dtype",
    "device",
    "backend",
    "weights",
    "kv_cache_bytes",
    "allow_draft_override",
    "max_draft_configs",
    "draft_model",
)


@dataclass(frozen=True)
class EngineSettings:
    """What each engine replica loads; the `args` of the Serve application."""

    model: str = "default"
    dtype: str | None = None  # dense weights in this dtype; None: as `weights` says
    device: str = "cpu"
    backend: str | None = None  # `selfspec_kernels.backend`; None: the machine's best
    # gguf (a GGUF's quantized matrices as stored, CPU), bf16, fp16, fp32, or auto: gguf
    # for a GGUF on the cpu backend, else `dtype` or bf16 (`checkpoint.weights_for`).
    weights: str = "auto"
    kv_cache_bytes: int = 1 << 30
    # Back-pressure, one setting per queue (see `build`): the requests one replica holds at
    # once (running, and waiting in its engine for KV blocks), and those each Serve proxy
    # queues while every replica holds its most. Past both, a call is refused at once with
    # RESOURCE_EXHAUSTED. Bounded: Serve's own default queue has no limit.
    max_ongoing_requests: int = 64
    max_queued_requests: int = 64
    # The engine's waiting queue; None: derived from max_ongoing_requests so that it never
    # refuses what Serve admitted (`engine_max_waiting`). Lower, the engine refuses first.
    max_waiting: int | None = None
    draft: str | dict | None = None  # default drafting; None: the model's tuned profile
    allow_draft_override: bool = True  # False: a request's `draft` is INVALID_ARGUMENT
    max_draft_configs: int = 4  # distinct drafting configs the engine runs in one step
    # A second, smaller model (any tokenizer) to draft with (mode `model`, then the
    # default mode): a checkpoint folder or GGUF file, loaded like `model`; None or "": none.
    draft_model: str | None = None
    redis_url: str | None = None  # fleet telemetry and configs; None: local adaptation only
    threads: int = 0  # torch threads per replica; 0 leaves PyTorch's choice
    metrics_port: int | None = None  # Prometheus /metrics per replica; 0: any free port

    def __post_init__(self) -> None:
        # `build` makes these, so a bad value fails the deploy, naming the arg, rather than
        # every replica's start; -1 (Serve's "no limit") is refused on purpose.
        for name in ("max_ongoing_requests", "max_queued_requests", "max_draft_configs"):
            _check_positive(name, getattr(self, name))
        if self.max_waiting is not None:
            _check_positive("max_waiting", self.max_waiting)
        if self.draft_model == "":  # how a config file or the chart says "none"
            object.__setattr__(self, "draft_model", None)
        if not isinstance(self.allow_draft_override, bool):
            raise ValueError(
                f"app arg allow_draft_override must be true or false, "
                f"got {self.allow_draft_override!r}"
            )

    @property
    def engine_max_waiting(self) -> int:
        """The engine's waiting queue. Serve never sends a replica more than
        max_ongoing_requests at once, so that bound is never reached; twice that, because
        a cancelled request stays in the engine's queue until its next step reaps it, while
        Serve has already sent the next one."""
        if self.max_waiting is not None:
            return self.max_waiting
        return 2 * self.max_ongoing_requests

    @classmethod
    def from_args(cls, args: dict) -> EngineSettings:
        unknown = set(args) - {f.name for f in fields(cls)}
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise ValueError(f"unknown app args {sorted(unknown)}; known: {known}")
        return cls(**args)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"app arg {name} must be a positive integer, got {value!r}")


class EngineServer:
    """One engine, serving `selfspec.v1.Generation` through Serve's gRPC proxy."""

    def __init__(self, settings: dict) -> None:
        import torch

        from services.engine import Engine

        telemetry.setup_tracing("selfspec-engine")  # no-op unless an exporter is configured
        self.internal = _internal_credential()
        self.owners: dict[str, str] = {}  # request id -> its owner, while it runs
        self.settings = EngineSettings.from_args(settings)
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        s = self.settings
        passed = {name: getattr(s, name) for name in ENGINE_ARGS}
        self.engine = Engine.from_pretrained(s.model, max_waiting=s.engine_max_waiting, **passed)
        if s.draft is not None:
            self.engine.default_draft = self._draft(s.draft)
        fault = _inject_fault(self.engine, os.environ.get(FAULT_ENV))
        self.engine.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.warmup_error = self._warm_up()  # None once a generation went through
        if fault is not None:
            fault.set()  # `steps`: from now on; `warmup`: already set
        self.metrics = self._serve_metrics()
        self.fleet = None if self.warmup_error else self._join_fleet()
        if self.warmup_error is None:
            log.info("replica %s serving %s", self.replica_id, self.engine.model_path)

    def _warm_up(self) -> str | None:
        """A short chat generation through the engine's loop, as requests run, with the
        default drafting (its layer draft, so that the draft passes run even where `auto`
        would not draft yet). Returns why it failed, or None."""
        from services.common.params import SamplingParams
        from services.engine.prompts import has_chat_template

        cfg = self.engine.default_draft
        draft = replace(cfg, mode=cfg.layer_mode) if cfg.layer_mode else cfg
        params = SamplingParams(max_tokens=WARMUP_TOKENS, ignore_eos=True)
        try:
            chat = has_chat_template(self.engine.tokenizer)  # a base model has none
            (done,) = self.engine.generate(WARMUP_PROMPT, params, draft, chat=chat)
        except Exception as exc:
            log.exception("replica %s: the warm-up generation raised", self.replica_id)
            return f"the warm-up generation raised {exc!r}"
        if done.finish_reason == "error":  # the loop logged the step's exception
            return "the warm-up generation failed: an engine step raised (see the replica's log)"
        return None

    def _draft(self, value):
        return self.engine.draft_config(value)

    def _serve_metrics(self) -> ReplicaMetrics:
        metrics = ReplicaMetrics(self.engine, self.settings.model, self.replica_id)
        if self.settings.metrics_port is not None:
            port = metrics.serve(self.settings.metrics_port)
            log.info("replica %s: /metrics on port %d", self.replica_id, port)
        self.metrics_push = metrics_push.start(metrics.registry, "selfspec-engine")
        return metrics

    def _join_fleet(self):
        if not self.settings.redis_url:
            return None
        from services.serve.fleet_link import FleetLink

        link = FleetLink(
            self.engine,
            redis_url=self.settings.redis_url,
            model=self.engine.model_path.name,
            replica_id=self.replica_id,
            draft_model=self.settings.draft_model or "",
        )
        link.start()
        return link

    # -- the gRPC methods (named as in the proto) ------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context=None
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            self._check_caller(grpc_context)
            async for response in self._generate(request, grpc_context):
                yield response
        except _Refused as refused:
            _refuse(grpc_context, refused)

    async def GenerateUnary(
        self, request: pb.GenerateRequest, grpc_context=None
    ) -> pb.GenerateResponse:
        whole = pb.GenerateResponse()
        try:
            self._check_caller(grpc_context)
            if request.n > 1:  # one reply holds one choice
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, "n > 1 streams its choices: call Generate"
                )
            async for response in self._generate(request, grpc_context):
                whole.text += response.text
                whole.token_ids.extend(response.token_ids)
                whole.logprobs.extend(response.logprobs)
                whole.request_id, whole.replica_id = response.request_id, response.replica_id
                whole.finish_reason = response.finish_reason
                whole.usage.CopyFrom(response.usage)
        except _Refused as refused:
            _refuse(grpc_context, refused)
        return whole

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, grpc_context=None
    ) -> pb.ModelInfo:
        self._checked(grpc_context)
        model = self.engine.model
        info = pb.ModelInfo(
            model=self.settings.model,
            architecture=(model.config.architectures or [model.config.model_type])[0],
            num_layers=model.num_layers,
            vocab_size=model.vocab_size,
            max_model_len=model.max_positions,
            dtype=model.backend.describe()["weights"],  # what runs: gguf or a dense dtype
            config_version=getattr(self.engine, "config_version", 0),
            draft_model=self.settings.draft_model or "",
        )
        info.default_draft.update(api.draft_dict(self.engine.default_draft))
        info.backend.update(model.backend.describe())
        return info

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        """The token ids Generate would feed the model for this prompt or these messages."""
        self._checked(grpc_context)
        try:
            ids = self.engine.encode(api.prompt(request), **api.chat_options(request))
        except ValueError as exc:
            _refuse(grpc_context, _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        max_len = self.engine.model.max_positions
        return pb.TokenizeResponse(token_ids=ids, max_model_len=max_len)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, grpc_context=None
    ) -> pb.DetokenizeResponse:
        self._checked(grpc_context)
        try:
            ids = api.detokenize_ids(request)
            vocab = self.engine.model.vocab_size
            bad = [i for i in ids if i >= vocab]
            if bad:
                raise ValueError(f"token_ids must be in [0, {vocab}); got {bad[:5]}")
        except ValueError as exc:
            _refuse(grpc_context, _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        return pb.DetokenizeResponse(text=self.engine.tokenizer.decode(ids))

    async def Abort(self, request: pb.AbortRequest, grpc_context=None) -> pb.AbortResponse:
        self._checked(grpc_context)
        owner = self.owners.get(request.request_id)
        if owner is None or owner != _owner(grpc_context):
            return pb.AbortResponse(found=False)  # another's request looks like none at all
        return pb.AbortResponse(found=self.engine.abort(request.request_id))

    def _check_caller(self, grpc_context) -> None:
        """Raise _Refused for a call through Serve's proxy without the internal credential.
        A call with no gRPC context came through a deployment handle, from inside the Ray
        cluster, which Ray's own authentication guards."""
        if self.internal is None or grpc_context is None:
            return
        if not internal_auth.accepts(self.internal, grpc_context.invocation_metadata()):
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, NOT_FROM_A_GATEWAY)

    def _checked(self, grpc_context) -> None:
        """`_check_caller`, ending the call with the refusal's status."""
        try:
            self._check_caller(grpc_context)
        except _Refused as refused:
            _refuse(grpc_context, refused)

    # -- for tests, benchmarks and operators ---------------------------------------------

    def stats(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "pid": os.getpid(),
            "metrics_port": self.metrics.port,
            **self.engine.stats(),
        }

    def check_health(self) -> None:
        """Serve calls this once the constructor returns (a failure there is a failed start)
        and then every `health_check_period_s`; a replica that fails it three times in a
        row is replaced. Healthy means able to generate."""
        if self.warmup_error is not None:
            raise RuntimeError(f"replica {self.replica_id} is not ready: {self.warmup_error}")
        if not self.engine.serving:
            raise RuntimeError("the engine loop is not running")
        failed = self.engine.consecutive_failures
        if failed >= FAILED_REQUESTS_UNHEALTHY:
            raise RuntimeError(f"the engine's last {failed} requests failed")

    def __del__(self) -> None:
        if getattr(self, "fleet", None) is not None:
            self.fleet.stop()
        if getattr(self, "metrics_push", None) is not None:
            self.metrics_push.stop()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()

    # -----------------------------------------------------------------------------------

    async def _generate(
        self, request: pb.GenerateRequest, grpc_context=None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The engine's reply, traced, and counted for the replica's metrics once it ends."""
        span = self._trace(request, grpc_context)
        last, error = None, None
        try:
            async for response in self._run(request, _owner(grpc_context)):
                last = response
                if span is not None:
                    span.saw(response)
                yield response
        except _Refused as refused:
            error = (refused.code, refused.message)
            raise
        finally:
            if last is not None:  # its prompt was prefilled
                self.metrics.request_done(last.usage)
            if span is not None:
                done = last is not None and last.finish_reason
                span.finish(last, error or (None if done else _GONE))

    def _trace(self, request: pb.GenerateRequest, grpc_context) -> telemetry.GenerationSpan | None:
        """The request's span. Under Serve's own tracing it is the child of Serve's replica
        span (the current one), else of the `traceparent` the gateway sent."""
        if not telemetry.enabled():
            return None
        from opentelemetry import trace

        under_serve = trace.get_current_span().get_span_context().is_valid
        parent = None
        if not under_serve and grpc_context is not None:
            parent = telemetry.context_from_metadata(grpc_context.invocation_metadata())
        return telemetry.GenerationSpan(
            __name__,
            request,
            self.settings.model,
            kind=trace.SpanKind.INTERNAL if under_serve else trace.SpanKind.SERVER,
            parent=parent,
            attributes={
                "gen_ai.response.model": self.engine.model_path.name,
                "selfspec.replica_id": self.replica_id,
                "selfspec.drafting_mode": self._mode(request),
            },
        )

    def _mode(self, request: pb.GenerateRequest) -> str:
        if "mode" in request.draft:
            return str(request.draft["mode"])
        return self.engine.default_draft.mode

    async def _run(
        self, request: pb.GenerateRequest, owner: str
    ) -> AsyncIterator[pb.GenerateResponse]:
        from services.engine.scheduler import QueueFull

        request_id = request.request_id or f"{self.replica_id}-{id(request):x}"
        with self._owned(request_id, owner):
            try:
                params = api.sampling_params(request)
                stream = self.engine.submit(
                    api.prompt(request),
                    params,
                    api.draft_override(request),
                    request_id=request_id,
                    session_id=request.session_id or None,
                    **api.chat_options(request),
                )
                # The first step of the stream queues the request: refusals surface here.
                delta = await anext(stream)
                self.metrics.queue_time.observe(delta.stats.get("queue_seconds", 0.0))
            except ValueError as exc:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except QueueFull as exc:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            completion = [0] * params.n  # tokens by choice
            running = params.n
            try:
                while True:
                    completion[delta.index] += len(delta.token_ids)
                    if delta.finish_reason == "error":  # this request alone failed
                        message = f"the engine failed: {delta.error}"
                        raise _Refused(grpc.StatusCode.INTERNAL, message)
                    yield pb.GenerateResponse(
                        request_id=request_id,
                        text=delta.text,
                        token_ids=delta.token_ids,
                        finish_reason=api.FINISH_REASONS.get(delta.finish_reason, 0),
                        usage=api.usage(delta.stats, completion[delta.index]),
                        replica_id=self.replica_id,
                        index=delta.index,
                        logprobs=self._logprobs(delta),
                    )
                    running -= delta.finish_reason is not None
                    if running == 0:
                        return
                    delta = await anext(stream)
            finally:
                await stream.aclose()  # a request left unfinished is aborted on the engine

    def _logprobs(self, delta) -> list[pb.TokenLogprob]:
        if delta.logprobs is None:
            return []
        return api.token_logprobs(self.engine.tokenizer.decode, delta.token_ids, delta.logprobs)

    @contextlib.contextmanager
    def _owned(self, request_id: str, owner: str) -> Iterator[None]:
        """Keep the request's owner while it runs, for `Abort`."""
        self.owners[request_id] = owner
        try:
            yield
        finally:
            if self.owners.get(request_id) == owner:  # not a later request of the same id
                del self.owners[request_id]


_GONE = (grpc.StatusCode.CANCELLED, "the call ended before the reply did")
NOT_FROM_A_GATEWAY = (
    "this engine replica answers only the fleet's gateways: call the gateway, or send the "
    f"fleet's internal credential in the metadata key {internal_auth.METADATA_KEY!r}"
)


def _internal_credential():
    """The credential every call must carry, from the environment; None (with a warning
    that says what it means) when none is configured."""
    source = internal_auth.from_env()
    if source is None:
        log.warning(
            "no internal credential (%s or %s): this replica answers ANY caller that reaches "
            "Serve's gRPC proxy, not only the gateway. Fine for development; `selfspec serve` "
            "and the Helm chart always set one",
            internal_auth.ENV_FILE,
            internal_auth.ENV_VALUE,
        )
    return source


def _owner(grpc_context) -> str:
    """Who the gateway says owns the call; empty for a call that names no owner."""
    if grpc_context is None:
        return ""
    return dict(grpc_context.invocation_metadata()).get(internal_auth.OWNER_KEY, "")


class _Refused(Exception):
    """A request the engine will not run; Ray pickles it to the proxy, args and all."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code, self.message = code, message

    def __str__(self) -> str:
        return self.message


def _refuse(grpc_context, refused: _Refused) -> None:
    """End the call with the refusal's status: Serve's proxy passes on a code set on the
    context when the method then raises."""
    if grpc_context is not None:
        grpc_context.set_code(refused.code)
        grpc_context.set_details(str(refused))
    raise refused


def _inject_fault(engine, fault: str | None) -> threading.Event | None:
    """Test only (see `FAULT_ENV`): make the engine's model passes raise once the returned
    event is set; `warmup` sets it at once. None when no fault is asked for."""
    if not fault:
        return None
    if fault not in FAULTS:
        raise ValueError(f"{FAULT_ENV} must be one of {', '.join(FAULTS)}, got {fault!r}")
    log.warning("%s=%s: this replica's engine is broken on purpose (tests only)", FAULT_ENV, fault)
    armed = threading.Event()
    if fault == "warmup":
        armed.set()
    runner = engine.runner
    for name in ("prefill", "draft_mixed", "verify"):
        setattr(runner, name, _failing(getattr(runner, name), armed))
    return armed


def _failing(method, armed: threading.Event):
    def call(*args, **kwargs):
        if armed.is_set():
            raise RuntimeError(f"{FAULT_ENV}: a model pass failed on purpose")
        return method(*args, **kwargs)

    return call


# Deployment options that `build` sets from the app's args, so that the engine's queue is
# sized from the same numbers; a config file's `deployments` section must not set them.
ARG_OPTIONS = ("max_ongoing_requests", "max_queued_requests")


def build(args: dict) -> serve.Application:
    """The Serve application for `args` (`EngineSettings` fields). Replica counts,
    autoscaling and actor resources come from the config file's `deployments` section;
    the back-pressure limits (`ARG_OPTIONS`) come from the args.

    Serve's gRPC proxy routes a call to a replica holding fewer than max_ongoing_requests,
    else queues it (FIFO) until one frees; with max_queued_requests queued it refuses the
    call at once with BackPressureError, which the proxy reports as RESOURCE_EXHAUSTED."""
    settings = EngineSettings.from_args(args)
    deployment = serve.deployment(
        EngineServer,
        name=DEPLOYMENT,
        **{name: getattr(settings, name) for name in ARG_OPTIONS},
        graceful_shutdown_timeout_s=60,
        request_router_config=RequestRouterConfig(
            request_router_class="services.serve.router.SessionAffinityRouter"
        ),
    )
    return deployment.bind(asdict(settings))
