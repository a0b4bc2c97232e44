"""`selfspec.v1.ControllerAdmin` over grpc.aio, with grpc.health.v1 and reflection,
behind the tokens of `access` and optional TLS.

Every controller serves it, leader or standby: reads come from Redis, and pins and
rollbacks are operator writes that need no lease (they go through the same
versioned, announced write as decisions, so replicas pick them up alike).
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import redis_schema as rs
from services.common.grpc_ports import EXCLUSIVE, add_port
from services.common.tls import ReloadingCertificate
from services.controller.access import SERVICE, Access, AccessInterceptor
from services.controller.controller import Controller
from services.gen.selfspec.v1 import controller_pb2 as pb
from services.gen.selfspec.v1 import controller_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class Admin(pb_grpc.ControllerAdminServicer):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.store = controller.store

    async def GetStatus(self, request, context) -> pb.ControllerStatus:
        return await self._call(context, self._status)

    async def ListHistory(self, request, context) -> pb.ListHistoryResponse:
        def history():
            model = self._model(request.model)
            records = self.store.history(model, request.limit or 20)
            return pb.ListHistoryResponse(records=[_record(r) for r in records])

        return await self._call(context, history)

    async def Pin(self, request, context) -> pb.PinResponse:
        def pin():
            model = self._model(request.model)
            return pb.PinResponse(record=_record(self.store.pin(model, request.version, self._by)))

        return await self._call(context, pin)

    async def Unpin(self, request, context) -> pb.UnpinResponse:
        def unpin():
            self.store.unpin(self._model(request.model))
            return pb.UnpinResponse()

        return await self._call(context, unpin)

    async def Rollback(self, request, context) -> pb.RollbackResponse:
        def rollback():
            model = self._model(request.model)
            return pb.RollbackResponse(record=_record(self.store.rollback(model, self._by)))

        return await self._call(context, rollback)

    # -----------------------------------------------------------------------------------

    @property
    def _by(self) -> str:
        return f"operator via {self.controller.id}"

    async def _call(self, context, fn):
        """Run a Redis-bound handler off the event loop; map failures to status codes."""
        import redis

        try:
            return await asyncio.to_thread(fn)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (redis.ConnectionError, redis.TimeoutError):
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, rs.unreachable_hint(self.controller.url)
            )

    def _model(self, model: str) -> str:
        """The model a request names; may be left out when the fleet serves one."""
        models = self.store.models()
        if model:
            if model not in models:
                raise KeyError(f"no replica serves model {model!r}; known: {models}")
            return model
        if len(models) != 1:
            raise ValueError(f"name a model: the fleet serves {models or 'none yet'}")
        return models[0]

    def _status(self) -> pb.ControllerStatus:
        out = pb.ControllerStatus(
            leader_id=self.controller.lease.leader(),
            controller_id=self.controller.id,
            is_leader=self.controller.is_leader,
        )
        for model in self.store.models():
            ms = pb.ModelStatus(model=model, pinned_version=self.store.pinned(model))
            current = self.store.current(model)
            if current is not None:
                ms.current.CopyFrom(_record(current))
                out.current_version = max(out.current_version, current.version)
            for rid, state in sorted(self.store.replicas(model).items()):
                ms.replicas.add(
                    replica_id=rid,
                    version=int(state.get("version", 0)),
                    seen_at=float(state.get("seen_at", 0.0)),
                    json=json.dumps(state, sort_keys=True),
                )
            for row in self.store.rejections(model):
                ms.rejections.add(
                    replica_id=row.get("replica", ""),
                    version=_int(row.get("version")),
                    reason=row.get("reason", ""),
                    at=float(row.get("at", 0.0) or 0.0),
                    kept_version=max(0, _int(row.get("kept_version"))),
                )
            ms.search_json = self.controller.redis.get(rs.model_key(model, "search")) or ""
            out.models.append(ms)
        return out


def _record(r: rs.Record) -> pb.ConfigRecord:
    return pb.ConfigRecord(
        model=r.model,
        version=r.version,
        hash=r.hash,
        created_at=r.created_at,
        by=r.by,
        reason=r.reason,
        json=r.to_json(),
    )


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


async def serve(
    controller: Controller,
    listen: str,
    access: Access | None = None,
    tls: tuple[str, str] | None = None,
) -> grpc.aio.Server:
    """Start the admin server on `listen` (host:port); returns it, started.

    `access`: the tokens it accepts (None: anyone who reaches it may pin). `tls`: the
    certificate chain and key files (PEM); a new pair on disk is served to the next
    connection, without a restart."""
    interceptors = [AccessInterceptor(access)] if access is not None else []
    server = grpc.aio.server(interceptors=interceptors, options=EXCLUSIVE)
    pb_grpc.add_ControllerAdminServicer_to_server(Admin(controller), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    credentials = None if tls is None else ReloadingCertificate(*tls).credentials()
    port = add_port(server, listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {listen}: the port is taken or the address is wrong")
    await server.start()
    for name in ("", SERVICE):
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server
