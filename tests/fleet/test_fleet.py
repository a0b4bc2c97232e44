"""End to end over real gRPC on loopback: gateway, Serve's proxy, two engine replicas.

The test that kills a replica comes last: the fleet is shared by the whole module.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fleet_helpers import chat, replica_stats, start_gateway, wait_until
from fuzzing import KINDS, fuzz_engine, garbage_request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc

Code = grpc.StatusCode


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        result = call(*args, **kwargs)
        if not isinstance(result, pb.GenerateResponse | pb.ModelInfo | pb.AbortResponse):
            list(result)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return Code.OK, ""


# -- generation ------------------------------------------------------------------------


def test_unary_and_streaming_agree_and_report_usage(stub):
    unary = stub.GenerateUnary(chat("Name three colours.", 16), timeout=120)
    parts = list(stub.Generate(chat("Name three colours.", 16), timeout=120))
    assert unary.text and unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert "".join(p.text for p in parts) == unary.text
    assert [t for p in parts for t in p.token_ids] == list(unary.token_ids)
    assert all(p.finish_reason == pb.FINISH_REASON_UNSPECIFIED for p in parts[:-1])
    usage = parts[-1].usage
    assert usage.completion_tokens == len(unary.token_ids) == 16
    assert usage.prompt_tokens > 0 and usage.accepted_tokens <= usage.drafted_tokens
    assert usage.verify_steps >= 1 and unary.request_id


def test_greedy_output_through_the_gateway_is_the_engines_own(stub):
    """The same engine, loaded here and run with drafting off, gives the same tokens."""
    import torch

    from services.engine import Engine, SamplingParams

    prompts = ["Write a haiku about rain.", "What is 12 times 7?", "def fib(n):"]
    got = [stub.GenerateUnary(chat(p, 24), timeout=120).token_ids for p in prompts]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas run
    try:
        engine = Engine.from_pretrained("default", kv_cache_bytes=32 << 20)  # as replicas do
        want = [
            engine.generate(p, SamplingParams(max_tokens=24), "off", chat=True)[0].token_ids
            for p in prompts
        ]
    finally:
        torch.set_num_threads(threads)
    assert [list(g) for g in got] == want


def test_model_info(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.num_layers == 30 and info.vocab_size > 1000 and info.max_model_len >= 2048
    assert info.architecture in ("LlamaForCausalLM", "llama") and info.dtype == "gguf"
    assert info.default_draft["mode"] == "auto"


def test_drafting_override_is_applied_and_exact(stub):
    base = stub.GenerateUnary(chat("List the days of the week.", 20), timeout=120)
    req = chat("List the days of the week.", 20)
    req.draft.update({"mode": "ngram", "max_draft": 6})
    ngram = stub.GenerateUnary(req, timeout=120)
    assert list(ngram.token_ids) == list(base.token_ids)


# -- health and reflection ---------------------------------------------------------------


def test_health_and_reflection(fleet):
    with grpc.insecure_channel(fleet.options.listen) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "selfspec.v1.Generation"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        names = {s.name for s in reply.list_services_response.service}
    assert {"selfspec.v1.Generation", "grpc.health.v1.Health"} <= names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(max_tokens=4), "one of prompt"),
        (pb.GenerateRequest(prompt="hi", max_tokens=0), "max_tokens"),
        (pb.GenerateRequest(prompt="hi", temperature=-1), "temperature"),
        (pb.GenerateRequest(prompt="hi", top_p=1.5), "top_p"),
        (pb.GenerateRequest(prompt="hi", stop=["x" * 300]), "stop"),
        (pb.GenerateRequest(prompt="x" * ((1 << 20) + 1)), "prompt has"),
        (pb.GenerateRequest(prompt="hi", session_id="s" * 300), "session_id"),
        (pb.GenerateRequest(prompt="hi", request_id="r\u00e9\n"), "request_id"),
        (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[10**9])), "token ids"),
        (pb.GenerateRequest(prompt="hi", max_tokens=100_000), "max_tokens"),
    ],
)
def test_invalid_requests_name_the_field(stub, request_, field):
    code, details = code_of(stub.GenerateUnary, request_, timeout=60)
    assert code == Code.INVALID_ARGUMENT and field in details, details


@pytest.mark.parametrize(
    ("draft", "words"),
    [
        ({"bogus": 1}, "unknown setting 'bogus'"),
        ({"max_draft": 2.5}, "draft.max_draft"),
        ({"mode": "sideways"}, "draft mode"),
        ({"mode": "skip", "skip_attn": [99]}, "skip_attn"),  # refused by the replica
    ],
)
def test_invalid_drafting_overrides(stub, draft, words):
    req = chat("hi", 4)
    req.draft.update(draft)
    code, details = code_of(stub.Generate, req, timeout=60)
    assert code == Code.INVALID_ARGUMENT and words in details, details


def test_malformed_and_oversized_messages(fleet):
    with grpc.insecure_channel(fleet.options.listen) as channel:
        raw = channel.unary_unary("/selfspec.v1.Generation/GenerateUnary")
        code, details = code_of(raw, b"\xff\xff\xff\xff", timeout=10)
        assert code == Code.INVALID_ARGUMENT and "does not parse" in details
        bad_utf8 = b"\x1a\x02\xff\xfe"  # field 3 (prompt), two bytes that are not UTF-8
        code, details = code_of(raw, bad_utf8, timeout=10)
        assert code == Code.INVALID_ARGUMENT, details
        code, _ = code_of(raw, pb.GenerateRequest(prompt="x" * (9 << 20)).SerializeToString())
        assert code == Code.RESOURCE_EXHAUSTED


def all_idle() -> bool:
    return all(
        s["running"] == s["waiting"] == s["prefilling"] == s["kv_blocks_in_use"] == 0
        for s in replica_stats().values()
    )


def test_deadline_exceeded_aborts_the_request(stub):
    # A fixed 500 tokens: seconds even where the engine is fast, past any EOS.
    request = chat("Count to a thousand.", 500, ignore_eos=True)
    code, _ = code_of(stub.GenerateUnary, request, timeout=1.5)
    assert code == Code.DEADLINE_EXCEEDED
    wait_until(all_idle, 30, "the expired request's blocks to be freed")


def test_cancelling_a_stream_aborts_it_on_the_replica(stub):
    call = stub.Generate(chat("Tell a long story.", 400, ignore_eos=True), timeout=120)
    first = next(call)
    busy = replica_stats()[first.replica_id]
    assert busy["running"] == 1 and busy["kv_blocks_in_use"] > 0
    call.cancel()
    assert call.code() == Code.CANCELLED
    wait_until(lambda: aborted_and_idle(first.replica_id, busy), 30, "the cancelled request's end")


def aborted_and_idle(replica_id: str, before: dict) -> bool:
    """Whether the replica has ended one more request by aborting it (not by finishing
    it), and holds no request and no block but its sessions'."""
    now = replica_stats()[replica_id]
    aborts = now["finished"].get("abort", 0) - before["finished"].get("abort", 0)
    return aborts == 1 and now["running"] == now["kv_blocks_in_use"] == 0


