"""The replica's Tokenize, Detokenize and logprobs, called in-process: an `EngineServer`
around a real engine, with no Ray and no proxy (the gateway's tests go end to end)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from services.engine import Engine
from services.gen.selfspec.v1 import generation_pb2 as pb
from services.serve.app import EngineServer, _Refused

TURNS = [pb.Message(role="user", content="Name a colour.")]


@pytest.fixture(scope="module")
def replica(engine):
    """An `EngineServer` as its constructor leaves it, less Serve, metrics and the fleet."""
    server = EngineServer.__new__(EngineServer)
    server.internal, server.owners, server.replica_id = None, {}, "replica-test"
    server.engine = Engine(
        engine.model, engine.tokenizer, engine.model_path, kv_cache_bytes=16 << 20
    )
    server.metrics = SimpleNamespace(
        queue_time=SimpleNamespace(observe=lambda _: None), request_done=lambda _: None
    )
    yield server
    server.engine.shutdown()


def call(method, request):
    return asyncio.run(method(request))


def test_tokenize_gives_what_generate_feeds_the_model(replica):
    eng = replica.engine
    said = call(replica.Tokenize, pb.TokenizeRequest(prompt="Hello there"))
    assert list(said.token_ids) == eng.encode("Hello there")
    assert said.max_model_len == eng.model.max_positions
    messages = pb.Messages(messages=TURNS)
    said = call(replica.Tokenize, pb.TokenizeRequest(messages=messages))
    assert list(said.token_ids) == eng.encode([{"role": "user", "content": "Name a colour."}])
    partial = pb.Message(role="assistant", content="I pick")
    go_on = pb.Messages(messages=[*TURNS, partial], continue_final_message=True)
    said = call(replica.Tokenize, pb.TokenizeRequest(messages=go_on))
    assert eng.tokenizer.decode(list(said.token_ids)).endswith("I pick")


def test_detokenize_and_its_refusals(replica):
    ids = replica.engine.encode("Hello there")
    assert call(replica.Detokenize, pb.DetokenizeRequest(token_ids=ids)).text == "Hello there"
    refusals = [
        (replica.Detokenize, pb.DetokenizeRequest(token_ids=[replica.engine.model.vocab_size])),
        (
            replica.Tokenize,
            pb.TokenizeRequest(messages=pb.Messages(messages=TURNS, continue_final_message=True)),
        ),
        (replica.Tokenize, pb.TokenizeRequest()),
    ]
    for method, request in refusals:
        with pytest.raises(_Refused) as refused:
            call(method, request)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_generate_returns_logprobs_with_token_text(replica):
    request = pb.GenerateRequest(prompt="The sky is", max_tokens=6, logprobs=2, ignore_eos=True)
    reply = call(replica.GenerateUnary, request)
    decode = replica.engine.tokenizer.decode
    assert [lp.token_id for lp in reply.logprobs] == list(reply.token_ids)
    for lp in reply.logprobs:
        assert lp.token == decode([lp.token_id]) and len(lp.top) == 2
        assert lp.top[0].token_id == lp.token_id and lp.top[0].token == lp.token
    plain = call(replica.GenerateUnary, pb.GenerateRequest(prompt="The sky is", max_tokens=3))
    assert not plain.logprobs
