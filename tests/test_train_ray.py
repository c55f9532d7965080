"""`er train` on Ray Train: 2 data-parallel workers learn what 1 worker learns; the artefact reloads; gaps are refused."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from er_core import load_task, open_cache
from er_core.artifacts import load_trained
from er_core.evaluate import predict, score
from er_core.task_data import join_cache, label_map
from pipelines.cli import main as er
from tests.conftest_ray import actors_of

pytestmark = pytest.mark.ray


# 3 epochs at lr 5e-3 reach 0.79-0.90 test accuracy on tiny_cache's 48 test examples across 8 seeds in-process,
# 0.75-0.83 on Ray (seed 0: 0.83 with 1 worker and with 2).
TRAIN = ["--epochs", "3", "--lr", "5e-3", "--batch-size", "16", "--seed", "0"]
# Not bit-identical: 2 workers see each epoch in another order (Ray Data splits and locally shuffles the rows)
# and group lengths per worker. That is the data-order noise behind the seed spread above (0.10), so allow
# 6 of 48 test examples; a 2-worker run that failed to learn (chance is 0.5) still fails the floor.
TOLERANCE, FLOOR = 0.125, 0.7


def test_two_workers_learn_like_one(ray_session, tiny_cache, tmp_path):
    url, folder, _ = tiny_cache
    runs = {}
    sigint = signal.getsignal(signal.SIGINT)
    splitters = len(actors_of("SplitCoordinator"))
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        argv = ["train", "--cache", url, "--task", str(folder), "--out", str(out), "--workers", str(workers),
                "--cpus-per-worker", "0.5", *TRAIN]
        assert er(argv) == 0
        runs[workers] = json.loads((out / "metrics.json").read_text())
    # Ray Train leaves its own SIGINT handler behind; er puts the old one back (Ctrl-C and the ingest heartbeat need it)
    assert signal.getsignal(signal.SIGINT) is sigint
    # Each worker's share is split from the materialized rows in the driver: no split coordinator actor per run.
    assert len(actors_of("SplitCoordinator")) == splitters
    one, two = runs[1]["test"]["micro_f1"], runs[2]["test"]["micro_f1"]
    assert runs[2]["workers"] == 2 and runs[2]["train_examples_per_second"] > 0
    assert min(one, two) >= FLOOR and abs(one - two) <= TOLERANCE, (one, two)

    # the 2-worker artefact reloads and predicts exactly the test metrics it recorded
    meta, _, model, tok = load_trained(tmp_path / "w2")
    assert meta["method"] == "reduced"
    task = load_task(folder)
    data = join_cache(task, "test", tok, open_cache(url).spec.tokenizer, label_map(task), reader=open_cache(url))
    assert score("classification", data.items, predict(model, data, "cache", label_map(task))) == runs[2]["test"]


def test_examples_missing_from_cache_fail_clearly(ray_session, tiny_cache, tmp_path, capsys):
    url, folder, _ = tiny_cache
    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    with open(grown / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "a sentence never ingested", "label": "inhibitor"}) + "\n")
    out = tmp_path / "out"
    assert er(["train", "--cache", url, "--task", str(grown), "--out", str(out), "--workers", "1"]) != 0
    err = capsys.readouterr().err
    assert "1 train examples are not in the cache" in err and "er ingest" in err
    assert not (out / "metrics.json").exists()


def test_models_and_batches_go_to_the_worker_device(ray_session, tiny_cache, tmp_path, monkeypatch):
    """The worker's device comes from Ray Train; the model is prepared onto it and every batch is moved to it.

    Ray Train's local mode (0 workers) runs the same worker loop in this process, so the patches reach it.
    """
    import ray.train.torch
    import torch

    from er_core import TrainConfig, devices
    from pipelines.train_ray import train_on_ray

    url, folder, _ = tiny_cache
    device = torch.device("cpu")
    got, moved = [], []
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: device)
    real_prepare, real_to = ray.train.torch.prepare_model, devices.to_device

    def prepare(model, move_to_device=True, **kw):
        got.append(move_to_device)
        return real_prepare(model, move_to_device=move_to_device, **kw)

    def to_device(batch, d):
        moved.append((d, batch["attention_mask"].shape[0]))
        return real_to(batch, d)

    monkeypatch.setattr(ray.train.torch, "prepare_model", prepare)
    monkeypatch.setattr(devices, "to_device", to_device)
    m = train_on_ray(url, str(folder), str(tmp_path / "out"), TrainConfig(epochs=1, batch_size=32), workers=0)
    assert got == [device]
    assert all(d == device for d, _ in moved) and m["history"][0]["epoch"] == 1
    # every row once per pass: 256 train rows, dev after the epoch, dev and test at the end
    assert sum(n for _, n in moved) == 256 + 48 + 48 + 48


def test_the_same_seed_on_the_same_cache_trains_the_same_model(ray_session, tiny_cache, tmp_path, monkeypatch):
    """A rerun reproduces a run: the train rows come back from their read tasks in plan order, not in the order
    the tasks happen to finish (which varies run to run once the task's rows take more than one read task)."""
    import pipelines.train_ray as train_ray
    from er_core import TrainConfig

    url, folder, _ = tiny_cache
    monkeypatch.setattr(train_ray, "PLAN_ROWS", 16)  # 256 train rows: 16 read tasks, several at a time
    cfg = TrainConfig(epochs=2, lr=5e-3, batch_size=16, seed=0)
    runs = [train_ray.train_on_ray(url, str(folder), str(tmp_path / f"r{i}"), cfg, workers=0) for i in range(3)]
    curves = [[{k: v for k, v in e.items() if k != "ended_at"} for e in r["history"]] for r in runs]
    assert curves[1:] == [curves[0]] * 2
    assert [r["test"] for r in runs[1:]] == [runs[0]["test"]] * 2
