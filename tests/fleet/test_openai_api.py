"""The OpenAI-compatible HTTP API, end to end, driven by the official `openai` package: a
local fleet of two replicas whose gateway serves HTTP with a bearer token, beside gRPC.

Every generation is short (at most a few dozen tokens, greedy unless a test samples on
purpose), so that the module, fleet start included, stays within a few minutes on two
cores. The gateways that a test provokes into overload, draining or having no replica are
their own, started beside the fleet's.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import grpc
import httpx
import openai
import pytest
from fleet_helpers import (
    REPLICAS,
    chat,
    fleet_config,
    launch_gateway,
    replica_stats,
    running_fleet,
    wait_until,
)

from services.gateway.server import GatewayConfig, GatewayServer, Upstream
from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc
from services.serve.local import free_port

TOKEN = "http-s3cret"
MODEL = "default"
PROMPTS = ["Write a haiku about rain.", "What is 12 times 7?"]


@pytest.fixture(scope="module")
def http_fleet(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("openai")
    token = log_dir / "token"
    token.write_text(TOKEN)
    with running_fleet(
        fleet_config(), log_dir, num_cpus=REPLICAS, gateway_args=["--token-file", str(token)]
    ) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def base_url(http_fleet) -> str:
    return f"http://{http_fleet.options.http_listen}"


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    # No retries: a test of a refusal must see the refusal.
    return openai.OpenAI(base_url=base_url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, headers=bearer(), timeout=120) as h:
        yield h


def bearer(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def async_client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


# -- generation ----------------------------------------------------------------------------


def test_completions_sync_async_streaming_and_not(client, base_url):
    asked = dict(model=MODEL, prompt="The capital of France is", max_tokens=10, temperature=0)
    whole = client.completions.create(**asked)
    (choice,) = whole.choices
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert choice.text and choice.finish_reason in ("stop", "length")
    chunks = list(client.completions.create(**asked, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text

    async def both():
        aclient = async_client(base_url)
        unary = await aclient.completions.create(**asked)
        stream = await aclient.completions.create(
            **asked, stream=True, stream_options={"include_usage": True}
        )
        parts = [chunk async for chunk in stream]
        return unary, parts

    unary, parts = asyncio.run(both())
    assert unary.choices[0].text == choice.text
    assert "".join(p.choices[0].text for p in parts if p.choices) == choice.text
    usage = parts[-1].usage  # its drafting may differ from the first call's (`auto`)
    assert parts[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    check_usage(whole.usage)


def test_chat_completions_sync_async_streaming_and_not(client, base_url):
    asked = dict(model=MODEL, messages=user("Name three colours."), max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**asked)
    (choice,) = whole.choices
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    check_usage(whole.usage)

    async def both():
        aclient = async_client(base_url)
        unary = await aclient.chat.completions.create(**asked)
        stream = await aclient.chat.completions.create(
            **asked, stream=True, stream_options={"include_usage": True}
        )
        return unary, [chunk async for chunk in stream]

    unary, parts = asyncio.run(both())
    assert unary.choices[0].message.content == choice.message.content
    deltas = [p.choices[0].delta for p in parts if p.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == choice.message.content
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == choice.finish_reason
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    synced = list(client.chat.completions.create(**asked, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in synced) == choice.message.content


def check_usage(usage) -> None:
    extra = usage.model_extra
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0
    assert 0 <= extra["accepted_tokens"] <= extra["drafted_tokens"]


def test_greedy_text_through_http_is_grpcs_and_the_engines_own(client, http_fleet):
    """The same request through HTTP, through the gateway's gRPC port, and through the same
    engine loaded here with drafting off: the same text."""
    import torch

    from services.engine import Engine, SamplingParams

    got = [
        client.chat.completions.create(
            model=MODEL, messages=user(p), max_tokens=24, temperature=0
        ).choices[0]
        for p in PROMPTS
    ]
    with grpc.insecure_channel(http_fleet.options.listen) as channel:
        stub = pb_grpc.GenerationStub(channel)
        metadata = [("authorization", f"Bearer {TOKEN}")]
        through_grpc = [
            stub.GenerateUnary(chat(p, 24), metadata=metadata, timeout=120) for p in PROMPTS
        ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas run
    try:
        engine = Engine.from_pretrained("default", kv_cache_bytes=32 << 20)
        want = engine.generate(PROMPTS, SamplingParams(max_tokens=24), "off", chat=True)
    finally:
        torch.set_num_threads(threads)
    assert [c.message.content for c in got] == [r.text for r in through_grpc]
    assert [c.message.content for c in got] == [w.text for w in want]


# A seed fixes the sample under a fixed drafting mode (`auto`, the fleet's default, decides
# from measured timings, so under it a seed fixes the distribution, not the sample).
FIXED_DRAFT = {"draft": {"mode": "ngram"}}


def test_n_choices_seeded(client):
    asked = dict(
        model=MODEL,
        messages=user("Say a word."),
        max_tokens=8,
        temperature=1,
        n=3,
        seed=7,
        extra_body=FIXED_DRAFT,
    )
    whole = client.chat.completions.create(**asked)
    assert sorted(c.index for c in whole.choices) == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in whole.choices)
    again = client.chat.completions.create(**asked)
    assert [c.message.content for c in again.choices] == [c.message.content for c in whole.choices]
    streamed: dict[int, str] = {}
    finished = set()
    for chunk in client.chat.completions.create(**asked, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    assert [streamed[i] for i in range(3)] == [c.message.content for c in whole.choices]


def test_seed_repeats_a_sample(client):
    asked = dict(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=12,
        temperature=1,
        seed=1234,
        extra_body=FIXED_DRAFT,
    )
    first, second = (client.completions.create(**asked).choices[0].text for _ in range(2))
    assert first == second


def test_logprobs_with_top_5(client):
    chat_reply = client.chat.completions.create(
        model=MODEL,
        messages=user("Count to five."),
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    ).choices[0]
    content = chat_reply.logprobs.content
    assert 0 < len(content) <= 6
    for t in content:
        assert len(t.top_logprobs) == 5 and t.logprob <= 0
        assert t.token == t.top_logprobs[0].token  # greedy takes the most likely
        assert t.bytes == list(t.token.encode())
    completion = client.completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0, logprobs=5
    ).choices[0]
    lp = completion.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(1 <= len(top) <= 5 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_logprobs_with_drafting_are_offs(client):
    """Greedy: a drafted token's logprobs come from the pass that verified it, the full
    model's own, so every drafting mode gives `off`'s, through the whole path."""

    def logprobs(mode: str) -> list:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=user("Count from one to ten."),
            max_tokens=16,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            extra_body={"draft": {"mode": mode}},
        ).choices[0]
        return [
            (t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
            for t in reply.logprobs.content
        ]

    off = logprobs("off")
    assert len(off) > 1
    for mode in ("ngram", "skip", "early_exit"):
        assert logprobs(mode) == off, mode


def test_stop(client):
    asked = dict(model=MODEL, messages=user("List the days of the week."), temperature=0)
    free = client.chat.completions.create(**asked, max_tokens=24).choices[0].message.content
    word = free.split()[len(free.split()) // 2]  # a word from the middle
    stopped = client.chat.completions.create(**asked, max_tokens=24, stop=[word]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == free[: free.index(word)]


def test_draft_and_session_id_in_the_body(client):
    """selfspec's own fields, in the body as vLLM takes its extensions: a drafting override
    (exact, so the same greedy text) and a session, whose second turn reuses the KV cache."""
    history = user("My name is Ada. Say hello.")
    asked = dict(model=MODEL, max_tokens=10, temperature=0)
    first = client.chat.completions.create(
        **asked, messages=history, extra_body={"session_id": "ada-http"}
    )
    ngram = client.chat.completions.create(
        **asked, messages=history, extra_body={"draft": {"mode": "ngram", "max_draft": 4}}
    )
    assert ngram.choices[0].message.content == first.choices[0].message.content
    history += [{"role": "assistant", "content": first.choices[0].message.content}]
    history += user("What is my name?")
    second = client.chat.completions.create(
        **asked, messages=history, extra_body={"session_id": "ada-http"}
    )
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_models_tokenize_and_detokenize(client, http):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.model_extra["max_model_len"] >= 2048
    tokens = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello there"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == model.model_extra["max_model_len"]
    text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"].strip() == "Hello there"
    counted = http.post("/tokenize", json={"messages": user("Say hi.")}).json()["count"]
    reply = client.chat.completions.create(model=MODEL, messages=user("Say hi."), max_tokens=2)
    assert counted == reply.usage.prompt_tokens


# -- refusals ------------------------------------------------------------------------------

COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": user("hi"), "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
        ("/v1/completions", {**COMPLETION, "top_p": 1.5}, "top_p"),
        ("/v1/completions", {**COMPLETION, "presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/completions", {**COMPLETION, "frequency_penalty": 0.5}, "frequency_penalty"),
        ("/v1/completions", {**COMPLETION, "repetition_penalty": 1.2}, "repetition_penalty"),
        ("/v1/completions", {**COMPLETION, "logit_bias": {"1": 2}}, "logit_bias"),
        ("/v1/completions", {**COMPLETION, "echo": True}, "echo"),
        ("/v1/completions", {**COMPLETION, "best_of": 3}, "best_of"),
        ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {**COMPLETION, "draft": {"bogus": 1}}, "draft"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json"}}, "response_format"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages",
        ),
        ("/tokenize", {"tokens": [1]}, "prompt"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(http, path, body, param):
    reply = http.post(path, json=body)
    error = openai_error(reply, 400)
    assert param in error["message"], error
    assert error["param"] in (param, None)


def test_nulls_are_unset_and_unknown_fields_ignored(http):
    """As vLLM: clients send fields OpenAI added later, and null for "not set"."""
    body = {**CHAT, "store": False, "metadata": {"a": "b"}, "logprobs": None, "n": None}
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 1


def test_a_body_that_is_not_json_is_400(http):
    error = openai_error(http.post("/v1/chat/completions", content=b"{nope"), 400)
    assert "JSON" in error["message"]


def test_an_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4", messages=user("hi"), max_tokens=2)
    assert refused.value.code == "model_not_found"
    error = openai_error(http.post("/v1/completions", json={**COMPLETION, "model": "x"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"


ROUTES = [
    ("POST", "/v1/completions", COMPLETION),
    ("POST", "/v1/chat/completions", CHAT),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1]}),
    ("GET", "/metrics", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_but_health_needs_the_token(base_url, method, path, body):
    with httpx.Client(base_url=base_url, timeout=60) as h:
        for headers in ({}, bearer("nope"), {"Authorization": TOKEN}):
            reply = h.request(method, path, json=body, headers=headers)
            assert "bearer token" in openai_error(reply, 401)["message"]
        assert h.request(method, path, json=body, headers=bearer()).status_code == 200
        assert h.get("/health").status_code == 200


def test_the_openai_client_raises_authentication_error(base_url):
    wrong = openai.OpenAI(base_url=base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_a_deadline_is_504_and_frees_the_request(http):
    body = {**CHAT, "max_tokens": 500, "ignore_eos": True}
    reply = http.post("/v1/chat/completions", json=body, headers={"x-request-timeout": "1"})
    openai_error(reply, 504)
    wait_until(all_idle, 30, "the expired request's blocks to be freed")


def test_metrics_count_http_calls(http, client):
    client.models.list()
    text = http.get("/metrics").text
    assert 'selfspec_gateway_http_requests_total{code="200",route="/v1/models"}' in text
    assert 'code="401"' in text and "vllm:generation_tokens_total" in text


# -- the client going away -----------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(base_url):
    before = replica_stats()
    body = {**CHAT, "messages": user("Tell a long story."), "max_tokens": 600}
    with (
        httpx.Client(base_url=base_url, headers=bearer(), timeout=60) as h,
        h.stream(
            "POST", "/v1/chat/completions", json={**body, "ignore_eos": True, "stream": True}
        ) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        busy = replica_stats()
        assert sum(s["kv_blocks_in_use"] for s in busy.values()) > 0
    # The connection is closed: the gateway cancels the call, the replica aborts it.
    wait_until(lambda: aborted_once_and_idle(before), 60, "the abandoned request's end")


def aborted_once_and_idle(before: dict) -> bool:
    now = replica_stats()
    aborts = sum(
        now[r]["finished"].get("abort", 0) - before[r]["finished"].get("abort", 0) for r in now
    )
    return aborts == 1 and all_idle(now)


def all_idle(stats: dict | None = None) -> bool:
    return all(
        s["running"] == s["waiting"] == s["kv_blocks_in_use"] == 0
        for s in (stats or replica_stats()).values()
    )


# -- overload, draining, no replica: gateways of their own ------------------------------


def test_overload_is_429_with_retry_after_and_draining_is_503(http_fleet):
    gateway, base = http_gateway(
        http_fleet, "--max-in-flight", "1", "--retry-after-ms", "1500", "--drain-seconds", "60"
    )
    try:
        with httpx.Client(base_url=base, timeout=120) as h:
            held = {**CHAT, "max_tokens": 40, "ignore_eos": True, "stream": True}
            with h.stream("POST", "/v1/chat/completions", json=held) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                refused = h.post("/v1/chat/completions", json=CHAT)
                assert "at its limit" in openai_error(refused, 429)["message"]
                # 1.5 s, jittered up to 1.5 times, in whole seconds
                assert int(refused.headers["Retry-After"]) in (2, 3)
                gateway.send_signal(signal.SIGTERM)
                wait_until(lambda: h.get("/health").status_code == 503, 10, "/health 503")
                draining = h.post("/v1/chat/completions", json=CHAT)
                assert "draining" in openai_error(draining, 503)["message"]
                rest = [line for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == (
                "length"
            )
        assert gateway.wait(30) == 0
    finally:
        gateway.kill()
        gateway.wait()


def test_no_replica_is_503(http_fleet):
    gateway, base = http_gateway(http_fleet, "--upstream", f"127.0.0.1:{free_port()}")
    try:
        with httpx.Client(base_url=base, timeout=60) as h:
            assert h.get("/health").status_code == 503
            refused = h.post("/v1/chat/completions", json=CHAT)
            assert "no engine replica" in openai_error(refused, 503)["message"]
            assert h.get("/v1/models").status_code == 503
    finally:
        gateway.kill()
        gateway.wait()


def http_gateway(fleet, *args: str) -> tuple[subprocess.Popen, str]:
    """A gateway of its own on the fleet, without a token, serving HTTP; (process, base URL)."""
    proc, (_, port) = launch_gateway(fleet, *args, http=True)
    return proc, f"http://127.0.0.1:{port}"


def openai_error(reply: httpx.Response, status: int) -> dict:
    """The reply's error, checked for OpenAI's shape and `status`."""
    assert reply.status_code == status, (reply.status_code, reply.text)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


# -- without a fleet -----------------------------------------------------------------------


class FailingUpstream(pb_grpc.GenerationServicer):
    """Serve's proxy, sending one message of each stream and then losing its replica."""

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model=MODEL, max_model_len=2048)

    async def Generate(self, request, context):
        yield pb.GenerateResponse(request_id=request.request_id, text="a", token_ids=[1])
        await context.abort(grpc.StatusCode.UNAVAILABLE, "replica lost")


def test_an_error_after_the_stream_began_is_an_error_event():
    async def scenario():
        upstream = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(FailingUpstream(), upstream)
        port = upstream.add_insecure_port("127.0.0.1:0")
        await upstream.start()
        config = GatewayConfig(
            "127.0.0.1:0", Upstream(f"127.0.0.1:{port}"), http_listen="127.0.0.1:0"
        )
        server = GatewayServer(config)
        await server.start()
        try:
            base = f"http://127.0.0.1:{server.http.port}"
            async with httpx.AsyncClient(base_url=base, timeout=30) as h:
                reply = await h.post("/v1/completions", json={**COMPLETION, "stream": True})
            return reply.status_code, reply.text
        finally:
            await server.stop()
            await upstream.stop(None)

    status, text = asyncio.run(scenario())
    events = [line.removeprefix("data: ") for line in text.splitlines() if line]
    assert status == 200 and events[-1] == "[DONE]", text
    assert json.loads(events[0])["choices"][0]["text"] == "a"
    error = json.loads(events[-2])["error"]
    assert error["message"] == "replica lost" and error["type"] == "server_error", error
