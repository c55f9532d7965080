"""Inputs and outputs on object storage: a task folder, a sweep file, trained models, sweep results and predictions
may all be s3:// URLs, so any node reads them and results outlive the cluster. Against the tests' S3 server."""

from __future__ import annotations

import json

import pytest
import yaml

from er_core.store.storage import url_to_fs
from pipelines.cli import main as er

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def s3_task(s3, tiny_cache):
    """The tiny task and its cache, copied to S3."""
    url, folder, _ = tiny_cache
    fs, _ = url_to_fs(f"s3://{s3.bucket}")
    base = f"{s3.bucket}/objects"
    fs.put(str(folder) + "/", f"{base}/task/", recursive=True)
    fs.put(url + "/", f"{base}/cache/", recursive=True)
    return fs, f"s3://{base}"


def test_train_sweep_and_predict_read_and_write_s3(ray_session, s3_task, tiny_cache):
    fs, base = s3_task
    # er train: task folder and output folder on S3; the checkpoints go there too, and are removed at the end
    out = f"{base}/runs/one"
    assert er(["train", "--cache", f"{base}/cache", "--task", f"{base}/task", "--out", out, "--workers", "1",
               "--epochs", "1", "--cpus-per-worker", "0.5"]) == 0
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(out.removeprefix("s3://"), detail=False)}
    assert {"metrics.json", "er_model.json", "upper.safetensors", "head.safetensors", ".er-output.json"} <= names
    # (SeaweedFS may keep an emptied folder's name; S3 would not: what counts is that nothing is left in it)
    left = fs.find(f"{out.removeprefix('s3://')}/checkpoints", detail=True)
    assert [p for p, info in left.items() if info["type"] != "directory" and info.get("size")] == []
    assert json.loads(fs.cat_file(f"{out.removeprefix('s3://')}/.er-output.json"))["status"] == "complete"

    # er sweep: the sweep file, its task and its results on S3 (relative paths are taken from the file's URL);
    # trials of two workers, so on Ray Train, with Train's storage on S3 (test_jobs runs one-worker trials there)
    sweep = {"cache": "../cache", "output": "../sweep-out", "tasks": ["../task"], "methods": ["reduced"],
             "defaults": {"epochs": 1}, "workers": 2, "resources": {"cpus_per_worker": 0.5}}
    fs.pipe_file(f"{base.removeprefix('s3://')}/sweeps/sweep.yaml", yaml.safe_dump(sweep).encode())
    assert er(["sweep", f"{base}/sweeps/sweep.yaml"]) == 0
    rows = json.loads(fs.cat_file(f"{base.removeprefix('s3://')}/sweep-out/results.json"))
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["out_dir"].startswith(f"{base}/sweep-out/")
    assert json.loads(fs.cat_file(f"{rows[0]['out_dir'].removeprefix('s3://')}/metrics.json"))["workers"] == 2

    # er predict: the model read from S3, predictions written to S3 in one piece
    _, folder, _ = tiny_cache
    preds = f"{base}/preds.jsonl"
    assert er(["predict", "--cache", f"{base}/cache", "--model-dir", out, "--corpus", str(folder / "test.jsonl"),
               "--out", preds]) == 0
    lines = fs.cat_file(preds.removeprefix("s3://")).decode().splitlines()
    assert len(lines) == 48 and all(json.loads(x)["cached"] for x in lines)
