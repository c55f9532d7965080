"""`er sweep`: validation reports every problem at once; trials run concurrently; a failed trial spoils only itself."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from er_core import ErError
from pipelines.cli import main as er
from pipelines.sweep import expand, load_sweep
from tests.conftest_ray import actors_of, session_processes

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, sweep: dict) -> Path:
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_every_problem_is_reported_at_once(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {
        "cache": "c", "outptu": "o", "tasks": [str(tmp_path / "nope"), {"path": str(tmp_path), "lim": 3}],
        "methods": ["reduced", "fulll"], "defaults": {"epochs": "two", "foo": 1}, "grid": {"lora_r": 4, "lr": ["x"]},
        "max_concurrent": 0, "resources": {"cpus_per_worker": 0}, "limit": {"train": -1},
        "search": {"warmup_ratio": {"loguniform": [0.1, 0.01]}, "seed": {"uniform": [0, 3]}, "patience": [1, 2]},
        "asha": {"grace_period": 0}, "num_samples": 0,
    })
    with pytest.raises(ErError) as e:
        load_sweep(bad)
    msg = str(e.value)
    expected = ["unknown key 'outptu'", "missing required key 'output'", "nope not found", "unknown key(s) ['lim']",
                "methods must be a non-empty list of ('full', 'reduced', 'lora')", "defaults.epochs must be an integer",
                "unknown training field 'foo'", "grid.lora_r must be a non-empty list", "grid.lr must be a number",
                "max_concurrent must be an integer >= 1", "cpus_per_worker must be a number > 0",
                "limit['train'] must be an integer >= 0", "search.warmup_ratio.loguniform needs low < high",
                "search.seed: uniform samples floats", "search.patience must be one of", "asha.grace_period must be",
                "num_samples must be an integer >= 1"]
    assert all(x in msg for x in expected), msg
    assert f"has {len(expected)} problem(s)" in msg


def test_trainconfig_checks_join_the_report(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {"cache": "c", "output": "o", "tasks": [str(tmp_path)], "bogus": 1,
                                         "defaults": {"epochs": 0}})
    with pytest.raises(ErError, match=r"2 problem\(s\)(.|\n)*unknown key 'bogus'(.|\n)*epochs \(0\)"):
        load_sweep(bad)


def test_grid_varies_lora_fields_for_lora_only(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    sweep = load_sweep(_write(tmp_path / "s.yaml", {
        "cache": "cache", "output": "runs", "tasks": ["a", {"path": "b", "limit": 10}], "methods": ["reduced", "lora"],
        "defaults": {"epochs": 1}, "grid": {"lr": ["1e-3", 2.0e-3], "lora_r": [4, 8]},
    }))
    assert sweep.cache == str(tmp_path / "cache") and sweep.output == str(tmp_path / "runs")  # relative to the file
    trials = expand(sweep)
    assert len(trials) == 2 * (2 + 2 * 2)  # per task: reduced x 2 lr, lora x 2 lr x 2 ranks
    assert len({t.name for t in trials}) == len(trials)
    assert all("lora_r" not in t.params for t in trials if t.method == "reduced")
    assert {t.cfg.lr for t in trials} == {1e-3, 2e-3} and "a-lora-lr0.001-lora_r8" in {t.name for t in trials}


def test_toml_reads_like_yaml(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "s.toml").write_text('cache = "c"\noutput = "o"\ntasks = ["t"]\nmethods = ["lora"]\n'
                                     '[grid]\nlora_r = [2, 4]\n')
    toml = load_sweep(tmp_path / "s.toml")
    assert toml == load_sweep(_write(tmp_path / "s.yaml", {"cache": "c", "output": "o", "tasks": ["t"], "methods": ["lora"],
                                                            "grid": {"lora_r": [2, 4]}}))
    assert [t.cfg.lora_r for t in expand(toml)] == [2, 4]


def test_shipped_example_validates():
    example = REPO / "examples" / "sweep.yaml"
    assert "er sweep examples/sweep.yaml" in example.read_text()  # the header says how to run it
    data = REPO.parent / "shared" / "data" / "tasks"
    sweep = load_sweep(example, check_paths=data.is_dir())  # task folders are checked where the data is present
    assert sweep.tasks[0].path == str(data.resolve() / "chemprot")
    assert len(expand(sweep)) == 12 and sweep.asha


def _relabelled(folder: Path, dest: Path) -> Path:
    """A second task on the same texts (so the same cache rows): is the sentence long or short?"""
    dest.mkdir()
    for f in folder.glob("*.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        dest.joinpath(f.name).write_text("".join(
            json.dumps({"text": r["text"], "label": "long" if len(r["text"].split()) > 6 else "short"}) + "\n" for r in rows))
    return dest


def _sweep_file(tmp_path, url, tasks, **extra) -> Path:
    sweep = {"cache": url, "output": "runs", "tasks": [str(t) for t in tasks], "methods": ["reduced"], "max_concurrent": 2,
             "defaults": {"epochs": 1, "batch_size": 32, "lr": 3.0e-3}, "resources": {"cpus_per_worker": 0.5}}
    return _write(tmp_path / "sweep.yaml", {**sweep, **extra})


def _rows(tmp_path) -> list[dict]:
    return json.loads((tmp_path / "runs" / "results.json").read_text())


@pytest.mark.ray
def test_full_reduced_and_lora_trials_sampled_by_tune_write_one_row_each(ray_session, tiny_cache, tmp_path, capsys):
    url, folder, _ = tiny_cache
    path = _sweep_file(tmp_path, url, [folder], methods=["full", "reduced", "lora"],
                       search={"lr": {"loguniform": ["1e-3", "3e-3"]}})
    controllers, trials = len(actors_of("TrainController")), len(actors_of("ImplicitFunc"))
    assert er(["sweep", str(path)]) == 0
    # One-worker trials train in their Tune process: no Ray Train run (controller, worker, data actors) per trial.
    assert len(actors_of("TrainController")) == controllers and len(actors_of("ImplicitFunc")) - trials == 3
    rows = _rows(tmp_path)
    assert [(r["method"], r["status"]) for r in rows] == [("full", "ok"), ("reduced", "ok"), ("lora", "ok")]
    for r in rows:
        assert 1e-3 <= r["params"]["lr"] <= 3e-3  # sampled from the search space, one value per trial
        metrics = json.loads(Path(r["out_dir"], "metrics.json").read_text())
        config = json.loads(Path(r["out_dir"], "er_model.json").read_text())["train_config"]
        assert config["lr"] == r["params"]["lr"] and config["method"] == r["method"]
        assert r["test_micro_f1"] == metrics["test"]["micro_f1"] and r["train_seconds"] > 0
    assert len({r["params"]["lr"] for r in rows}) == 3
    assert (tmp_path / "runs" / "tune").is_dir()  # Tune's experiment state, for --resume
    with open(tmp_path / "runs" / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["full", "reduced", "lora"]
    out = capsys.readouterr().out
    assert "start tiny-full" in out and "done tiny-lora" in out


def _until(check, timeout: float = 300, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout} s")


@pytest.mark.ray
def test_a_killed_or_failing_trial_is_reported_failed_and_the_others_finish(ray_session, tiny_cache, tmp_path, capsys):
    url, folder, _ = tiny_cache
    broken = tmp_path / "broken"  # one train example the cache never saw: its trials fail, alone
    shutil.copytree(folder, broken)
    with open(broken / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "a sentence never ingested", "label": "inhibitor"}) + "\n")
    # Enough epochs that the trial still trains after its first checkpoint, when the kill comes.
    path = _sweep_file(tmp_path, url, [folder, broken], max_concurrent=1,
                       defaults={"epochs": 6, "patience": 6, "batch_size": 8, "lr": 3.0e-3}, grid={"seed": [0, 1]})
    result = {}
    driver = threading.Thread(target=lambda: result.update(code=er(["sweep", str(path)])))
    driver.start()
    first_epoch = tmp_path / "runs" / "tiny-reduced-seed0" / "checkpoints"
    victim = _until(lambda: first_epoch.is_dir() and session_processes(ray_session, "ImplicitFunc"), what="running trial")
    assert len(victim) == 1, victim
    victim[0].kill()  # the trial's own process, mid training
    driver.join(timeout=600)
    assert result.get("code") == 1  # a failed trial makes the exit status non-zero ...
    rows = _rows(tmp_path)
    assert [(r["trial"], r["status"]) for r in rows] == [  # ... the rest ran
        ("tiny-reduced-seed0", "failed"), ("tiny-reduced-seed1", "ok"), ("broken-reduced-seed0", "failed"),
        ("broken-reduced-seed1", "failed")]
    killed, ok, *broken = rows
    assert "died" in killed["error"].lower() or "unexpected" in killed["error"].lower(), killed["error"]
    assert Path(ok["out_dir"], "metrics.json").exists() and ok["test_micro_f1"] is not None
    for r in broken:
        assert "not in the cache" in r["error"] and Path(r["out_dir"], "error.txt").exists()
    out = capsys.readouterr().out
    assert "FAILED broken-reduced-seed0" in out and "failed trials:" in out


@pytest.mark.ray
def test_asha_stops_a_clear_loser_early(ray_session, tiny_cache, tmp_path):
    url, folder, _ = tiny_cache
    # The good trial runs first (one at a time), so the loser meets its record at the first rung.
    path = _sweep_file(tmp_path, url, [folder], max_concurrent=1, asha=True,
                       defaults={"epochs": 4, "batch_size": 16, "patience": 4}, grid={"lr": ["3e-3", "1e-9"]})
    assert er(["sweep", str(path)]) == 0
    good, loser = _rows(tmp_path)
    assert good["status"] == "ok" and good["epochs_run"] == 4, good
    assert loser["status"] == "stopped" and loser["epochs_run"] < 4 and loser["dev"] < good["dev"], loser
    assert loser["out_dir"] is None and not (tmp_path / "runs" / "tiny-reduced-lr1e-09").exists()


def test_removing_a_stopped_trial_outlasts_its_last_writes(tmp_path):
    """Tune returns while a stopped trial may still write a checkpoint: files appear under the removal's walk."""
    from pipelines.sweep import _remove_stopped

    folder = tmp_path / "trial"
    (folder / "checkpoints").mkdir(parents=True)
    until = time.monotonic() + 1.5

    def writer():
        i = 0
        while time.monotonic() < until:
            d = folder / "checkpoints" / f"c{i % 7}"
            try:
                d.mkdir(parents=True, exist_ok=True)
                (d / f"f{i}").write_bytes(b"x")
            except OSError:  # removed under it
                pass
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)
    _remove_stopped(str(folder), None)
    t.join()
    assert not folder.exists()


