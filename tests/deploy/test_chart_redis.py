"""The chart's Redis users (issue 19, item 4): the chart's Redis loads the rules of
services/common/redis_acl.py and enforces them, each pod holds its own role's
credential and no other, and the gateway holds none."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import pytest
import redis
import yaml
from chart_helpers import REPO, containers, env, find, lint, one, render, validate_core
from waiting import wait_for

from services.common import redis_acl
from services.common import redis_schema as rs

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "existing-secret": {
        "redis": {
            "auth": {"existingSecret": "ops-redis"},
            "users": {"replica": {"secretKey": "engines"}},
        }
    },
    "external": {
        "redis": {
            "external": {
                "enabled": True,
                "address": "redis.data.svc.cluster.local:6379",
                "existingSecret": "shared-redis",
            }
        }
    },
    "external-url": {
        "redis": {
            "external": {
                "enabled": True,
                "address": "rediss://redis.data.svc.cluster.local:6380/2",
                "existingSecret": "shared-redis",
            }
        }
    },
}
REGENERATE = "run `python -m services.common.redis_acl --chart`"


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def case(request) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = VALUE_SETS[request.param]
    return request.param, values, render(values)


def redis_values(values: dict[str, Any]) -> dict[str, Any]:
    return values.get("redis", {})


def external(values: dict[str, Any]) -> bool:
    return redis_values(values).get("external", {}).get("enabled", False)


def secret_name(values: dict[str, Any]) -> str:
    r = redis_values(values)
    if external(values):
        return r["external"]["existingSecret"]
    return r.get("auth", {}).get("existingSecret") or "demo-selfspec-redis"


def role_key(values: dict[str, Any], role: str) -> str:
    key = redis_values(values).get("users", {}).get(role, {}).get("secretKey")
    return key or f"{role}-password"


def redis_container(docs) -> dict[str, Any]:
    spec = one(docs, "StatefulSet", "-redis")["spec"]["template"]["spec"]
    return spec["containers"][0]


def users_in_args(args: list[str]) -> dict[str, list[str]]:
    """`--user NAME on >PASSWORD RULES...` groups of redis-server's arguments, as
    {name: [on, password, rules...]}."""
    groups: list[list[str]] = []
    for a in args:
        if a.startswith("--"):
            groups.append([a])
        else:
            groups[-1].append(a)
    return {g[1]: g[2:] for g in groups if g[0] == "--user"}


def redis_refs(container: dict[str, Any], secret: str) -> set[str]:
    """The keys of Redis' Secret that a container reads, by env or envFrom."""
    keys = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in container.get("env", [])
        if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == secret
    }
    if any(s.get("secretRef", {}).get("name") == secret for s in container.get("envFrom", [])):
        keys.add("*")  # every key
    return keys


def mounted_secrets(spec: dict[str, Any]) -> set[str]:
    """Secrets a pod mounts as volumes, projected ones included."""
    names = set()
    for v in spec.get("volumes", []):
        names.add(v.get("secret", {}).get("secretName"))
        for source in v.get("projected", {}).get("sources", []):
            names.add(source.get("secret", {}).get("name"))
    return names - {None}


# --- the rules --------------------------------------------------------------------------


def test_chart_file_is_the_python_rules():
    assert redis_acl.CHART_FILE.read_text() == redis_acl.chart_rules(), REGENERATE


