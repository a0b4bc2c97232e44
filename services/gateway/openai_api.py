"""The OpenAI-compatible HTTP API: a second front end on the same `Gateway`.

FastAPI on uvicorn, in the gateway's own event loop, on its own port (`--http-listen`).
A generation call goes through the gRPC path's own steps: `Gateway._admit` (validation,
the in-flight limit, draining, readiness) and `Gateway._forward` (retries, session
affinity, tracing, metrics, and cancelling the upstream call when the client goes away,
which frees the request's KV blocks). They take a gRPC servicer context; `HttpCall` offers
what they use of one, and its `abort` raises `Refusal`, which becomes the HTTP status
(`HTTP_STATUS`) and OpenAI's error shape. Bodies are translated by `openai_schema`,
replies shaped by `openai_replies`.

Authentication is the gRPC side's bearer token (`Authorization: Bearer`), on every route
but `/health`, which probes call without credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket

import grpc
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException

from services.gateway import metrics
from services.gateway import openai_replies as replies
from services.gateway import openai_schema as schema
from services.gen.selfspec.v1 import generation_pb2 as pb

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # the client closed the request (nginx's code)
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
TIMEOUT_HEADER = "x-request-timeout"  # seconds: the call's deadline, as gRPC's timeout
MAX_BODY_BYTES = 8 << 20  # as the gRPC side's MAX_MESSAGE_BYTES
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
)


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param=None, code=None, headers=None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        error = {
            "message": self.message,
            "type": ERROR_TYPES.get(self.status, "server_error"),
            "param": self.param,
            "code": self.code,
        }
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


class Refusal(Exception):
    """`Gateway` ended the call with a gRPC status (through `HttpCall.abort`)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: dict) -> None:
        super().__init__(message)
        self.code, self.message, self.trailing = code, message, trailing

    def error(self) -> ApiError:
        status, headers = HTTP_STATUS.get(self.code, 500), {}
        if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry-after-ms" in self.trailing:
            headers["Retry-After"] = str(math.ceil(int(self.trailing["retry-after-ms"]) / 1000))
        elif self.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            status = 413  # too large ever to fit: no retry hint
        return ApiError(status, self.message, code=self.code.name.lower(), headers=headers)


