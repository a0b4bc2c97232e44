"""Fuzzed calls for the fleet tests: garbage bytes for the gRPC layer, and valid calls of
every kind that reach the engine, each checked against what its request deserves."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

import grpc

from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc

Code = grpc.StatusCode
VOCAB = 49152  # the default model's
LAYERS = 30
STOP_STRINGS = ["\n", ".", ",", " the", "and", "!", "?", "ing", "I"]
TEXTS = [
    "Tell me a story about a lighthouse.",
    "List the planets.",
    "What is 17 times 23?",
    "Write a haiku about snow.",
    "def quicksort(xs):",
    "Repeat after me: one two three one two three one two three",
    "Translate 'good morning' into French, Spanish and German.",
    "¿Dónde está la biblioteca? 日本語で答えてください。",
]


def garbage_request(rng: random.Random, i: int) -> bytes:
    """Bytes that are garbage, a mutated valid request, or a request with extreme fields."""
    choice = i % 3
    if choice == 0:
        return rng.randbytes(rng.randint(0, 64))
    req = pb.GenerateRequest(max_tokens=rng.choice([1, 2, 3]))
    text = "".join(
        chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x10FFFF)]))
        for _ in range(rng.randint(1, 40))
    )
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    kind = rng.choice(["prompt", "ids", "messages"])
    if kind == "prompt":
        req.prompt = text
    elif kind == "ids":
        req.prompt_token_ids.ids.extend(
            rng.randint(0, 2**32 - 1) >> rng.randint(0, 32) for _ in range(rng.randint(0, 5))
        )
    else:
        req.messages.messages.add(role=rng.choice(["user", "system", "", "robot"]), content=text)
    if rng.random() < 0.5:
        setattr(
            req,
            rng.choice(["temperature", "top_p"]),
            rng.choice([0.0, -1.0, 1e30, float("nan"), float("inf"), 0.5]),
        )
    if rng.random() < 0.3:
        req.top_k = rng.choice([0, 40, rng.randint(0, 2**32 - 1)])  # in range, or likely not
    if rng.random() < 0.3:
        req.seed = rng.choice([7, rng.randint(0, 2**64 - 1)])
    if rng.random() < 0.3:
        req.stop.extend(rng.choice(["", "x" * 300, "\n"]) for _ in range(rng.randint(1, 20)))
    if rng.random() < 0.3:
        req.draft.update(
            {
                rng.choice(["mode", "max_draft", "skip_attn", "zzz"]): rng.choice(
                    [1.5, -3, "auto", [1, 2], None, 1e20]
                )
            }
        )
    data = bytearray(req.SerializeToString())
    if choice == 2 and data:  # flip a few bytes of a valid request
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


# -- calls that reach the engine -----------------------------------------------------------

# What the test does with the call: read it to the end (unary or streaming), cancel it
# after a few responses, abort it by id from another call, give it a short deadline, or
# send it with one field out of bounds.
KINDS = ("unary", "stream", "cancel", "abort", "deadline", "invalid")


@dataclass
class Case:
    kind: str
    request: pb.GenerateRequest
    reads: int = 1  # responses read before cancelling or aborting
    deadline_s: float = 300.0


@dataclass
class Result:
    code: Code
    details: str = ""
    responses: list[pb.GenerateResponse] = field(default_factory=list)
    aborted: bool = False  # Abort found the request

    @property
    def token_ids(self) -> list[int]:
        return [t for r in self.responses for t in r.token_ids]

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.responses)


def engine_case(rng: random.Random, i: int) -> Case:
    """A valid request of random shape, and what to do with it."""
    kind = KINDS[rng.choices(range(len(KINDS)), weights=(3, 3, 1, 1, 1, 1))[0]]
    req = pb.GenerateRequest(request_id=f"fuzz-{i}", max_tokens=_length(rng))
    _input(rng, req)
    if rng.random() < 0.3:
        req.session_id = f"fuzz-session-{rng.randrange(4)}"
    if rng.random() < 0.5:
        req.temperature = rng.uniform(0.3, 1.5)
        if rng.random() < 0.5:
            req.top_p = rng.uniform(0.5, 1.0)
        if rng.random() < 0.5:
            req.top_k = rng.randint(0, 100)
        if rng.random() < 0.5:
            req.seed = rng.randrange(2**32)
    if rng.random() < 0.3:
        req.stop.extend(rng.sample(STOP_STRINGS, rng.randint(1, 3)))
    if rng.random() < 0.2:  # low ids are the tokenizer's commonest merges: these do stop
        req.stop_token_ids.extend(rng.randrange(600) for _ in range(rng.randint(1, 3)))
    req.ignore_eos = rng.random() < 0.3
    if rng.random() < 0.4:
        req.draft.update(_draft(rng))
    if kind == "invalid":
        _break_one_field(rng, req)
    return Case(
        kind,
        req,
        reads=rng.randint(0, 3) if kind == "cancel" else 1,
        deadline_s=rng.uniform(0.3, 3.0) if kind == "deadline" else 300.0,
    )


def _length(rng: random.Random) -> int:
    """Mostly short, a few up to hundreds of tokens."""
    bucket = rng.random()
    if bucket < 0.5:
        return rng.randint(1, 8)
    return rng.randint(9, 64) if bucket < 0.9 else rng.randint(65, 300)


def _input(rng: random.Random, req: pb.GenerateRequest) -> None:
    kind = rng.choice(["prompt", "ids", "messages"])
    if kind == "prompt":
        req.prompt = rng.choice(TEXTS)
    elif kind == "ids":
        req.prompt_token_ids.ids.extend(rng.randrange(VOCAB) for _ in range(rng.randint(1, 40)))
    else:
        if rng.random() < 0.3:
            req.messages.messages.add(role="system", content="Answer briefly.")
        req.messages.messages.add(role="user", content=rng.choice(TEXTS))


def _draft(rng: random.Random) -> dict:
    layers = sorted(rng.sample(range(LAYERS), rng.randint(1, 8)))
    return rng.choice(
        [
            {"mode": "off"},
            {"mode": "auto"},
            {"mode": "ngram", "max_draft": rng.randint(1, 8)},
            {"mode": "skip", "skip_attn": layers, "max_draft": rng.randint(1, 6)},
            {"mode": "skip", "skip_mlp": layers[:2], "shortlist": 4096},
            {"mode": "early_exit", "exit_layer": rng.randint(4, LAYERS - 1)},
        ]
    )


def _break_one_field(rng: random.Random, req: pb.GenerateRequest) -> None:
    """One field out of its bounds: the gateway or the replica must refuse the call."""
    broken = rng.choice(["max_tokens", "temperature", "top_p", "stop", "mode", "skip_attn"])
    if broken == "max_tokens":
        req.max_tokens = 0
    elif broken == "temperature":
        req.temperature = -0.5
    elif broken == "top_p":
        req.top_p = 1.5
    elif broken == "stop":
        req.stop.append("")
    elif broken == "mode":
        req.draft.update({"mode": "sideways"})
    else:  # a layer the model lacks: only the replica can tell
        req.draft.update({"mode": "skip", "skip_attn": [LAYERS + 3]})


async def run_case(stub, case: Case) -> Result:
    """Send the call, do with it what its kind says, and return how it ended."""
    if case.kind == "unary":
        try:
            reply = await stub.GenerateUnary(case.request, timeout=case.deadline_s)
        except grpc.aio.AioRpcError as err:
            return Result(err.code(), err.details() or "")
        return Result(Code.OK, responses=[reply])
    call = stub.Generate(case.request, timeout=case.deadline_s)
    if case.kind == "cancel" and case.reads == 0:  # gone before its first response
        call.cancel()
        return Result(await call.code())
    result = Result(Code.OK)
    try:
        while (response := await call.read()) is not grpc.aio.EOF:
            result.responses.append(response)
            if len(result.responses) == case.reads and case.kind == "cancel":
                call.cancel()
                break
            if len(result.responses) == case.reads and case.kind == "abort":
                abort = pb.AbortRequest(request_id=case.request.request_id)
                result.aborted = (await stub.Abort(abort, timeout=30)).found
    except grpc.aio.AioRpcError:
        pass  # the status is read below
    result.code = await call.code()
    result.details = await call.details() or ""
    return result


def check(case: Case, result: Result) -> str | None:
    """What is wrong with how the call ended, or None."""
    allowed = {
        "unary": {Code.OK},
        "stream": {Code.OK},
        "abort": {Code.OK},
        "cancel": {Code.OK, Code.CANCELLED},
        "deadline": {Code.OK, Code.DEADLINE_EXCEEDED},
        "invalid": {Code.INVALID_ARGUMENT},
    }[case.kind]
    if result.code not in allowed:
        return f"status {result.code.name}: {result.details}"
    if result.code != Code.OK or case.kind == "cancel":
        return None  # nothing more to check on a call that ended early
    return _check_output(case.request, result)


def _check_output(req: pb.GenerateRequest, result: Result) -> str | None:
    *middle, last = result.responses
    ids, finish = result.token_ids, last.finish_reason
    if any(r.finish_reason for r in middle):
        reasons = [r.finish_reason for r in result.responses]
        return f"a finish reason before the last response: {reasons}"
    if last.usage.completion_tokens != len(ids) or len(ids) > req.max_tokens:
        return f"{len(ids)} tokens, usage says {last.usage.completion_tokens}"
    if finish == pb.FINISH_REASON_ABORT:
        return None if result.aborted else "finished ABORT without an abort"
    # Aborted or not, a call that finished by itself (perhaps as the abort came) is whole.
    if finish == pb.FINISH_REASON_LENGTH and len(ids) != req.max_tokens:
        return f"LENGTH after {len(ids)} of {req.max_tokens} tokens"
    if finish == pb.FINISH_REASON_STOP and req.ignore_eos and not (req.stop or req.stop_token_ids):
        return "STOP although nothing could stop it"
    if set(ids[:-1]) & set(req.stop_token_ids):
        return "output goes on past a stop token"
    if any(s in result.text for s in req.stop):
        return "a stop string in the output"
    return None


async def fuzz_engine(address: str, cases: int, concurrency: int, seed: int) -> Counter:
    """`cases` fuzzed calls, `concurrency` at a time; returns how many ended how, by kind,
    and raises on the first call that ended wrongly."""
    rng = random.Random(seed)
    todo = [engine_case(rng, i) for i in range(cases)]
    seen: Counter = Counter()
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(case: Case) -> None:
            async with gate:
                result = await run_case(stub, case)
            problem = check(case, result)
            assert problem is None, (problem, case.kind, case.request, result.details)
            seen[case.kind, result.code.name] += 1

        await asyncio.gather(*(one(c) for c in todo))
    return seen
