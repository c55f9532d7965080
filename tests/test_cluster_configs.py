"""Every file in cluster/ loads and has the shape its tool expects. Fast: no Ray, no cluster."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
LAUNCHER = [p for p in YAMLS if p.name.startswith("ray-cluster.")]
KUBE = [p for p in YAMLS if "kuberay" in p.parts]
SCRIPTS = sorted(CLUSTER.rglob("*.sh"))


def _ids(paths):
    return [str(p.relative_to(CLUSTER)) for p in paths]


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def test_the_expected_files_exist():
    names = set(_ids(YAMLS + SCRIPTS))
    assert {"ray-cluster.minimal.yaml", "ray-cluster.full.yaml", "kuberay/raycluster.yaml",
            "kuberay/rayjob-sweep.yaml", "kuberay/cronjob-ingest.yaml", "scheduled-ingest.sh",
            "local-start.sh", "local-stop.sh"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_yaml_parses(path):
    for doc in _docs(path):
        assert isinstance(doc, dict), f"{path}: top level is {type(doc).__name__}, expected a mapping"


def _ray_launcher_schema() -> dict | None:
    # Found by path, so the test does not import Ray.
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    schema = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(schema.read_text()) if schema.exists() else None


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_config(path):
    (cfg,) = _docs(path)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cfg, f"{path.name}: missing top-level key {key!r}"
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu = [t for t in cfg["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    assert gpu, f"{path.name}: no node type offers a GPU"
    schema = _ray_launcher_schema()
    if schema is not None:  # the launcher's own schema, when Ray is installed
        jsonschema = pytest.importorskip("jsonschema")
        jsonschema.validate(cfg, schema)


@pytest.mark.parametrize("path", KUBE, ids=_ids(KUBE))
def test_kubernetes_objects(path):
    for doc in _docs(path):
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: a document lacks apiVersion/kind"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} has no metadata.name"
        spec = {"RayCluster": doc.get("spec"), "RayJob": doc.get("spec", {}).get("rayClusterSpec")}.get(doc["kind"])
        if spec:
            _check_ray_cluster_spec(path, spec)


def _check_ray_cluster_spec(path, spec):
    assert "rayStartParams" in spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    assert all("rayStartParams" in g and g["groupName"] for g in groups)
    limits = [c["resources"]["limits"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert any("nvidia.com/gpu" in lim for lim in limits), f"{path.name}: no worker group asks for a GPU"


def test_rayjob_runs_the_sweep_from_its_configmap():
    docs = {d["kind"]: d for d in _docs(CLUSTER / "kuberay" / "rayjob-sweep.yaml")}
    job, cm = docs["RayJob"], docs["ConfigMap"]
    assert job["spec"]["entrypoint"].startswith("er sweep /config/sweep.yaml")
    yaml.safe_load(cm["data"]["sweep.yaml"])  # the embedded sweep is YAML too
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "sweep", "configMap": {"name": cm["metadata"]["name"]}} in head["volumes"]
    assert {"name": "sweep", "mountPath": "/config"} in head["containers"][0]["volumeMounts"]


def test_cronjob_never_overlaps_and_reads_s3_keys_from_a_secret():
    (cron,) = _docs(CLUSTER / "kuberay" / "cronjob-ingest.yaml")
    assert cron["kind"] == "CronJob"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["er", "ingest"] and "--cache" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"]


@pytest.mark.parametrize("path", SCRIPTS, ids=_ids(SCRIPTS))
def test_shell_script_syntax(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"{path.name}: {result.stderr}"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(path, os.X_OK), f"{path.name} is not executable (chmod +x)"