class HttpCall:
    """What `Gateway` uses of a gRPC servicer context, for one HTTP request."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.deadline = None
        timeout = request.headers.get(TIMEOUT_HEADER)
        if timeout is not None:
            try:
                seconds = float(timeout)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds < math.inf:
                raise ApiError(400, f"{TIMEOUT_HEADER} must be a positive number of seconds")
            self.deadline = asyncio.get_running_loop().time() + seconds

    async def abort(self, code, message, trailing_metadata=()):
        raise Refusal(code, message, dict(trailing_metadata))

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self.request.headers.items())  # lower-cased names, as gRPC's

    def peer(self) -> str:
        client = self.request.client
        return f"http:{client.host}:{client.port}" if client else "http:unknown"


class OpenAIApi:
    """The routes, around one `Gateway`."""

    def __init__(self, gateway, tokens) -> None:
        self.gateway, self.tokens = gateway, tokens

    def app(self) -> FastAPI:
        # No /docs nor /openapi.json: they would be routes without authentication.
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(ApiError, lambda _, exc: exc.response())
        app.add_exception_handler(Refusal, lambda _, exc: exc.error().response())
        app.add_exception_handler(schema.RequestError, _bad_request)
        app.add_exception_handler(ClientGone, lambda *_: Response(status_code=499))
        app.add_exception_handler(HTTPException, _http_error)
        app.get("/health")(self.health)
        api = APIRouter(dependencies=[Depends(self.authorized)])
        api.post("/v1/completions")(self.completions)
        api.post("/v1/chat/completions")(self.chat_completions)
        api.get("/v1/models")(self.models)
        api.post("/tokenize")(self.tokenize)
        api.post("/detokenize")(self.detokenize)
        api.get("/metrics")(self.metrics)
        app.include_router(api)
        app.add_middleware(Counted)
        return app

    async def authorized(self, request: Request) -> None:
        if self.tokens is None:
            return
        header = request.headers.get("authorization")
        if not self.tokens.accepts(header):
            reason = "missing bearer token" if not header else "wrong bearer token"
            message = f"{reason}: send the header 'Authorization: Bearer <token>'"
            raise ApiError(401, message, code="invalid_api_key")

    # -- routes ------------------------------------------------------------------------

    async def health(self) -> Response:
        if self.gateway.draining:
            raise ApiError(503, "this gateway is draining; retry on another")
        if not self.gateway.ready:
            raise ApiError(503, "no engine replica is ready; retry")
        return Response(status_code=200)

    async def completions(self, request: Request) -> Response:
        body = schema.parse(schema.CompletionBody, await _json(request))
        return await self._generate(request, body, schema.completion_request, replies.COMPLETION)

    async def chat_completions(self, request: Request) -> Response:
        body = schema.parse(schema.ChatBody, await _json(request))
        return await self._generate(request, body, schema.chat_request, replies.CHAT)

    async def models(self, request: Request) -> dict:
        info = await self.gateway.GetModelInfo(pb.GetModelInfoRequest(), HttpCall(request))
        model = {"id": info.model, "object": "model", "created": 0, "owned_by": "selfspec"}
        model.update(root=info.model, max_model_len=info.max_model_len)
        return {"object": "list", "data": [model]}

    async def tokenize(self, request: Request) -> dict:
        body = schema.parse(schema.TokenizeBody, await _json(request))
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise schema.RequestError("give one of prompt or messages", "prompt")
        if body.prompt is not None:
            asked = pb.TokenizeRequest(prompt=body.prompt)
        else:
            asked = pb.TokenizeRequest(messages=schema.messages(body.messages, body))
        got = await self.gateway.Tokenize(asked, HttpCall(request))
        tokens = list(got.token_ids)
        return {"count": len(tokens), "max_model_len": got.max_model_len, "tokens": tokens}

    async def detokenize(self, request: Request) -> dict:
        body = schema.parse(schema.DetokenizeBody, await _json(request))
        self._check_model(body.model)
        ids = [schema.unsigned("tokens", t) for t in body.tokens]
        got = await self.gateway.Detokenize(pb.DetokenizeRequest(token_ids=ids), HttpCall(request))
        return {"prompt": got.text}

    async def metrics(self) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # -- generation --------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        """Refuse another model than the one served; before the first probe has answered,
        the gateway is not ready, and `_admit` refuses the call anyway."""
        info = self.gateway.model_info
        if model is not None and info is not None and model != info.model:
            raise ApiError(
                404,
                f"the model {model!r} does not exist: this server serves {info.model!r} "
                "(GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def _generate(self, request: Request, body, translate, kind: str) -> Response:
        request_ = translate(body)
        self._check_model(body.model)
        call = HttpCall(request)
        request_ = await self.gateway._admit(request_, call)
        info = self.gateway.model_info
        model = body.model or (info.model if info is not None else "")
        reply = replies.Reply(kind, request_, model)
        responses = self.gateway._forward(request_, call)
        if not body.stream:
            await _unless_gone(request, _collect(reply, responses))
            return JSONResponse(reply.whole())
        # The first response before the headers: a refusal upstream (a full fleet, a prompt
        # the model cannot take) is the call's HTTP status, not an event in a 200 stream.
        first = await _unless_gone(request, _first(responses))
        usage = body.stream_options is not None and body.stream_options.include_usage
        events = _events(reply, first, responses, usage)
        return StreamingResponse(events, media_type="text/event-stream")


class ClientGone(Exception):
    """The client closed the connection before its answer."""


async def _json(request: Request):
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise schema.RequestError(f"the body is not valid JSON: {exc}") from None


async def _collect(reply: replies.Reply, responses) -> None:
    async with contextlib.aclosing(responses):
        async for response in responses:
            reply.add(response)


async def _first(responses) -> pb.GenerateResponse:
    try:
        return await anext(responses)
    except BaseException:
        await responses.aclose()
        raise


async def _events(reply: replies.Reply, first, responses, usage: bool):
    async with contextlib.aclosing(responses):
        try:
            yield replies.event(reply.chunk(first))
            async for response in responses:
                yield replies.event(reply.chunk(response))
            if usage:
                yield replies.event(reply.usage_chunk())
        except Refusal as refusal:  # after the headers: an error event ends the stream
            yield replies.event(refusal.error().body())
        yield replies.DONE


async def _unless_gone(request: Request, work):
    """Await `work`, cancelling it (which cancels the upstream call, so the replica frees
    the request's blocks) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Refusal):
                await task
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _bad_request(_, exc: schema.RequestError) -> JSONResponse:
    return ApiError(400, str(exc), param=exc.param).response()


async def _http_error(_, exc: HTTPException) -> JSONResponse:
    """Starlette's own (an unknown route, a wrong method) in OpenAI's shape."""
    return ApiError(exc.status_code, str(exc.detail)).response()


class Counted:
    """Counts each HTTP call by route and status (metrics.HTTP_CALLS); a client gone
    before its answer counts as 499."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [499]

        async def counting(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting)
        except Exception:
            status[0] = 500  # ServerErrorMiddleware, outside this one, answers it so
            raise
        finally:
            metrics.HTTP_CALLS.labels(route, str(status[0])).inc()


# -- the server --------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """None: the gateway handles SIGTERM itself, draining gRPC and HTTP together."""
        yield


class HttpServer:
    """uvicorn serving the API on `config.http_listen`, in the running event loop. The
    port is bound at construction, so that a taken port fails the start as gRPC's does."""

    def __init__(self, gateway, config) -> None:
        self.socket = _bind(config.http_listen)
        self.port = self.socket.getsockname()[1]
        app = OpenAIApi(gateway, config.tokens).app()
        settings = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # the gateway's logging, untouched
            access_log=False,
            ssl_certfile=config.tls_cert,  # read at start, unlike gRPC's (re-read on change)
            ssl_keyfile=config.tls_key,
            timeout_graceful_shutdown=1,  # streams have had the drain to finish
        )
        self.server = _Uvicorn(settings)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # its error
                raise RuntimeError("the HTTP server stopped as it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.task is not None:
            self.server.should_exit = True
            await self.task


def _bind(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except (OSError, ValueError) as exc:
        sock.close()
        raise ValueError(f"cannot listen for HTTP on {address}: {exc}") from None
    sock.listen(2048)
    return sock
