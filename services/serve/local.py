"""`selfspec serve`: the whole fleet on this machine, in one command.

Starts, in order: a Redis server (its own, on loopback, unless `--redis-url` names
one), a local Ray cluster, the Serve application from a Serve config file, the
gateway, and the controller. Prints where each listens, shows progress while the
engines load, and on Ctrl-C (or SIGTERM) stops everything in reverse order, the
gateway draining first.

Only the gateway's ports are for clients: gRPC on `--listen` (127.0.0.1:50051) and the
OpenAI-compatible HTTP API on `--http-listen` (127.0.0.1:8000, the port vLLM uses; Serve's
own HTTP proxy is moved aside to 8100 in fleet.yaml). Serve's gRPC proxy listens on every interface
(Ray 2.60 binds it so, whatever the config says), so each fleet gets a new random
internal credential, written 0600 to its log folder and handed to the replicas and the
gateway only: the proxy's port refuses calls without it (`services.common.internal_auth`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from services.common import internal_auth, redis_acl
from services.common import redis_schema as rs

DEFAULT_CONFIG = Path(__file__).with_name("fleet.yaml")
RAY_START_TRIES = 3


@dataclass
class FleetOptions:
    config: dict = field(default_factory=lambda: load_config(DEFAULT_CONFIG))
    listen: str = "127.0.0.1:50051"
    http_listen: str | None = "127.0.0.1:8000"  # the gateway's OpenAI API; None: no HTTP
    redis_url: str | None = None  # None: start our own
    num_cpus: int | None = None
    controller: bool = True
    controller_admin: str = "127.0.0.1:50052"
    controller_args: list[str] = field(default_factory=list)  # e.g. ["--decide-seconds", "1"]
    gateway_args: list[str] = field(default_factory=list)
    # False: start the gateway without waiting for an engine replica, as on Kubernetes, where
    # the gateway reports NOT_SERVING and refuses calls until a replica is ready.
    wait_for_replicas: bool = True
    log_dir: Path | None = None  # where the subprocesses' output goes
    # Extra environment for every process of the fleet: the gateway, the controller, and
    # Ray's workers (Serve's proxy and replicas), e.g. tracing settings.
    env: dict[str, str] = field(default_factory=dict)


def load_config(path: Path | str) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read the Serve config {path}: {exc}") from None
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path} is not a Serve config file: it has no `applications`")
    return config


class Fleet:
    """The local fleet's processes; `start` brings them up, `stop` takes them down."""

    def __init__(self, options: FleetOptions, say=print) -> None:
        self.options = replace(options)  # its ports of 0 are resolved at start
        self.say = say
        self.config = copy.deepcopy(options.config)
        self.app = self.config["applications"][0]
        check_limits(self.app)
        self.redis: subprocess.Popen | None = None
        self.redis_url = options.redis_url  # where Redis listens, without a user
        self.redis_users: dict[str, str] = {}  # role -> password, for the Redis we start
        self.redis_argv: list[str] = []  # how we started it (a test restarts it so)
        self.gateway: subprocess.Popen | None = None
        self.controller: subprocess.Popen | None = None
        self.log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="selfspec-fleet-"))
        self.upstream = f"127.0.0.1:{self.config['grpc_options']['port']}"
        self.internal_token_file = self.log_dir / "internal-token"  # written at start

    def start(self, timeout_s: float = 600.0) -> Fleet:
        try:
            self._start_redis()
            self._start_ray()
            self._deploy(timeout_s)
            self._start_gateway()
            self._start_controller()
        except BaseException:
            self.stop()
            raise
        return self

    # -- the parts, in order -----------------------------------------------------------

    def _start_redis(self) -> None:
        if self.redis_url is None:
            if shutil.which("redis-server") is None:
                raise ValueError(
                    "redis-server is not installed: run `make setup` (or apt-get install "
                    "redis-server), or give --redis-url"
                )
            port = free_port()
            self.redis_users = redis_acl.new_passwords()
            self.redis_argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
            self.redis_argv += ["--save", "", "--appendonly", "no", "--aclfile", self._aclfile()]
            self.redis = subprocess.Popen(
                self.redis_argv, stdout=self._log("redis"), stderr=subprocess.STDOUT
            )
            wait_for_port(port, 10, self.redis, "redis-server")
            self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.app.setdefault("args", {})["redis_url"] = self.redis_role_url("replica")
        if self.redis_users:  # Ray logs the app's args and env: the password goes in a file
            runtime_env = self.app.setdefault("runtime_env", {})
            runtime_env.setdefault("env_vars", {}).update(self.redis_password_env("replica"))
        self.say(f"[1/5] redis       {rs.describe(self.redis_url)}")

    def _aclfile(self) -> str:
        """The Redis users, one per role (services/common/redis_acl.py), in the log dir."""
        return self._private("redis-users.acl", redis_acl.aclfile(self.redis_users))

    def _private(self, name: str, text: str) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return str(redis_acl.write_private(self.log_dir / name, text))

    def redis_role_url(self, role: str) -> str:
        """The URL a role reaches Redis with: our own Redis as that role's user, its
        password aside (see `redis_password_env`); the `--redis-url` given as it is."""
        return rs.with_credentials(self.redis_url, role) if self.redis_users else self.redis_url

    def redis_password_env(self, role: str) -> dict[str, str]:
        """The env that gives a role its password for our own Redis: a file's path, the
        file readable by us alone; none for a `--redis-url`."""
        if not self.redis_users:
            return {}
        path = self._private(f"redis-{role}.password", self.redis_users[role])
        return {rs.PASSWORD_FILE_ENV: path}

    def _start_ray(self) -> None:
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        cpus = self.options.num_cpus or os.cpu_count() or 1
        # A new secret per fleet; the replicas get its path, never its value, so that it
        # shows nowhere in Ray's job metadata.
        self.log_dir.mkdir(parents=True, exist_ok=True)
        internal_auth.write_new(self.internal_token_file)
        env = {**self.options.env, internal_auth.ENV_FILE: str(self.internal_token_file)}
        for attempt in range(1, RAY_START_TRIES + 1):
            try:
                ray.init(
                    num_cpus=cpus,
                    include_dashboard=False,
                    namespace="serve",
                    log_to_driver=False,
                    runtime_env={"env_vars": env},
                )
                break
            # Ray gives a node 30 s to register and then raises a bare Exception; on a busy
            # machine its raylet now and then misses that, and a second start succeeds.
            except Exception as exc:
                if "timed out during startup" not in str(exc) or attempt == RAY_START_TRIES:
                    raise
                ray.shutdown()
                self.say(f"      ray         the local node did not come up ({exc}); again")
        self.say(f"[2/5] ray         local cluster, {cpus} CPUs")

    def _deploy(self, timeout_s: float) -> None:
        from ray.serve._private import api as serve_api
        from ray.serve.config import gRPCOptions
        from ray.serve.schema import ServeDeploySchema

        # The same path as `serve run CONFIG` and KubeRay: Serve builds the app itself.
        schema = ServeDeploySchema.model_validate(self.config)
        client = serve_api.serve_start(
            http_options=schema.http_options.model_dump(),
            proxy_location=schema.proxy_location,
            grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        )
        client.deploy_apps(schema, _blocking=False)
        model = self.app.get("args", {}).get("model", "default")
        self.say(f"[3/5] serve       deploying {self.app['name']!r} ({model}) ...")
        if not self.options.wait_for_replicas:
            return
        wait_for_app(self.app["name"], timeout_s, self.say)
        self.say(f"      serve       ready; Serve's gRPC proxy on {self.upstream}")

    def _start_gateway(self) -> None:
        cmd = [sys.executable, "-m", "services.cli", "gateway", "--listen", self.options.listen]
        cmd += ["--upstream", self.upstream, "--app", self.app["name"], *self.options.gateway_args]
        http = self.options.http_listen
        if http:
            cmd += ["--http-listen", http]
        env = {**self._env(), internal_auth.ENV_FILE: str(self.internal_token_file)}
        log = self.log_dir / "gateway.log"
        start = log.stat().st_size if log.exists() else 0  # a restart appends to the log
        self.gateway = subprocess.Popen(
            cmd, env=env, stdout=self._log("gateway"), stderr=subprocess.STDOUT
        )
        # The gateway's own lines, not an open port, say it listens: a port may have been
        # taken meanwhile by another process (Ray starts many), which the gateway, failing
        # to bind, would leave answering in its place.
        ports = wait_for_lines(log, start, GATEWAY_READY[: 2 if http else 1], 30, self.gateway)
        self.options.listen = with_port(self.options.listen, ports[0])  # resolves a port 0
        if http:
            self.options.http_listen = http = with_port(http, ports[1])
        line = f"[4/5] gateway     grpc://{self.options.listen}"
        self.say(line + (f", OpenAI API http://{http}/v1" if http else ""))

    def restart_gateway(self) -> None:
        """A new gateway on the same address, after the old one has gone (or is stopped)."""
        _terminate(self.gateway, grace_s=30)
        self._start_gateway()

    def _start_controller(self) -> None:
        if not self.options.controller:
            self.say("[5/5] controller  not started (--no-controller)")
            return
        admin = self.options.controller_admin
        cmd = [sys.executable, "-m", "services.cli", "controller", "run"]
        cmd += ["--redis-url", self.redis_role_url("controller")]
        cmd += ["--admin-listen", admin, *self.options.controller_args]
        env = {**self._env(), **self.redis_password_env("controller")}
        self.controller = subprocess.Popen(
            cmd, env=env, stdout=self._log("controller"), stderr=subprocess.STDOUT
        )
        port = int(admin.rsplit(":", 1)[1])
        log = self.log_dir / "controller.log"
        wait_for_port(port, 30, self.controller, "the controller", log)
        self.say(f"[5/5] controller  admin grpc://{admin} (selfspec controller status)")

    # -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Everything down, in reverse order; safe to call twice."""
        for proc in (self.controller, self.gateway):
            _terminate(proc, grace_s=30)
        self.controller = self.gateway = None
        import ray

        if ray.is_initialized():
            from ray import serve

            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        _terminate(self.redis, grace_s=5)
        self.redis = None

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.options.env}

    def _log(self, name: str):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it


