"""`selfspec client`: send one request to a gateway, print the text and the usage."""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf import json_format

from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfspec client", description=__doc__)
    p.add_argument("--address", default="127.0.0.1:50051", help="the gateway, host:port")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without chat")
    p.add_argument("--session", default="", help="session id: turns of one conversation")
    p.add_argument("--stream", action="store_true", help="print text as it arrives")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--draft", help='drafting override as JSON, e.g. \'{"mode": "ngram"}\'')
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    p.add_argument("--token", default=os.environ.get("SELFSPEC_TOKEN"), help="bearer token")
    p.add_argument("--tls-ca", help="verify the gateway's TLS certificate against this CA")
    p.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    return p


def request_from(args: argparse.Namespace) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        session_id=args.session, max_tokens=args.max_tokens, temperature=args.temperature
    )
    if args.seed is not None:
        req.seed = args.seed
    if args.raw:
        req.prompt = args.prompt
    else:
        req.messages.messages.add(role="user", content=args.prompt)
    if args.draft:
        req.draft.update(json.loads(args.draft))
    return req


def channel(address: str, tls_ca: str | None) -> grpc.Channel:
    if tls_ca:
        with open(tls_ca, "rb") as f:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()))
    return grpc.insecure_channel(address)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    try:
        request = request_from(args)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"selfspec client: error: {exc}", file=sys.stderr)
        return 2
    with channel(args.address, args.tls_ca) as ch:
        stub = pb_grpc.GenerationStub(ch)
        try:
            if args.stream and not args.json:
                last = pb.GenerateResponse()
                for response in stub.Generate(request, metadata=metadata, timeout=args.timeout):
                    print(response.text, end="", flush=True)
                    last = response
                print()
            else:
                last = stub.GenerateUnary(request, metadata=metadata, timeout=args.timeout)
                if not args.json:
                    print(last.text)
        except grpc.RpcError as err:
            print(f"selfspec client: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    if args.json:
        reply = json_format.MessageToDict(last, always_print_fields_with_no_presence=True)
        print(json.dumps(reply, indent=2))
    else:
        print(_usage_line(last), file=sys.stderr)
    return 0


def _usage_line(last: pb.GenerateResponse) -> str:
    u = last.usage
    reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    return (
        f"[{reason}] prompt {u.prompt_tokens} tokens ({u.cached_prompt_tokens} cached), "
        f"completion {u.completion_tokens}, drafted {u.drafted_tokens}, "
        f"accepted {u.accepted_tokens}, replica {last.replica_id}"
    )