def test_asha_ranks_trials_against_their_own_task_only():
    from types import SimpleNamespace

    from pipelines.asha import PerTaskASHA

    asha = PerTaskASHA({"a-good": "a", "a-bad": "a", "b-low": "b"}, time_attr="epoch", max_t=4, grace_period=1,
                       reduction_factor=2, stop_last_trials=False)
    asha.set_search_properties("dev_score", "max")
    trials = {name: SimpleNamespace(trial_id=name, config={"trial": name}) for name in ("a-good", "a-bad", "b-low")}
    for t in trials.values():
        asha.on_trial_add(None, t)
    act = {name: asha.on_trial_result(None, trials[name], {"epoch": 1, "dev_score": score})
           for name, score in (("a-good", 0.9), ("b-low", 0.3), ("a-bad", 0.5))}
    # b-low is worse than both of task a, but meets no other trial of task b
    assert act == {"a-good": "CONTINUE", "b-low": "CONTINUE", "a-bad": "STOP"}


@pytest.mark.ray
def test_resume_after_ctrl_c_and_after_kill_9_of_the_driver_keeps_finished_trials(ray_session, tiny_cache, tmp_path):
    """Each driver joins the session's Ray (a dead driver's trials die with its job); er's own local Ray, and what is
    left of it after a kill, are tested in test_ray_sessions and test_console."""
    url, folder, _ = tiny_cache
    # 4 epochs: the third trial is still training, seconds after its first checkpoint, when its driver is killed
    path = _sweep_file(tmp_path, url, [folder], max_concurrent=1,
                       defaults={"epochs": 4, "patience": 4, "batch_size": 8, "lr": 3.0e-3}, grid={"seed": [0, 1, 2]})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    argv = [sys.executable, "-m", "pipelines.cli", "sweep", str(path)]
    runs = tmp_path / "runs"

    def interrupt(args, until, sig):
        driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            _until(until, what="the trial to interrupt")
            os.kill(driver.pid, sig)
            return driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                driver.kill()

    first, second = runs / "tiny-reduced-seed0" / "metrics.json", runs / "tiny-reduced-seed1" / "metrics.json"
    # Ctrl-C while the second trial runs: er's usual exit, and the sweep is not marked complete
    assert interrupt(argv, lambda: first.exists() and (runs / "tiny-reduced-seed1").exists(), signal.SIGINT) == 130
    assert json.loads((runs / ".er-output.json").read_text())["status"] == "failed"
    finished = first.stat().st_mtime_ns
    # --resume, killed -9 while the third trial runs, after its first epoch's checkpoint
    interrupt(argv[:-1] + ["--resume", str(path)],
              lambda: second.exists() and (runs / "tiny-reduced-seed2" / "checkpoints" / "train_state.pt").exists(),
              signal.SIGKILL)
    assert not (runs / "results.json").exists()
    done = subprocess.run(argv[:-1] + ["--resume", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(resumed)" in done.stdout
    assert "(raylet)" not in done.stdout + done.stderr  # e.g. its warning on starting many workers at once
    rows = _rows(tmp_path)
    assert [(r["params"]["seed"], r["status"]) for r in rows] == [(0, "ok"), (1, "ok"), (2, "ok")]
    assert first.stat().st_mtime_ns == finished  # the finished trial was not trained again
    third = json.loads((runs / "tiny-reduced-seed2" / "metrics.json").read_text())
    assert third["resumed"] and third["resumed"][0]["after_epoch"] >= 1, third["resumed"]  # from its last epoch


@pytest.mark.real
def test_real_tasks_share_one_ingestion(ray_session, data_dir, tmp_path):
    """ChemProt, SciCite and NCBI-disease slices in ONE MiniLM k=3 cache, then a `reduced` sweep over the three."""
    from er_core import Recycler, ingest_local, load_task
    from er_core.tasks import example_input

    limit = {"train": 160, "dev": 40, "test": 60}
    folders = [data_dir / name for name in ("chemprot", "sci-cite", "ncbi-disease")]
    tasks = [load_task(f, limit=limit) for f in folders]
    cache = str(tmp_path / "cache")
    rec = Recycler.load("bundled", layer=3, codec="fp16", max_length=128)
    ingest_local((example_input(e) for t in tasks for exs in t.splits.values() for e in exs), cache, rec, progress=False)
    path = _write(tmp_path / "sweep.yaml", {
        "cache": cache, "output": "runs", "tasks": [str(f) for f in folders], "methods": ["reduced"], "limit": limit,
        "defaults": {"epochs": 1, "batch_size": 16, "lr": 3.0e-4}, "max_concurrent": 3,
    })
    assert er(["sweep", str(path)]) == 0
    rows = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert [(r["task"], r["status"]) for r in rows] == [(f.name, "ok") for f in folders]
    metric = {"chemprot": "test_micro_f1", "sci-cite": "test_micro_f1", "ncbi-disease": "test_f1"}
    assert all(isinstance(r[metric[r["task"]]], float) and r["metric"] == metric[r["task"]][5:] for r in rows)