def test_abort_ends_the_stream_with_finish_reason_abort(stub):
    call = stub.Generate(
        chat("Tell a long story.", 400, ignore_eos=True, request_id="to-abort"), timeout=120
    )
    first = next(call)
    assert stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=10).found
    rest = list(call)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) < 400
    assert not stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=10).found
    wait_until(all_idle, 30, "the aborted request's blocks to be freed")


def test_authentication(fleet, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    proc, address = start_gateway(fleet, "--token-file", str(token))
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            code, details = code_of(stub.GenerateUnary, chat("hi", 2), timeout=30)
            assert code == Code.UNAUTHENTICATED and "missing bearer token" in details
            wrong = [("authorization", "Bearer nope")]
            code, details = code_of(stub.GenerateUnary, chat("hi", 2), metadata=wrong, timeout=30)
            assert code == Code.UNAUTHENTICATED and "wrong bearer token" in details
            right = [("authorization", "Bearer s3cret")]
            assert stub.GenerateUnary(chat("hi", 2), metadata=right, timeout=60).token_ids
            token.write_text("rotated")  # a rotated Secret applies without a restart
            stamp = token.stat().st_mtime + 1  # a new mtime, however coarse the clock
            os.utime(token, (stamp, stamp))
            code, _ = code_of(stub.GenerateUnary, chat("hi", 2), metadata=right, timeout=30)
            assert code == Code.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel)  # probes need no token
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    finally:
        proc.kill()
        proc.wait()