def check_limits(app: dict) -> None:
    """Refuse a config whose `deployments` set the back-pressure limits: Serve would apply
    them over the app's args, and the engines' queues, sized from the args, would disagree."""
    from services.serve.app import ARG_OPTIONS, DEPLOYMENT

    for deployment in app.get("deployments", []):
        clash = [k for k in ARG_OPTIONS if deployment.get("name") == DEPLOYMENT and k in deployment]
        if clash:
            raise ValueError(
                f"set {', '.join(clash)} in the application's args, not in its {DEPLOYMENT} "
                "deployment: the app gives them to Serve and sizes the engines' queues from them"
            )


def wait_for_app(name: str, timeout_s: float, say) -> None:
    """Wait until the application runs, reporting replica progress as it changes."""
    from ray import serve

    deadline, shown = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app is not None:
            if app.status == "RUNNING":
                return
            if app.status == "DEPLOY_FAILED":
                raise RuntimeError(f"deploying {name!r} failed: {app.message}")
            line = ", ".join(
                f"{d}: {dict(s.replica_states) or 'starting'}" for d, s in app.deployments.items()
            )
            if line and line != shown:
                say(f"      serve       {line}")
                shown = line
        time.sleep(0.5)
    raise TimeoutError(f"{name!r} was not running after {timeout_s:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the gateway prints once it listens (services/gateway/main.py), gRPC then HTTP.
GATEWAY_READY = (
    re.compile(r"^gateway listening on \S+ \(port (\d+)\)", re.M),
    re.compile(r"^OpenAI-compatible API on \S+ \(port (\d+)\)", re.M),
)


def wait_for_lines(log: Path, start: int, patterns, timeout_s: float, proc) -> list[int]:
    """The first group of each pattern, once all have appeared in `log` after byte `start`;
    raises with the log's tail if `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = log.read_bytes()[start:].decode(errors="replace") if log.exists() else ""
        found = [p.search(text) for p in patterns]
        if all(found):
            return [int(m.group(1)) for m in found]
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with code {proc.returncode}\n{text[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log.stem} did not say it listens within {timeout_s:.0f} s")
        time.sleep(0.1)


def with_port(address: str, port: int) -> str:
    return f"{address.rsplit(':', 1)[0]}:{port}"


def wait_for_port(port: int, timeout_s: float, proc, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}\n{tail}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout_s:.0f} s")


def _terminate(proc: subprocess.Popen | None, grace_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the command ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfspec serve", description=__doc__)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="a Serve config file")
    p.add_argument("--model", help="override the app's model")
    p.add_argument("--draft", help="override the app's default drafting mode")
    p.add_argument(
        "--draft-model",
        help="a smaller model, with the same tokenizer or another (checkpoint folder or "
        "GGUF), loaded by every replica to draft with (mode model, then the default; the "
        "controller may choose it per batch bucket)",
    )
    p.add_argument(
        "--backend",
        choices=["cpu", "onednn", "torch", "triton"],
        help="override the replicas' compute path (default: $SELFSPEC_BACKEND, else the best)",
    )
    p.add_argument(
        "--weights",
        choices=["auto", "gguf", "bf16", "fp16", "fp32"],
        help="override the replicas' weights: gguf keeps a GGUF's quantized matrices (CPU), "
        "the others are dense; auto (default): gguf for a GGUF on the cpu backend",
    )
    p.add_argument("--replicas", type=int, help="a fixed number of engine replicas")
    p.add_argument(
        "--max-ongoing-requests",
        type=int,
        help="calls one engine replica holds at once, running or waiting for KV "
        "(default: the config file's, 64)",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        help="calls Serve's proxy queues while every replica is full; past them a call is "
        "refused at once with RESOURCE_EXHAUSTED (default: the config file's, 64)",
    )
    p.add_argument(
        "--allow-draft-override",
        action=argparse.BooleanOptionalAction,
        help="whether requests may override the drafting (default: yes; "
        "--no-allow-draft-override refuses them with INVALID_ARGUMENT)",
    )
    p.add_argument(
        "--max-draft-configs",
        type=int,
        help="distinct drafting configs an engine runs in one step (default 4)",
    )
    p.add_argument(
        "--gateway-max-in-flight",
        type=int,
        help="generation calls the gateway forwards at once; past them it refuses at once "
        "with RESOURCE_EXHAUSTED (default 1024)",
    )
    p.add_argument("--listen", default="127.0.0.1:50051", help="the gateway's gRPC address")
    p.add_argument(
        "--http-listen",
        default="127.0.0.1:8000",
        help="the gateway's OpenAI-compatible HTTP API (default %(default)s, the port vLLM "
        "uses; `off`: none)",
    )
    p.add_argument(
        "--allow-insecure-token",
        action="store_true",
        help="let the gateway take SELFSPEC_TOKEN without TLS on a non-loopback --listen",
    )
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray cluster")
    p.add_argument("--no-controller", action="store_true", help="do not start the controller")
    p.add_argument(
        "--controller-admin", default="127.0.0.1:50052", help="the controller's admin address"
    )
    return p


# `selfspec serve` flags that set the app arg of the same name; each must be at least 1.
COUNT_ARGS = ("max_ongoing_requests", "max_queued_requests", "max_draft_configs")


def options_from(args: argparse.Namespace) -> FleetOptions:
    config = load_config(args.config)
    app = config["applications"][0]
    _override_args(args, app.setdefault("args", {}))
    if args.replicas is not None:
        _at_least_one("--replicas", args.replicas)
        for d in app.get("deployments", []):
            if d["name"] == "Engine":
                d.pop("autoscaling_config", None)
                d["num_replicas"] = args.replicas
    gateway_args = ["--allow-insecure-token"] if args.allow_insecure_token else []
    if args.gateway_max_in_flight is not None:
        _at_least_one("--gateway-max-in-flight", args.gateway_max_in_flight)
        gateway_args += ["--max-in-flight", str(args.gateway_max_in_flight)]
    return FleetOptions(
        config=config,
        listen=args.listen,
        http_listen=None if args.http_listen in ("", "off") else args.http_listen,
        redis_url=args.redis_url,
        num_cpus=args.num_cpus,
        controller=not args.no_controller,
        controller_admin=args.controller_admin,
        gateway_args=gateway_args,
    )


def _override_args(args: argparse.Namespace, app_args: dict) -> None:
    """The app args that flags name, over the config file's."""
    if args.model:
        app_args["model"] = args.model
    if args.draft:
        app_args["draft"] = args.draft
    if args.draft_model:
        app_args["draft_model"] = args.draft_model
        if not args.draft:  # as `selfspec generate --draft-model`: drafting with it
            app_args["draft"] = "model"
    if args.backend:
        app_args["backend"] = args.backend
    if args.weights:
        app_args["weights"] = args.weights
    for name in COUNT_ARGS:
        value = getattr(args, name)
        if value is not None:
            _at_least_one("--" + name.replace("_", "-"), value)
            app_args[name] = value
    if args.allow_draft_override is not None:
        app_args["allow_draft_override"] = args.allow_draft_override


def _at_least_one(flag: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{flag} must be at least 1")


def _curl(http_listen: str | None) -> str:
    """The OpenAI API's example, when it is on."""
    if not http_listen:
        return ""
    body = '{"messages": [{"role": "user", "content": "Why is the sky blue?"}]}'
    return (
        f"  curl http://{http_listen}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{body}'\n"
    )


def _interrupt(*_) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the fleet as Ctrl-C does


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        fleet = Fleet(options_from(args))
    except ValueError as exc:
        print(f"selfspec serve: error: {exc}", file=sys.stderr)
        return 2
    # Ctrl-C stops the fleet even where SIGINT came in ignored (a background job of a
    # script); SIGTERM stops it the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        fleet.start()
        print(
            f"\nfleet ready. Try:\n  selfspec client --address {args.listen} --stream "
            f"--prompt 'Why is the sky blue?'\n{_curl(fleet.options.http_listen)}"
            f"logs in {fleet.log_dir}; Ctrl-C stops it all.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping the fleet ...", flush=True)
        return 0
    except (ValueError, RuntimeError, TimeoutError) as exc:
        print(f"selfspec serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        fleet.stop()