def test_chart_redis_loads_the_python_rules():
    """Every role's user, `on`, its password from its own env variable, and exactly the
    rules of services/common/redis_acl.py, in order."""
    container = redis_container(render())
    want = {
        role.user: ["on", f">$(REDIS_{role.user.upper()}_PASSWORD)", *role.rules()]
        for role in redis_acl.ROLES.values()
    }
    assert users_in_args(container["args"]) == want, REGENERATE
    variables = env(container)
    for user in redis_acl.ROLES:
        ref = variables[f"REDIS_{user.upper()}_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("demo-selfspec-redis", f"{user}-password")


@pytest.fixture
def chart_redis(tmp_path):
    """redis-server run with the chart's own arguments, as the kubelet expands them:
    (admin password, {role: password}, port)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    container = redis_container(render())
    passwords = {"REDIS_PASSWORD": "admin-pw"} | {
        f"REDIS_{u.upper()}_PASSWORD": pw for u, pw in redis_acl.new_passwords().items()
    }
    args = [re.sub(r"\$\((\w+)\)", lambda m: passwords[m[1]], a) for a in container["args"]]
    args[args.index("--dir") + 1] = str(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [*container["command"], *args, "--port", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        admin = redis.Redis.from_url(url, password="admin-pw")
        _wait_until_up(admin, proc)
        roles = {u: passwords[f"REDIS_{u.upper()}_PASSWORD"] for u in redis_acl.ROLES}
        yield url, roles
    finally:
        proc.kill()
        proc.wait(10)


def _wait_until_up(admin, proc) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server refused the chart's arguments: {proc.stdout.read()}")
        try:
            return bool(admin.ping())
        except redis.ConnectionError:
            return False

    wait_for(up, what="the chart's redis-server")


def test_chart_redis_enforces_the_roles(chart_redis):
    """The chart's Redis, started with its own arguments: the replica's user appends
    telemetry and gets NOPERM on the current config and the lease; the controller's
    writes them; no credential gets nothing."""
    url, passwords = chart_redis
    as_replica = rs.connect(rs.with_credentials(url, "replica", passwords["replica"]))
    as_controller = rs.connect(rs.with_credentials(url, "controller", passwords["controller"]))
    current = rs.model_key("m", "current")
    assert as_replica.xadd(rs.TELEMETRY, {"model": "m", "replica": "r0", "window": "{}"})
    for forbidden in (
        lambda: as_replica.set(current, "{}"),
        lambda: as_replica.set(rs.LEASE, "replica|x", nx=True, px=5000),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    assert as_controller.set(current, "{}") and as_controller.set(rs.LEASE, "c|1", nx=True)
    with pytest.raises(redis.AuthenticationError):
        rs.connect(url).get(current)


# --- who holds which credential -----------------------------------------------------------


def test_each_pod_holds_its_own_roles_credential_and_the_gateway_none(case):
    _, values, docs = case
    secret = secret_name(values)
    replica, controller = role_key(values, "replica"), role_key(values, "controller")
    admin = redis_values(values).get("auth", {}).get("secretKey", "redis-password")
    seen = set()
    for where, container, spec in containers(docs):
        refs = redis_refs(container, secret)
        variables = env(container)
        if where.startswith("Deployment/demo-selfspec-gateway/"):
            want, user = set(), None
            assert secret not in mounted_secrets(spec), where
        elif where.startswith("Deployment/demo-selfspec-controller/"):
            want, user = {controller}, "controller"
        elif where.endswith("/ray-worker"):
            want, user = {replica}, "replica"
        elif where.startswith("StatefulSet/demo-selfspec-redis/"):
            want, user = {admin, replica, controller}, None  # it defines the users
        else:  # the Ray head (no engine replicas) and the autoscaler sidecar
            want, user = set(), None
        assert refs == want, (where, refs)
        if user is None:
            assert not {"SELFSPEC_REDIS_URL", "SELFSPEC_REDIS_PASSWORD"} & set(variables), where
        else:
            assert rs.user_of(variables["SELFSPEC_REDIS_URL"]["value"]) == user, where
            assert urlsplit(variables["SELFSPEC_REDIS_URL"]["value"]).password is None, where
        seen.add(user)
    assert {"replica", "controller"} <= seen


def test_replicas_app_arg_names_the_replica_user_without_a_password(case):
    _, values, docs = case
    rayservice = one(docs, "RayService")
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    url = app["args"]["redis_url"]
    if external(values):
        address = values["redis"]["external"]["address"]
        scheme, _, rest = address.rpartition("://")
        want = f"{scheme}://replica@{rest}" if scheme else f"redis://replica@{address}/0"
    else:
        want = "redis://replica@demo-selfspec-redis:6379/0"
    assert url == want
    worker = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert env(worker["containers"][0])["SELFSPEC_REDIS_URL"]["value"] == url


def test_the_chart_makes_one_password_per_role_unless_given_a_secret(case):
    _, values, docs = case
    made = find(docs, "Secret", "-redis")
    if external(values) or redis_values(values).get("auth", {}).get("existingSecret"):
        assert not made
        return
    (secret,) = made
    want = {"redis-password", role_key(values, "replica"), role_key(values, "controller")}
    assert set(secret["data"]) == want
    assert len(set(secret["data"].values())) == 3, "each role gets its own password"


def test_value_sets_lint_and_validate(case):
    _, values, docs = case
    report = lint(values)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]
    for doc in docs:
        if doc["kind"] in ("Secret", "StatefulSet", "Deployment"):
            validate_core(doc)


@pytest.mark.parametrize(
    ("redis_values_", "message"),
    [
        pytest.param(
            {"external": {"secretKey": "password"}},
            "redis.external.secretKey is gone: every role now logs in as its own Redis user",
            id="one-password-for-all",
        ),
        pytest.param(
            {"external": {"address": "redis://admin:pw@r:6379/0"}},
            "redis.external.address must hold no user or password",
            id="credentials-in-the-address",
        ),
    ],
)
def test_external_redis_values_that_cannot_work_fail_with_what_to_do(redis_values_, message):
    base = {"enabled": True, "address": "r:6379", "existingSecret": "shared-redis"}
    values = {"redis": {"external": base | redis_values_["external"]}}
    with pytest.raises(helm.HelmRenderError) as error:
        render(values)
    assert message in str(error.value)


def test_readme_shows_the_users_to_create_on_an_external_redis():
    readme = (REPO / "README.md").read_text()
    assert redis_acl.setuser_commands() in readme, (
        "README's ACL SETUSER lines differ from `python -m services.common.redis_acl`"
    )
