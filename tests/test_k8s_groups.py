"""Offline checks of the worker-group Kubernetes examples in k8s/groups/: each pod's environment (and its
mounted config file) is loaded with resque-starter's own config loader, and each Deployment's KEDA
ScaledObject must watch exactly the queues its workers serve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from resque_starter import config, loader

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the test extras of the docker branch")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "k8s" / "groups").glob("*.yaml"))
LINT = (  # the rules of the repository's .yamllint.yaml, for k8s/ and compose/
    "{extends: default, rules: "
    "{line-length: {max: 110}, document-start: disable, truthy: {check-keys: false}}}"
)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_settings(docs: list[dict[str, Any]], deployment: dict[str, Any], tmp: Path) -> config.Settings:
    """The settings the pod's supervisor would start with: envFrom ConfigMaps, then env; the config
    file from the ConfigMap volume mounted at its path."""
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    maps = of_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]]["data"])
    env.update({item["name"]: item["value"] for item in container.get("env", [])})
    if "RESQUE_STARTER_CONFIG" in env:
        mounted = Path(env["RESQUE_STARTER_CONFIG"])
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(mounted.parent)]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        local = tmp / deployment["metadata"]["name"] / mounted.name
        local.parent.mkdir()
        local.write_text(maps[volume["configMap"]["name"]]["data"][mounted.name])
        env["RESQUE_STARTER_CONFIG"] = str(local)
    return loader.load({}, env)


def deployments() -> list[tuple[Path, str]]:
    return [(path, name) for path in EXAMPLES for name in of_kind(documents(path), "Deployment")]


def pod_settings_of(path: Path, name: str, tmp: Path) -> config.Settings:
    docs = documents(path)
    return pod_settings(docs, of_kind(docs, "Deployment")[name], tmp)


def test_both_layouts_run_the_same_groups_with_the_same_settings(tmp_path: Path) -> None:
    pods = {(path.name, name): pod_settings_of(path, name, tmp_path) for path, name in deployments()}
    assert {key: [(g.queues, g.size) for g in s.groups] for key, s in pods.items()} == {
        ("one-deployment.yaml", "resque-starter-groups"): [(("high", "default"), 3), (("low",), 1)],
        ("per-group.yaml", "resque-starter-high"): [(("high", "default"), 3)],
        ("per-group.yaml", "resque-starter-low"): [(("low",), 1)],
    }
    together = pods["one-deployment.yaml", "resque-starter-groups"]
    apart = {
        "high": pods["per-group.yaml", "resque-starter-high"],
        "low": pods["per-group.yaml", "resque-starter-low"],
    }
    for index, group in enumerate(("high", "low")):
        mine = together.for_group(index)
        assert (mine.max_memory, mine.max_jobs) == (apart[group].max_memory, apart[group].max_jobs), group


@pytest.mark.parametrize(("path", "name"), deployments(), ids=lambda x: getattr(x, "name", x))
def test_keda_watches_exactly_the_queues_of_the_deployments_groups(
    path: Path, name: str, tmp_path: Path
) -> None:
    settings = pod_settings_of(path, name, tmp_path)
    scaled = [
        s
        for s in of_kind(documents(path), "ScaledObject").values()
        if s["spec"]["scaleTargetRef"]["name"] == name
    ]
    assert len(scaled) == 1, f"one ScaledObject per Deployment, {name} has {len(scaled)}"
    triggers = scaled[0]["spec"]["triggers"]
    watched = sorted(t["metadata"]["listName"] for t in triggers if t["type"] == "redis")
    served = sorted(f"rq:queue:{queue}" for group in settings.groups if group.size for queue in group.queues)
    assert watched == served
    for trigger in triggers:
        assert int(trigger["metadata"]["listLength"]) >= 1


@pytest.mark.parametrize(("path", "name"), deployments(), ids=lambda x: getattr(x, "name", x))
def test_grace_period_covers_pre_stop_drain_and_drain_timeout(path: Path, name: str, tmp_path: Path) -> None:
    settings = pod_settings_of(path, name, tmp_path)
    pod = of_kind(documents(path), "Deployment")[name]["spec"]["template"]["spec"]
    command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:3] == ["resque-starter", "ctl", "drain"]
    pre_stop = float(command[command.index("--timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + settings.drain_timeout + 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_each_deployment_owns_its_pods(path: Path) -> None:
    """Two Deployments whose selectors match each other's pods fight over them; a PDB must cover one."""
    docs = documents(path)
    labels = {
        name: d["spec"]["template"]["metadata"]["labels"] for name, d in of_kind(docs, "Deployment").items()
    }

    def selects(selector: dict[str, str]) -> list[str]:
        return [name for name, pod in labels.items() if selector.items() <= pod.items()]

    for name, deployment in of_kind(docs, "Deployment").items():
        assert selects(deployment["spec"]["selector"]["matchLabels"]) == [name]
    budgets = [
        selects(pdb["spec"]["selector"]["matchLabels"])
        for pdb in of_kind(docs, "PodDisruptionBudget").values()
    ]
    assert sorted(budgets) == sorted([name] for name in labels)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_core_kinds_validate_against_the_kubernetes_schema(path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="comes with the docker branch")
    for doc in documents(path):
        if doc["kind"] != "ScaledObject":
            kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_yamllint_is_clean() -> None:
    pytest.importorskip("yamllint", reason="comes with the test extras of the docker branch")
    argv = [sys.executable, "-m", "yamllint", "-s", "-d", LINT, *map(str, EXAMPLES)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