def test_tls(fleet, tmp_path):
    """With a certificate and key, the gateway serves TLS only; a client that trusts the
    certificate gets answers, a plaintext client does not."""
    import subprocess

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    proc, address = start_gateway(fleet, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(address, credentials) as channel:
            reply = pb_grpc.GenerationStub(channel).GenerateUnary(chat("hi", 2), timeout=60)
            assert len(reply.token_ids) == 2
        with grpc.insecure_channel(address) as channel:
            code, _ = code_of(
                pb_grpc.GenerationStub(channel).GenerateUnary, chat("hi", 2), timeout=10
            )
            assert code == Code.UNAVAILABLE
    finally:
        proc.kill()
        proc.wait()


def test_unreachable_upstream_is_unavailable(fleet):
    from services.serve.local import free_port

    proc, address = start_gateway(fleet, "--upstream", f"127.0.0.1:{free_port()}")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            code, _ = code_of(stub.GenerateUnary, chat("hi", 2), timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert code == Code.UNAVAILABLE


def test_metrics(fleet):
    """The gateway's /metrics count what the replies said, under vLLM's names."""
    import urllib.request

    from services.serve.local import free_port

    port = free_port()
    proc, address = start_gateway(fleet, "--metrics-port", str(port))
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            replies = [stub.GenerateUnary(chat(f"Say {w}.", 10), timeout=120) for w in "ab"]
            code_of(stub.GenerateUnary, pb.GenerateRequest(), timeout=30)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        proc.kill()
        proc.wait()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line and not line.startswith("#")
    }
    assert values["vllm:generation_tokens_total"] == sum(r.usage.completion_tokens for r in replies)
    assert values["vllm:spec_decode_num_draft_tokens_total"] == sum(
        r.usage.drafted_tokens for r in replies
    )
    assert values["vllm:spec_decode_num_accepted_tokens_total"] == sum(
        r.usage.accepted_tokens for r in replies
    )
    assert values['vllm:request_success_total{finished_reason="length"}'] == 2
    assert values["vllm:time_to_first_token_seconds_count"] == 2
    calls = 'selfspec_gateway_calls_total{{code="{}",method="GenerateUnary"}}'
    assert values[calls.format("INVALID_ARGUMENT")] == 1 and values[calls.format("OK")] == 2


def test_sigterm_drains(fleet):
    """On SIGTERM the gateway reports NOT_SERVING, refuses new calls as UNAVAILABLE and
    lets the stream in flight finish."""
    proc, address = start_gateway(fleet, "--drain-seconds", "60")
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        call = stub.Generate(chat("Tell a story.", 48, ignore_eos=True), timeout=120)
        next(call)
        proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
            10,
            "NOT_SERVING",
        )
        code, details = code_of(stub.GenerateUnary, chat("hi", 2), timeout=30)
        assert code == Code.UNAVAILABLE and "draining" in details
        rest = list(call)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert proc.wait(30) == 0


def test_a_gateway_killed_mid_stream_leaves_nothing_behind(fleet):
    """SIGKILL to a gateway while it streams: the replica aborts the request (it does not
    run it to its end) and frees its blocks."""
    proc, address = start_gateway(fleet)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            # As long as the replica's 32 MiB pool holds: about 15 s at one thread, so an
            # abort that is slow to cross Serve still comes before the request's end.
            call = stub.Generate(chat("Tell a long story.", 600, ignore_eos=True), timeout=120)
            first = next(call)
            busy = replica_stats()[first.replica_id]
            assert busy["running"] == 1
            proc.kill()
            assert code_of(list, call)[0] == Code.UNAVAILABLE
    finally:
        proc.kill()
        proc.wait()
    try:
        wait_until(lambda: aborted_and_idle(first.replica_id, busy), 60, "the orphaned request")
    except AssertionError as e:
        now = replica_stats()[first.replica_id]
        raise AssertionError(f"{e}: the replica before {busy}, now {now}") from None


def test_concurrent_streams_finish(stub):
    """Streams at once, spread over both replicas, all complete."""
    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda i: stub.GenerateUnary(chat(f"Say the number {i}.", 8), timeout=180),
                range(4),
            )
        )
    assert all(len(r.token_ids) > 0 for r in replies)
    assert len({r.replica_id for r in replies}) == 2


def test_serving_goes_on_while_redis_is_down(stub, fleet):
    """The replicas' fleet links lose Redis: generation goes on, with the same output."""
    import subprocess

    prompt = chat("Name three rivers.", 16)
    before = stub.GenerateUnary(prompt, timeout=120)
    fleet.redis.terminate()
    fleet.redis.wait(10)
    try:
        during = [stub.GenerateUnary(prompt, timeout=120) for _ in range(4)]
    finally:  # back on the same port, with the same users, for the tests after this one
        fleet.redis = subprocess.Popen(fleet.redis_argv, stdout=subprocess.DEVNULL)
    assert all(list(r.token_ids) == list(before.token_ids) for r in during)


