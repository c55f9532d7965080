"""Resumable training: a checkpoint every epoch; a resumed run trains no epoch twice and ends where an
uninterrupted one ends; a killed Ray Train worker or a killed driver loses at most the current epoch."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from er_core import TrainConfig, finetune, ingest_local, load_task
from er_core.outputs import read_status
from er_core.recycle import Recycler
from er_core.tasks import example_input
from tests.conftest import write_tiny_task
from tests.conftest_ray import session_processes

ROOT = Path(__file__).resolve().parents[1]
finetune_mod = importlib.import_module("er_core.finetuning")
CFG = dict(epochs=3, lr=1e-3, batch_size=8, seed=5, patience=5)


def _weights_equal(a: Path, b: Path) -> None:
    for name in ("upper.safetensors", "head.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert wa[k].equal(wb[k]), f"{name}:{k} differs"


def test_resumed_run_equals_an_uninterrupted_one(tiny_cache, tmp_path, monkeypatch):
    url, folder, _ = tiny_cache
    whole = finetune(url, str(folder), str(tmp_path / "whole"), TrainConfig(**CFG), progress=False, log=lambda r: None)

    real = finetune_mod.save_state

    def die_after_first_epoch(folder_, state):
        real(folder_, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # the process dies right after the epoch-1 checkpoint
    monkeypatch.setattr(finetune_mod, "save_state", die_after_first_epoch)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        finetune(url, str(folder), str(out), TrainConfig(**CFG), progress=False, log=lambda r: None)
    assert read_status(out)["status"] == "failed" and (out / "checkpoints" / "train_state.pt").exists()
    monkeypatch.setattr(finetune_mod, "save_state", real)

    resumed = finetune(url, str(folder), str(out), TrainConfig(**CFG), progress=False, log=lambda r: None, resume=True)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]  # no epoch twice
    assert [r["attempt"] for r in resumed["history"]] == [1, 2, 2]
    assert [r["after_epoch"] for r in resumed["resumed"]] == [1]
    # optimizer, scheduler, RNG and early-stopping state all came back: the same run, bit for bit
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in whole["history"]]
    assert resumed["test"] == whole["test"] and resumed["best_epoch"] == whole["best_epoch"]
    _weights_equal(out, tmp_path / "whole")
    assert read_status(out)["status"] == "complete" and not (out / "checkpoints").exists()


def test_a_run_writing_to_object_storage_resumes_from_its_checkpoint_there(s3, tiny_cache, tmp_path, monkeypatch):
    """An output on S3 keeps its checkpoint on S3 (a sweep trial may restart on another machine)."""
    from er_core.store.storage import url_to_fs

    url, folder, _ = tiny_cache
    out = f"s3://{s3.bucket}/resume-{tmp_path.name}"
    fs, path = url_to_fs(out)
    real = finetune_mod.save_state
    scratch = tmp_path / "tmp"  # where the local copies of the S3 checkpoint go, and must not stay
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def die_after_first_epoch(folder_, state):
        real(folder_, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(finetune_mod, "save_state", die_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune(url, str(folder), out, TrainConfig(**CFG), progress=False, log=lambda r: None)
    assert not fs.exists(f"{path}/checkpoints/train_state.pt")  # the failing save never reached S3 ...
    monkeypatch.setattr(finetune_mod, "save_state", real)
    epochs = []
    with pytest.raises(KeyboardInterrupt):  # ... this one did: stopped after its first epoch's checkpoint
        finetune(url, str(folder), out, TrainConfig(**CFG), progress=False, log=lambda r: None, resume=True,
                 on_epoch=lambda row, primary: epochs.append(row["epoch"]) or (_ for _ in ()).throw(KeyboardInterrupt))
    assert epochs == [1] and fs.exists(f"{path}/checkpoints/train_state.pt")
    assert not list(scratch.glob("er-checkpoints-*"))  # a failed run drops its local copy too
    resumed = finetune(url, str(folder), out, TrainConfig(**CFG), progress=False, log=lambda r: None, resume=True,
                       on_epoch=lambda row, primary: epochs.append((row["epoch"], primary)))
    assert epochs == [1, (2, "micro_f1"), (3, "micro_f1")] and [r["after_epoch"] for r in resumed["resumed"]] == [1]
    assert read_status(out)["status"] == "complete"
    # (SeaweedFS may keep an emptied folder's name; S3 would not: what counts is that nothing is left in it)
    assert [p for p, info in fs.find(f"{path}/checkpoints", detail=True).items() if info["type"] != "directory"] == []


def test_resume_refuses_a_complete_run(tiny_cache, tmp_path, capsys):
    from pipelines.cli import main as er

    url, folder, _ = tiny_cache
    out = tmp_path / "done"
    assert er(["train", "--cache", url, "--task", str(folder), "--out", str(out), "--workers", "0", "--epochs", "1"]) == 0
    assert er(["train", "--resume", str(out)]) == 2
    assert "nothing to resume" in capsys.readouterr().err


# ---------------------------------------------------------------- Ray Train


@pytest.fixture(scope="module")
def slow_cache(tiny_bert, tmp_path_factory):
    """A task big enough that an epoch lasts seconds on Ray, so a kill lands mid-epoch."""
    folder = write_tiny_task(tmp_path_factory.mktemp("slow-task") / "slow", sizes=(("train", 1200), ("dev", 32), ("test", 32)))
    rec = Recycler.load(tiny_bert, layer=2, codec="fp32")
    url = str(tmp_path_factory.mktemp("slow-cache") / "c")
    task = load_task(folder)
    ingest_local((example_input(e) for exs in task.splits.values() for e in exs), url, rec, progress=False)
    return url, folder


def _first_checkpoint(out: Path, timeout: float = 300) -> None:
    """Until Ray Train has registered an epoch checkpoint (its snapshot names it); a checkpoint written
    but not yet registered when its worker dies is not one a restart can use."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snap in (out / "checkpoints").glob("*/checkpoint_manager_snapshot.json"):
            try:
                if "checkpoint_" in snap.read_text():
                    return
            except OSError:  # being replaced
                pass
        time.sleep(0.2)
    raise AssertionError(f"no registered epoch checkpoint under {out} after {timeout} s")


