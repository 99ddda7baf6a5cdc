"""cluster/: every manifest parses, carries the fields Ray and KubeRay need, and pins the Ray
version the package pins (and the installed one); GPU groups request and tolerate GPUs;
credentials come from a Secret or an instance role, never literal keys."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
MANIFESTS = sorted(CLUSTER.glob("*.yaml"))


def pinned_minor() -> str:
    """``2.60`` from the package's ``ray[...]>=2.60,<2.61`` requirement."""
    m = re.search(r'"ray\[[^\]]*\]>=(\d+)\.(\d+)', PYPROJECT.read_text())
    assert m, "no ray pin in pyproject.toml"
    return f"{m.group(1)}.{m.group(2)}"


def load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, path
    return docs[0]


def images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def test_manifests_exist_and_the_pin_matches_the_installed_ray():
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "rayjob.yaml", "aws.yaml"}
    assert ray.__version__.startswith(pinned_minor() + ".")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_image_and_ray_version_matches_the_pin(path):
    doc = load(path)
    minor = pinned_minor()
    found = images(doc)
    assert found, f"{path.name}: no image"
    for image in found:
        repo, tag = image.rsplit(":", 1)
        assert repo == "rayproject/ray" and tag.startswith(minor + "."), image
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{12,}", text), "literal AWS key"
    assert not re.search(r"(?i)secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", text), "literal secret"


def _cluster_spec(doc: dict) -> dict:
    if doc["kind"] == "RayCronJob":
        return doc["spec"]["jobTemplate"]["rayClusterSpec"]
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"])
def test_kuberay_manifests(name):
    doc = load(CLUSTER / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob", "RayCronJob")
    spec = _cluster_spec(doc)
    assert spec["rayVersion"].startswith(pinned_minor() + ".")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {})          # a CPU head
    groups = spec["workerGroupSpecs"]
    if doc["kind"] == "RayCronJob":
        assert len(doc["spec"]["schedule"].split()) == 5                       # a cron schedule
        job = doc["spec"]["jobTemplate"]
        assert "recval update jobs/daily_update.yaml" in job["entrypoint"] and "--base" in job["entrypoint"]
        assert job["shutdownAfterJobFinishes"] is True and "working_dir" in yaml.safe_load(job["runtimeEnvYAML"])
        assert (CLUSTER.parent / "jobs" / "daily_update.yaml").exists()
        for c in [head_c] + [c for g in groups for c in g["template"]["spec"]["containers"]]:
            assert any("secretRef" in e for e in c.get("envFrom", [])), c["name"]
        return                                # a CPU cluster: an update fine-tunes, it needs no GPU
    gpu = [g for g in groups if any("nvidia.com/gpu" in c["resources"].get("limits", {})
                                    for c in g["template"]["spec"]["containers"])]
    assert gpu, "no GPU worker group"
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for g in gpu:
        pod = g["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        for c in pod["containers"]:
            assert c["image"].endswith("-gpu")
            lim = c["resources"]["limits"]["nvidia.com/gpu"]
            assert int(lim) >= 1 and c["resources"]["requests"]["nvidia.com/gpu"] == lim
    # object-storage credentials from a Secret in every container
    for c in [head_c] + [c for g in groups for c in g["template"]["spec"]["containers"]]:
        assert any("secretRef" in e for e in c.get("envFrom", [])), c["name"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].strip() and "recval run" in doc["spec"]["entrypoint"]
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert "working_dir" in env


def test_cluster_launcher_config():
    doc = load(CLUSTER / "aws.yaml")
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in doc, key
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != doc["head_node_type"]) <= doc["max_workers"]
    gpu_types = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu_types, "no GPU node type"
    assert any(f"=={pinned_minor()}." in c for c in doc["setup_commands"])   # the pinned Ray