FUZZ_CASES = int(os.environ.get("SELFSPEC_FUZZ_CASES", "2000"))
FUZZ_ENGINE_CASES = int(os.environ.get("SELFSPEC_FUZZ_ENGINE_CASES", "150"))


def test_fuzzed_bytes_get_proper_statuses_and_leave_nothing_behind(fleet):
    """Garbage and mutated requests (`SELFSPEC_FUZZ_CASES`, 2,000 by default; `make fuzz`
    runs more), one at a time: every reply is a result or INVALID_ARGUMENT (one call at a
    time never fills the fleet), the gateway stays up, and no KV block leaks."""
    rng = random.Random(20261123)
    seen: Counter = Counter()
    with grpc.insecure_channel(fleet.options.listen) as channel:
        raw = channel.unary_unary("/selfspec.v1.Generation/GenerateUnary")
        for i in range(FUZZ_CASES):
            code, details = code_of(raw, garbage_request(rng, i), timeout=60)
            assert code in (Code.OK, Code.INVALID_ARGUMENT), (i, code, details)
            seen[code] += 1
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    assert seen[Code.OK] > FUZZ_CASES // 20 and seen[Code.INVALID_ARGUMENT] > 0, seen
    wait_until(all_idle, 30, "every replica to be idle")


def test_fuzzed_calls_reach_the_engine_and_leave_nothing_behind(fleet, capsys):
    """Valid calls of random shape, eight at a time (`SELFSPEC_FUZZ_ENGINE_CASES`, 150 by
    default; `make fuzz` runs more): unary and streaming, cancelled, aborted by id, cut by
    short deadlines, with sessions, stop strings and ids, ignore_eos, drafting overrides
    and lengths up to 300 tokens, plus calls with one field out of bounds. Each ends as its
    request deserves (see `fuzzing.check`), and afterwards every replica has every block
    free but its sessions' and no request live."""
    seen = asyncio.run(fuzz_engine(fleet.options.listen, FUZZ_ENGINE_CASES, 8, seed=20261203))
    wait_until(all_idle, 60, "every replica to free its blocks")
    with capsys.disabled():
        print(f"\nfuzzed calls by kind and status: {dict(sorted(seen.items()))}")
    assert seen.total() == FUZZ_ENGINE_CASES
    assert {kind for kind, _ in seen} == set(KINDS)  # every kind was sent


# -- sessions, and a replica lost -----------------------------------------------------------


def test_session_affinity_and_failover(stub, fleet):
    """Turn two lands where turn one did and reuses its KV cache. That replica dies in
    the middle of turn three: the client gets a retryable UNAVAILABLE, and the retried
    turn goes to the other replica and succeeds."""
    import ray

    history = [pb.Message(role="user", content="My name is Ada. Say hello.")]

    def request(max_tokens: int = 12) -> pb.GenerateRequest:
        req = pb.GenerateRequest(session_id="ada", max_tokens=max_tokens)
        req.messages.messages.extend(history)
        return req

    def turn(text: str | None = None) -> pb.GenerateResponse:
        if text:
            history.append(pb.Message(role="user", content=text))
        reply = stub.GenerateUnary(request(), timeout=120)
        history.append(pb.Message(role="assistant", content=reply.text))
        return reply

    first = turn()
    second = turn("What is my name?")
    assert second.replica_id == first.replica_id
    assert second.usage.cached_prompt_tokens > 0
    assert second.usage.cached_prompt_tokens <= second.usage.prompt_tokens

    history.append(pb.Message(role="user", content="Tell me a long story about it."))
    stream = stub.Generate(request(max_tokens=300), timeout=120)
    assert next(stream).replica_id == first.replica_id
    name = next(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "Engine" in a["name"] and a["name"].endswith(first.replica_id)
    )
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    with pytest.raises(grpc.RpcError) as lost:
        list(stream)
    assert lost.value.code() == Code.UNAVAILABLE, lost.value.details()

    third = stub.GenerateUnary(request(), timeout=120)
    assert third.replica_id != first.replica_id and third.text
    assert third.usage.cached_prompt_tokens == 0
