"""Render the Helm chart offline and validate what comes out.

Helm itself comes from `helm-python-sdk` (Helm's Go SDK behind ctypes: no helm binary),
core Kubernetes objects are checked by `kubernetes-validate`, and the RayService by the
KubeRay CRD's own OpenAPI schema.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "selfspec"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
# A copy of ../shared/schemas/kuberay/ (see SOURCE.txt there), so a clone tests alone.
KUBERAY_CRD = Path(__file__).parent / "schemas" / "kuberay" / "ray.io_rayservices.yaml"

# A current Kubernetes release that kubernetes-validate ships schemas for; pinned so that
# upgrading the package cannot change what the tests check.
KUBE_VERSION = "1.37.0"
RELEASE = "demo"
NAMESPACE = "serving"

# Kinds that are not part of Kubernetes itself, so kubernetes-validate does not know them:
# the RayService is checked against KubeRay's CRD schema, the Prometheus Operator's
# monitors by the tests that read them.
CUSTOM_KINDS = {"RayService", "ServiceMonitor", "PodMonitor"}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders with these values (raises Helm's errors)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.load_all(text, Loader=yaml.CSafeLoader) if d)
    return docs


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Helm's own linter, strict (warnings count), against KUBE_VERSION."""
    return helm.lint(
        CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )


def validate_core(doc: dict[str, Any]) -> None:
    """kubernetes-validate in strict mode: unknown fields fail too."""
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@functools.cache
def _rayservice_validator() -> jsonschema.Draft7Validator:
    crd = yaml.load(KUBERAY_CRD.read_text(), Loader=yaml.CSafeLoader)
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema with unknown fields forbidden.

    The API server silently prunes fields a structural schema does not name, so a
    misspelt field would vanish without an error; forbidding them here catches it.
    """
    schema = copy.deepcopy(schema)
    for node in _subschemas(schema):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
    return schema


def _subschemas(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _subschemas(value)
    elif isinstance(node, list):
        for item in node:
            yield from _subschemas(item)


def rayservice_errors(doc: dict[str, Any]) -> list[str]:
    """Where the RayService breaks the KubeRay CRD schema (empty when it conforms)."""
    errors = _rayservice_validator().iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def find(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> list[dict[str, Any]]:
    """Objects of one kind whose name ends with `suffix`."""
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


def one(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    (found,) = find(docs, kind, suffix)
    return found


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod the release runs, Ray's head and workers included."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield name, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            yield f"{name}/head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster["workerGroupSpecs"]:
                yield f"{name}/{group['groupName']}", group["template"]["spec"]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, its pod spec) for every container, init containers and the
    KubeRay autoscaler sidecar (configured through autoscalerOptions) included."""
    for where, spec in pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{where}/{c['name']}", c, spec
    for doc in find(docs, "RayService"):
        options = doc["spec"]["rayClusterConfig"].get("autoscalerOptions")
        if options is not None:
            head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
            yield f"RayService/{doc['metadata']['name']}/autoscaler", options, head


def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {e["name"]: e for e in container.get("env", [])}


def arg(container: dict[str, Any], flag: str) -> str | None:
    """The value after `flag` in the container's args, or None when the flag is absent."""
    args = container.get("args", [])
    return args[args.index(flag) + 1] if flag in args else None


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector's matchLabels pick out a pod with `labels`."""
    assert not selector.get("matchExpressions"), "only matchLabels are used in this chart"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def secret_refs(spec: dict[str, Any]) -> set[str]:
    """Names of the Secrets a pod spec uses: in volumes (projected ones too), env and envFrom."""
    names = set()
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for c in spec.get("initContainers", []) + spec["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
    return names


def unnamed_peers(policies: list[dict[str, Any]]) -> list[str]:
    """Every `from` of these NetworkPolicies that does not name its peers: an empty list,
    an empty selector (`{}` matches every pod or every namespace), a peer with no
    selector, or an ipBlock of everything (/0). Empty when each peer is named."""
    found = []
    for policy in policies:
        name = policy["metadata"]["name"]
        for i, rule in enumerate(policy["spec"].get("ingress", [])):
            if "from" not in rule:
                continue  # open to anyone: only the gateway's port may be (tested apart)
            where = f"{name} ingress[{i}]"
            if not rule["from"]:
                found.append(f"{where}: from: [] admits anyone")
            for peer in rule["from"]:
                found.extend(f"{where}: {problem}" for problem in _peer_problems(peer))
    return found


def _peer_problems(peer: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("podSelector", "namespaceSelector"):
        if key in peer and not _names_labels(peer[key]):
            problems.append(f"{key}: {peer[key]} selects everything")
    if "ipBlock" in peer and peer["ipBlock"]["cidr"].endswith("/0"):
        problems.append(f"ipBlock {peer['ipBlock']['cidr']} is every address")
    if not {"podSelector", "namespaceSelector", "ipBlock"} & set(peer):
        problems.append(f"{peer} names no peer")
    return problems


def _names_labels(selector: dict[str, Any] | None) -> bool:
    return bool(selector and (selector.get("matchLabels") or selector.get("matchExpressions")))