def _check_resumed_history(metrics: dict, epochs: int) -> None:
    assert [r["epoch"] for r in metrics["history"]] == list(range(1, epochs + 1)), metrics["history"]
    assert metrics["resumed"] and metrics["resumed"][0]["after_epoch"] >= 1
    assert max(r["attempt"] for r in metrics["history"]) == 2


def test_killed_train_worker_resumes_from_last_epoch(ray_session, slow_cache, tmp_path):
    from pipelines.train_ray import train_on_ray

    url, folder = slow_cache
    out = tmp_path / "run"
    result = {}

    def run():
        try:
            result["metrics"] = train_on_ray(url, str(folder), str(out), TrainConfig(epochs=2, batch_size=4, patience=5),
                                             workers=1, cpus_per_worker=0.5, max_failures=2)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    _first_checkpoint(out)
    victims = session_processes(ray_session, "RayTrainWorker")
    assert len(victims) == 1, victims
    victims[0].send_signal(signal.SIGKILL)  # mid epoch 2
    t.join(timeout=600)
    assert "error" not in result, result.get("error")
    _check_resumed_history(result["metrics"], 2)
    assert json.loads((out / "metrics.json").read_text())["history"] == result["metrics"]["history"]
    assert read_status(out)["status"] == "complete"


def test_resume_after_kill_9_of_the_driver(ray_session, slow_cache, tmp_path):
    """Both drivers join the session's Ray (the dead driver's Train run dies with its job); what a kill leaves of
    er's own local Ray is tested in test_ray_sessions."""
    url, folder = slow_cache
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    argv = [sys.executable, "-m", "pipelines.cli", "train", "--cache", url, "--task", str(folder), "--out", str(out),
            "--workers", "1", "--cpus-per-worker", "0.5", "--epochs", "2", "--batch-size", "4", "--patience", "5"]
    driver = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _first_checkpoint(out)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not (out / "metrics.json").exists()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--resume", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_resumed_history(json.loads((out / "metrics.json").read_text()), 2)
