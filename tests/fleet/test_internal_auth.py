"""Serve's ingress answers only the gateway: against a real local fleet (Redis, Ray, Serve
with one engine replica, a gateway that requires a bearer token, as `selfspec serve` runs
it), calls sent straight to Serve's gRPC proxy port are refused with UNAUTHENTICATED
unless they carry the fleet's internal credential, and calls through the gateway work.
One fleet for the module; nothing else in it starts Ray."""

from __future__ import annotations

import grpc
import pytest
from fleet_helpers import chat, fleet_config, running_fleet

from services.common import internal_auth
from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc
from services.serve.local import Fleet

Code = grpc.StatusCode
TOKEN = "client-token"
LONG = 400  # tokens: a stream still running when the test aborts it


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    folder = tmp_path_factory.mktemp("secured-fleet")
    token = folder / "client-token"
    token.write_text(TOKEN + "\n")
    options = {"num_cpus": 1, "gateway_args": ["--token-file", str(token)]}
    with running_fleet(fleet_config(replicas=1), folder, **options) as f:
        yield f


@pytest.fixture(scope="module")
def proxy(fleet) -> pb_grpc.GenerationStub:
    """Serve's gRPC proxy itself, as anyone who reaches its port would call it."""
    with grpc.insecure_channel(fleet.upstream) as channel:
        yield pb_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def gateway(fleet) -> pb_grpc.GenerationStub:
    with grpc.insecure_channel(fleet.options.listen) as channel:
        yield pb_grpc.GenerationStub(channel)


def internal(fleet: Fleet, owner: str = "") -> list[tuple[str, str]]:
    md = [(internal_auth.METADATA_KEY, fleet.internal_token_file.read_text().strip())]
    return md + ([(internal_auth.OWNER_KEY, owner)] if owner else [])


def bearer(token: str = TOKEN) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def refusal(method, request, metadata) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        result = method(request, metadata=metadata, timeout=60)
        if not isinstance(result, pb.GenerateResponse | pb.ModelInfo | pb.AbortResponse):
            list(result)  # a stream: its status comes with its end
    return error.value


def test_the_fleets_secret_is_readable_by_its_owner_alone(fleet):
    path = fleet.internal_token_file
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_text().strip()) >= 32


@pytest.mark.parametrize(
    "credential",
    [
        [],
        [(internal_auth.METADATA_KEY, "a-guess")],
        bearer(),  # the client's token is not the fleet's credential
    ],
    ids=["none", "wrong", "client-token"],
)
@pytest.mark.parametrize("method", ["Generate", "GenerateUnary", "GetModelInfo", "Abort"])
def test_serves_proxy_refuses_every_method_without_the_internal_credential(
    proxy, method, credential
):
    request = {
        "Generate": chat("hi", 4),
        "GenerateUnary": chat("hi", 4),
        "GetModelInfo": pb.GetModelInfoRequest(),
        "Abort": pb.AbortRequest(request_id="anything"),
    }[method]
    error = refusal(getattr(proxy, method), request, credential)
    assert error.code() == Code.UNAUTHENTICATED, error.details()
    assert "only the fleet's gateways" in error.details()


def test_with_the_internal_credential_serves_proxy_answers(fleet, proxy):
    """The refusals above are the credential's doing: with it, the same port answers."""
    assert proxy.GetModelInfo(pb.GetModelInfoRequest(), metadata=internal(fleet), timeout=60).model
    reply = proxy.GenerateUnary(chat("hi", 4), metadata=internal(fleet), timeout=120)
    assert len(reply.token_ids) == 4


def test_through_the_gateway_generate_and_abort_work(gateway):
    assert len(gateway.GenerateUnary(chat("hi", 4), metadata=bearer(), timeout=120).token_ids) == 4
    request = chat("Tell a long story.", LONG, ignore_eos=True, request_id="gw-abort")
    call = gateway.Generate(request, metadata=bearer(), timeout=120)
    next(call)
    abort = pb.AbortRequest(request_id="gw-abort")
    assert gateway.Abort(abort, metadata=bearer(), timeout=10).found
    assert list(call)[-1].finish_reason == pb.FINISH_REASON_ABORT
    # The gateway itself still wants the client's token.
    assert refusal(gateway.Abort, abort, []).code() == Code.UNAUTHENTICATED


def test_a_replica_aborts_a_request_only_for_its_owner(fleet, proxy):
    request = chat("Tell a long story.", LONG, ignore_eos=True, request_id="owned")
    call = proxy.Generate(request, metadata=internal(fleet, owner="alice"), timeout=120)
    next(call)
    abort = pb.AbortRequest(request_id="owned")
    assert not proxy.Abort(abort, metadata=internal(fleet, owner="mallory"), timeout=10).found
    assert not proxy.Abort(abort, metadata=internal(fleet), timeout=10).found  # no owner named
    assert proxy.Abort(abort, metadata=internal(fleet, owner="alice"), timeout=10).found
    rest = list(call)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert sum(len(r.token_ids) for r in rest) < LONG
