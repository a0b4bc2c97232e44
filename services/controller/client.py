"""The operator's side of `selfspec controller`: status, history, pin, unpin, rollback,
over the admin gRPC service of any running controller, with its token (and TLS when
--tls-ca is given)."""

from __future__ import annotations

import functools
import json
import sys
import time

import grpc

from services.common.tokens import TokenSource
from services.controller.access import TOKEN_ENV
from services.gen.selfspec.v1 import controller_pb2 as pb
from services.gen.selfspec.v1 import controller_pb2_grpc as pb_grpc


def main(args) -> int:
    try:
        token = _token(args.token_file)
        channel = _channel(args.admin, args.tls_ca, args.tls_server_name)
    except (OSError, ValueError) as exc:
        print(f"selfspec controller: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = _Authorized(pb_grpc.ControllerAdminStub(channel), token)
        try:
            return COMMANDS[args.command](stub, args)
        except grpc.RpcError as exc:
            print(f"selfspec controller: {_explain(exc, args, token)}", file=sys.stderr)
            return 1


def _token(path: str | None) -> str | None:
    """`--token-file`, else the file in SELFSPEC_ADMIN_TOKEN_FILE, else the value of
    SELFSPEC_ADMIN_TOKEN; None when none is set."""
    source = TokenSource.from_env(path, file_env=TOKEN_ENV[0], value_env=TOKEN_ENV[1])
    return source.current() if source is not None else None


def _channel(address: str, tls_ca: str | None, server_name: str | None) -> grpc.Channel:
    if not tls_ca:
        return grpc.insecure_channel(address)
    with open(tls_ca, "rb") as f:
        credentials = grpc.ssl_channel_credentials(f.read())
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


class _Authorized:
    """The admin stub, with `authorization: Bearer <token>` on every call."""

    def __init__(self, stub: pb_grpc.ControllerAdminStub, token: str | None) -> None:
        self._stub = stub
        self._metadata = [("authorization", f"Bearer {token}")] if token else []

    def __getattr__(self, name: str):
        return functools.partial(getattr(self._stub, name), metadata=self._metadata)


def _explain(exc: grpc.RpcError, args, token: str | None) -> str:
    """What went wrong, and what to do about it."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        tls = (
            "check that --tls-ca is the CA that signed its certificate"
            if args.tls_ca
            else "if it serves TLS, pass --tls-ca"
        )
        return (
            f"cannot reach a controller at {args.admin} ({exc.details()}): if none "
            f"runs there, start one (`selfspec controller run`) or pass --admin HOST:PORT; "
            f"{tls}"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED and not token:
        return f"the admin API needs a token: pass --token-file or set {TOKEN_ENV[0]}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the controller refused this token ({exc.details()})"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "this token may only read; pin/unpin/rollback need the operator token"
    return exc.details()


def status_dict(status: pb.ControllerStatus) -> dict:
    """The status as plain data: leader, current version and record (of the newest
    model's config), and every model's details."""
    models = {}
    for m in status.models:
        models[m.model] = {
            "current": json.loads(m.current.json) if m.current.json else None,
            "pinned_version": m.pinned_version,
            "replicas": {r.replica_id: json.loads(r.json) for r in m.replicas},
            "rejections": [
                {
                    "replica_id": r.replica_id,
                    "version": r.version,
                    "reason": r.reason,
                    "at": r.at,
                    "kept_version": r.kept_version,
                }
                for r in m.rejections
            ],
            "search": json.loads(m.search_json) if m.search_json else None,
        }
    newest = max(
        (m["current"] for m in models.values() if m["current"]),
        key=lambda r: r["version"],
        default=None,
    )
    return {
        "leader_id": status.leader_id,
        "controller_id": status.controller_id,
        "is_leader": status.is_leader,
        "current_version": status.current_version,
        "record": newest,
        "models": models,
    }


def _status(stub, args) -> int:
    s = status_dict(stub.GetStatus(pb.GetStatusRequest(), timeout=5))
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    print(f"leader: {s['leader_id'] or 'none'}  (asked {s['controller_id']})")
    for name, m in s["models"].items():
        cur = m["current"]
        pin = f", pinned at {m['pinned_version']}" if m["pinned_version"] else ""
        if cur:
            print(f"{name}: version {cur['version']} ({cur['reason']} by {cur['by']}{pin})")
            print(f"  draft: {_draft_text(cur['draft'])}")
            for b, over in sorted(cur["buckets"].items(), key=lambda kv: int(kv[0])):
                print(f"  batch <= {b}: {_bucket_text(over)}")
        else:
            print(f"{name}: no config published yet")
        for rid, r in m["replicas"].items():
            age = time.time() - r.get("seen_at", 0)
            drafter = f", draft model {r['draft_model']}" if r.get("draft_model") else ""
            print(f"  replica {rid}: version {r.get('version', 0)}, seen {age:.0f} s ago{drafter}")
        for r in m["rejections"][:5]:
            print(f"  refused: version {r['version']} by {r['replica_id']}: {r['reason']}")
        search = m["search"]
        if search:
            print(
                f"  search: round {search['round']}, incumbent {search['incumbent']}, "
                f"{len(search['adopted'])} adopted, {search['stale_rounds']} rounds since"
            )
    return 0


def _draft_text(d: dict) -> str:
    parts = [str(d.get("mode")), f"max_draft {d.get('max_draft', 'default')}"]
    if d.get("skip_attn") or d.get("skip_mlp"):
        parts.append(f"skip attn {d.get('skip_attn')} mlp {d.get('skip_mlp')}")
    if d.get("exit_layer") is not None:
        parts.append(f"exit {d['exit_layer']}")
    return ", ".join(parts)


def _bucket_text(over: dict) -> str:
    """A bucket override may set any of mode, max_draft and threshold, not all three."""
    parts = [str(over["mode"])] if "mode" in over else []
    parts += [f"{k} {over[k]}" for k in ("max_draft", "threshold") if k in over]
    return ", ".join(parts)


def _history(stub, args) -> int:
    reply = stub.ListHistory(pb.ListHistoryRequest(model=args.model, limit=args.limit), timeout=5)
    for r in reply.records:
        record = json.loads(r.json)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
        print(f"{r.version:>6}  {when}  {r.reason:<9} {r.by:<24} {_draft_text(record['draft'])}")
    return 0


def _pin(stub, args) -> int:
    r = stub.Pin(pb.PinRequest(model=args.model, version=args.version), timeout=5).record
    print(f"pinned: version {r.version} republishes version {args.version}")
    return 0


def _unpin(stub, args) -> int:
    stub.Unpin(pb.UnpinRequest(model=args.model), timeout=5)
    print("unpinned: the controller decides again")
    return 0


def _rollback(stub, args) -> int:
    r = stub.Rollback(pb.RollbackRequest(model=args.model), timeout=5).record
    source = json.loads(r.json)["evidence"].get("pinned_from")
    print(f"rolled back: version {r.version} republishes version {source} (pinned)")
    return 0


COMMANDS = {
    "status": _status,
    "history": _history,
    "pin": _pin,
    "unpin": _unpin,
    "rollback": _rollback,
}
