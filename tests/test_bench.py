"""`er bench` is installed with the project: it runs from any directory, without the repo's top-level `benchmarks/`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_tiny_task

ER = Path(sys.executable).parent / "er"
REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what is installed
    return {**env, "RAY_AUTH_MODE": "disabled", "HOME": os.environ.get("HOME", str(tmp_path))}


def test_installed_benchmarks_do_not_come_from_a_top_level_folder(tmp_path):
    got = subprocess.run([sys.executable, "-c", "import er_bench, importlib.util as u; "
                          "print(er_bench.__file__); print(u.find_spec('benchmarks') is None)"],
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    path, no_top_level = got.stdout.split()
    assert Path(path).parent == REPO / "benchmarks" and no_top_level == "True"


@pytest.mark.real
def test_er_bench_help_and_a_tiny_quick_run_from_outside_the_repo(tmp_path):
    env = _env(tmp_path)
    got = subprocess.run([str(ER), "bench", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0 and "--quick" in got.stdout, got.stderr
    data = tmp_path / "data"
    write_tiny_task(data / "tiny")
    report = tmp_path / "REPORT.md"
    report.write_text("# kept\n\nother section\n")
    got = subprocess.run([str(ER), "bench", "--quick", "--data", str(data), "--out", str(report)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert got.returncode == 0, got.stderr[-3000:]
    text = report.read_text()
    assert text.startswith("# kept") and "<!-- begin er-bench -->" in text and "| train reduced (cache) |" in text
    assert "<!-- begin fidelity -->" in text and "| tiny | reduced |" in text and "Accuracy vs k, tiny" in text
    assert "| tiny | 1 | lora |" in text and "k=1 tiny reduced" in text  # --seeds-at-k: every seed at k=1, paired
    assert (tmp_path / "REPORT.json").is_file()


@pytest.mark.real
def test_bench_gpu_tiny_runs_every_stage_on_cpu(ray_session, tmp_path):
    """The GPU benchmark's code paths, on CPU with a tiny shape: every stage runs and reports its fields (not its speed).
    Its nine `er` commands join the session's Ray (RAY_ADDRESS) rather than each starting one: a Ray start is
    tested elsewhere, and nine would cost a minute here."""
    from er_core.models import bundled_model_path

    task = write_tiny_task(tmp_path / "task", sizes=(("train", 96), ("dev", 48), ("test", 48)))
    out = tmp_path / "gpu"
    got = subprocess.run([sys.executable, "-m", "er_bench.bench_gpu", "--task", str(task), "--tokenizer",
                          str(bundled_model_path()), "--out", str(out), "--tiny"], cwd=tmp_path,
                         env={**_env(tmp_path), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address},
                         capture_output=True, text=True, timeout=1200)
    assert got.returncode == 0, got.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text())
    assert res["device"] == "cpu" and res["shape"] == "tiny"
    assert [s["rc"] for s in res["steps"]] == [0] * 9, res["steps"]  # 2 ingests + task ingest + 2 trains + 4 predicts
    assert res["ceiling"]["examples_per_s"] > 0
    for section, keys in (("ingest", ("steady_per_s", "fixed_s")), ("predict", ("hit_ratio",))):
        assert all(k in res[section] for k in keys), res[section]
    assert all(set(res["predict"][m]) == {"steady_per_s", "fixed_s"} for m in ("reduced", "full")), res["predict"]
    assert {"loop_ratio", "plain_loop", "reduced", "full"} <= set(res["train"])
    assert res["train"]["reduced"]["fixed_s"] is not None and res["train"]["plain_loop"]["steps_per_s"] > 0
    assert "| ceiling: lower 1 layers" in (out / "gpu.md").read_text()


def test_fidelity_run_log_keeps_finished_runs_and_misses_on_any_change_of_settings(tmp_path):
    from er_bench.bench_fidelity import RunLog

    calls = []
    path = tmp_path / "runs.jsonl"
    key = {"task": "t", "config": {"lr": 1e-4, "seed": 0}}
    first = RunLog(path).measure(key, lambda: calls.append(1) or {"test": 0.5})
    again = RunLog(path).measure({"config": {"seed": 0, "lr": 1e-4}, "task": "t"}, lambda: calls.append(2) or {"test": 0.9})
    other = RunLog(path).measure({"task": "t", "config": {"lr": 3e-4, "seed": 0}}, lambda: calls.append(3) or {"test": 0.7})
    assert calls == [1, 3] and first == again and first["test"] == 0.5 and other["test"] == 0.7
    assert len(path.read_text().splitlines()) == 2


def test_row_reads_benchmark_compares_the_layouts_on_a_sample(tmp_path):
    from er_bench.bench_row_reads import run

    res = run(4096, 60, tmp_path)
    own = res["own_bytes"]
    assert res["byte ranges in the key index"]["bytes"] <= 1.5 * own  # the rows' own bytes, plus index buckets
    assert res["row groups of 64"]["bytes"] >= 5 * own  # whole row groups: the cost format 4 removed
    assert res["footer_bytes"]["row groups of 1"] > 20 * res["footer_bytes"]["row groups of 64"]


def test_scale_simulation_at_tiny_sizes_measures_every_figure(tmp_path):
    """`bench_scale --simulate`'s code path on a tiny cache (local only, no Ray), in its own process: io_count hooks
    the process it counts in. Checks the figures are real (not their speed): opens read the log only, the sample
    read at least its own states and at most one coalescing gap more per merged request, commits wrote bytes."""
    out = tmp_path / "sim.json"
    code = ("from er_bench import scale_sim; scale_sim.run(sizes=(2000, 6000), out_json=%r, s3=False, ray_on=False, "
            "shard_rows=256, commit_every=4, window=3, sample=40, claim_calls=2)" % str(out))
    got = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    from er_core.store.parquet_io import COALESCE

    res = json.loads(out.read_text())
    for n, a in res["at"].items():
        assert a["open"]["bytes"] > 0 and a["open"]["files"] >= 1 and a["open"]["version"] >= 1, a["open"]
        assert 0 < a["locate"]["bytes"] <= a["index_bytes"] and a["locate"]["requests"] > 0
        s = a["sample"]
        assert s["own_state_bytes"] <= s["bytes"] <= s["own_state_bytes"] + COALESCE * (40 - s["requests"]), s
        assert 1 <= s["real_size_ratio"] <= 2
        c = a["commit"]
        assert c["commits"] == 3 and c["mean_bytes_written"] > 0 and c["mean_seconds"] > 0
        assert a["full_merge"]["bytes_written"] > 0 and a["full_merge"]["bytes"] >= a["index_bytes"]
        assert a["claims"]["in_process"]["claims_per_s"] > 0 and a["claims"]["calls"] == 2
    assert res["at"]["6000"]["shards"] > res["at"]["2000"]["shards"]
    assert set(res["verdicts"]) == {"commit", "open", "sample"}


def _fake_fidelity(tmp_path, monkeypatch):
    """bench_fidelity with a stand-in for training and no ingestion; a tiny task under tmp_path/data. lora is still
    rising at 10 epochs (at lr 3e-4 at 20 too); on dev lr 3e-3 does best at 10 epochs and falls apart at 20, and lr
    1e-3 does better at 20, so only a choice between the two caps on dev picks 3e-3. Returns the module and its runs."""
    from er_bench import bench_fidelity as bf

    calls = []

    def fake_train(cache, task_dir, out, cfg, limit, device):
        assert not out.exists(), out  # finetune refuses a folder holding an earlier run, an extended run's too
        out.mkdir(parents=True)
        calls.append((cfg.method, cfg.lr, cfg.seed, cfg.epochs))
        rising = cfg.method == "lora" and (cfg.epochs == 10 or cfg.lr == 3e-4)
        best, ran = (cfg.epochs, cfg.epochs) if rising else (14, 17) if cfg.epochs == 20 else (2, 5)
        score = {1e-3: 0.9, 3e-3: 0.85}.get(cfg.lr, 0.7) if cfg.method == "lora" else 0.7
        dev = score + cfg.epochs / 2000
        if (cfg.method, cfg.lr) == ("lora", 3e-3):
            dev = 0.92 if cfg.epochs == 10 else 0.6
        return {"wall_seconds": 1.0, "train_examples_per_second": 1.0, "metric": "micro_f1", "dev": dev,
                "test": score + cfg.epochs / 1000, "test_macro_f1": None, "best_epoch": best, "epochs_run": ran}

    monkeypatch.setattr(bf, "_train", fake_train)
    monkeypatch.setattr(bf, "_ingest", lambda *a, **k: 0.1)
    write_tiny_task(tmp_path / "data" / "tiny")
    return bf, calls


@pytest.mark.real
def test_fidelity_runs_a_run_still_improving_at_the_cap_again_with_twice_the_cap(tmp_path, monkeypatch):
    """Training to convergence: a run whose last epoch was its best gets a longer run, and the one better on dev is
    reported; a run that converged is not run again, nor is anything on a rerun from the run log."""
    bf, calls = _fake_fidelity(tmp_path, monkeypatch)
    args = dict(seeds=(0, 1), runs=tmp_path / "runs.jsonl", extras=False, log=lambda line: None)
    res = bf.run(tmp_path / "data", **args)
    assert sorted(c for c in calls if c[3] == 20) == [("lora", 3e-4, 0, 20), ("lora", 1e-3, 0, 20), ("lora", 1e-3, 1, 20),
                                                      ("lora", 3e-3, 0, 20), ("lora", 3e-3, 1, 20)]
    lora = [r for r in res["runs"] if r["method"] == "lora"]
    assert [(r["setting"], r["lr"], r.get("extended_from"), r.get("longer_dev"), r["best_epoch"], r["epochs_run"])
            for r in lora] == [("tuned", 3e-3, None, 0.6, 10, 10)] * 2 + [("default", 1e-3, 10, None, 14, 17)] * 2
    assert all("extended_from" not in r and "longer_dev" not in r for r in res["runs"] if r["method"] != "lora")
    assert [p["mean"] for p in res["paired"] if p["method"] == "lora"] == [pytest.approx(0.86), pytest.approx(0.92)]
    tuning = {r["lr"]: r for r in res["tuning"] if r["method"] == "lora"}
    assert tuning[3e-3]["chosen"] and tuning[3e-4]["extended_from"] == 10 and tuning[3e-4]["dev"] == pytest.approx(0.71)
    text = bf.report(res, [], "fidelity-tiny")
    assert "run again with at most 20 epochs" in text and "reported only where it did better on dev" in text
    assert "The longer: tiny lora lr 0.001 seed 0; tiny lora lr 0.001 seed 1; tiny lora lr 0.0003 seed 0." in text
    assert ("The 10-epoch one, not worse on dev: tiny lora lr 0.003 seed 0 (dev 0.9200, at 20: 0.6000); "
            "tiny lora lr 0.003 seed 1 (dev 0.9200, at 20: 0.6000).") in text
    assert "Still improving at the last epoch run (not converged): tiny lora lr 0.0003 seed 0." in text
    n = len(calls)
    again = bf.run(tmp_path / "data", **args)  # from the run log alone
    assert (again["paired"], again["tuning"], again["runs"]) == (res["paired"], res["tuning"], res["runs"]) and len(calls) == n


def test_fidelity_summary_lists_every_recycled_row_of_the_tuned_sections_against_the_goal(tmp_path):
    from er_bench.fidelity_summary import load, summary
    from er_core import TrainConfig

    def paired(method, setting, lr, diff, **extra):
        return {"task": "t", "method": method, "setting": setting, "lr": lr, "metric": "f1", "mean": 0.8 + diff / 100,
                "std": 0.01, "diff_points": diff, "diff_std": 0.5, **extra}

    res = {"model": "bundled", "num_layers": 6, "k": 3, "limit": {"train": 2000, "dev": 500}, "tuning": [{}],
           "defaults": {"reduced": {"lr": 3e-4}, "lora": {"lr": 1e-3, "head_lr": 1e-2}},
           "paired": [paired("full", "tuned", 1e-4, 0.0), paired("reduced", "tuned", 3e-4, -0.4),
                      paired("lora", "tuned", 3e-3, -2.5), paired("lora", "default", 1e-3, -0.9)],
           "at_k": [paired("lora", "k=1", 3e-3, 0.3, layer=1), paired("lora", "k=1 default", 1e-3, -1.2, layer=1)]}
    (tmp_path / "fidelity-t.json").write_text(json.dumps(res))
    (tmp_path / "fidelity.json").write_text(json.dumps({k: v for k, v in res.items() if k != "tuning"}))  # untuned
    (tmp_path / "fidelity-q.json").write_text(json.dumps({**res, "quick": True}))
    sections = load(tmp_path)
    assert list(sections) == ["fidelity-t"]
    rows = [line for line in summary(sections).splitlines() if line.startswith("| `fidelity-t`")]
    assert [r.split(" | ")[4:8] + r.split(" | ")[-2:] for r in rows] == [
        ["3", "reduced", "tuned = default", "0.0003", "-0.40 ± 0.50", "met |"],
        ["3", "lora (head 0.01)", "tuned", "0.003", "-2.50 ± 0.50", "missed by 1.50 |"],
        ["3", "lora (head 0.01)", "default", "0.001", "-0.90 ± 0.50", "met |"],
        ["1", "lora (head 0.01)", "tuned", "0.003", "+0.30 ± 0.50", "met |"],
        ["1", "lora (head 0.01)", "default", "0.001", "-1.20 ± 0.50", "missed by 0.20 |"]]
    res["defaults"]["lora"]["head_lr"] = None  # the head at lr: the rows name no rate of its own
    rows = [line for line in summary({"fidelity-t": res}).splitlines() if line.startswith("| `fidelity-t`")]
    assert [r.split(" | ")[5] for r in rows] == ["reduced", "lora", "lora", "lora", "lora"]
    # a section measured at another min_steps than the shipped one says so; at the shipped one, nothing
    res["defaults"]["lora"]["min_steps"] = 7
    rows = [line for line in summary({"fidelity-t": res}).splitlines() if line.startswith("| `fidelity-t`")]
    assert [r.split(" | ")[5] for r in rows] == ["reduced"] + ["lora (>= 7 steps)"] * 4
    res["defaults"]["lora"]["min_steps"] = TrainConfig(method="lora").min_steps
    rows = [line for line in summary({"fidelity-t": res}).splitlines() if line.startswith("| `fidelity-t`")]
    assert [r.split(" | ")[5] for r in rows] == ["reduced", "lora", "lora", "lora", "lora"]


def test_run_log_keys_a_min_steps_that_adds_no_epoch_as_0():
    """Such a run is the same run at any min_steps up to the cap's steps, so a new default keeps it."""
    from er_bench.bench_fidelity import keyed
    from er_core import TrainConfig

    c = TrainConfig(method="lora", epochs=10, min_steps=1000)
    assert keyed(c, 2000)["min_steps"] == 0  # 125 steps an epoch: the 10-epoch cap runs 1,250
    assert keyed(c, 500)["min_steps"] == 1000  # 32 steps an epoch: it adds 22 epochs
    assert keyed(TrainConfig(method="lora", epochs=10, min_steps=500), 2000) == keyed(c, 2000)
    assert keyed(TrainConfig(method="lora", epochs=10, min_steps=500), 500) != keyed(c, 500)


@pytest.mark.real
def test_fidelity_at_a_seeds_at_k_layer_tunes_the_lr_there_and_runs_the_shipped_default_too(tmp_path, monkeypatch):
    """At k=1 the lr is tuned again on dev (seed 0, the same grid); every seed runs at that lr and, where it is not the
    shipped default, at the default too (the rate a user gets), each paired to the tuned full and named in the report."""
    from er_core.train_config import DEFAULT_LR

    bf, calls = _fake_fidelity(tmp_path, monkeypatch)
    trained = bf._train

    def lora_wants_less_at_k1(cache, task_dir, out, cfg, limit, device):  # at k=3, lora's dev picks 3e-3
        r = trained(cache, task_dir, out, cfg, limit, device)
        at_k1 = Path(cache).name.startswith("k1-")
        return {**r, "dev": 0.99} if at_k1 and (cfg.method, cfg.lr) == ("lora", 3e-4) else r

    monkeypatch.setattr(bf, "_train", lora_wants_less_at_k1)
    res = bf.run(tmp_path / "data", seeds=(0, 1), runs=None, extras=True, seeds_at_k=(1,), log=lambda line: None)
    assert {(r["method"], r["lr"]) for r in res["at_k_tuning"] if r["layer"] == 1} == {
        (m, lr) for m in ("reduced", "lora") for lr in bf.GRIDS[m]}  # every cell of the grid, at k=1
    assert [(r["method"], r["lr"]) for r in res["at_k_tuning"] if r["chosen"]] == [("reduced", 1e-4), ("lora", 3e-4)]
    runs = {(r["method"], r["setting"], r["lr"], r["seed"]) for r in res["at_k_runs"]}
    assert {(m, s, lr) for m, s, lr, _ in runs} == {("reduced", "k=1", 1e-4), ("reduced", "k=1 default", DEFAULT_LR["reduced"]),
                                                    ("lora", "k=1", 3e-4), ("lora", "k=1 default", DEFAULT_LR["lora"])}
    assert len(runs) == 8 and all(r["layer"] == 1 for r in res["at_k_runs"])
    assert [(p["method"], p["setting"]) for p in res["at_k"]] == [("reduced", "k=1"), ("lora", "k=1"),
                                                                  ("reduced", "k=1 default"), ("lora", "k=1 default")]
    text = bf.report(res, [], "fidelity-tiny")
    assert "| tiny | 1 | lora | default | 0.001 |" in text and "| tiny | 1 | lora | tuned at k=1 | 0.0003 |" in text
    assert "k=1 (default lr) tiny lora" in text and "k=1 tiny lora: 0.0003 0.9900*, 0.001" in text
    untuned = bf.run(tmp_path / "data", seeds=(0, 1), runs=None, extras=True, seeds_at_k=(1,), log=lambda line: None,
                     tune=False)
    assert {r["setting"] for r in untuned["at_k_runs"]} == {"k=1"}  # untuned: the default is the only rate


@pytest.mark.real
def test_fidelity_vs_k_probes_only_the_layers_asked_for_and_the_report_says_how_to_remake_it(tmp_path, monkeypatch):
    bf, calls = _fake_fidelity(tmp_path, monkeypatch)
    res = bf.run(tmp_path / "data", seeds=(0, 1), runs=None, extras=True, vs_k=(3, 1), log=lambda line: None)
    assert {m: [r["layer"] for r in rows] for m, rows in res["vs_k"]["tiny"].items()} == {"reduced": [1, 3], "lora": [1, 3]}
    text = bf.report(res, [], "fidelity-tiny")
    assert "--vs-k 1 3 --section fidelity-tiny" in text and "Accuracy vs k, tiny (`lora` at lr 0.003, seed 0): k=1:" in text
    assert "--vs-k" not in bf.report(bf.run(tmp_path / "data", seeds=(0, 1), runs=None, extras=True, log=lambda line: None),
                                     [], "fidelity-tiny")
    with pytest.raises(SystemExit, match="--vs-k: \\[6\\] not a layer"):
        bf.run(tmp_path / "data", seeds=(0, 1), runs=None, extras=True, vs_k=(6,), log=lambda line: None)


@pytest.mark.real
def test_fidelity_without_tuning_runs_each_method_at_its_default_only_and_says_so(tmp_path, monkeypatch):
    from er_core.train_config import DEFAULT_LR

    bf, calls = _fake_fidelity(tmp_path, monkeypatch)
    res = bf.run(tmp_path / "data", seeds=(0, 1), runs=None, extras=False, log=lambda line: None, tune=False)
    assert sorted({(m, lr) for m, lr, _, _ in calls}) == sorted(DEFAULT_LR.items())
    assert sorted((r["method"], r["seed"]) for r in res["runs"]) == sorted((m, s) for m in DEFAULT_LR for s in (0, 1))  # once each
    assert [(p["method"], p["setting"]) for p in res["paired"]] == [("full", "default"), ("reduced", "default"),
                                                                     ("lora", "default")]
    text = bf.report(res, [], "fidelity-tiny")
    assert "Not tuned (--no-tune): every method at its shipped default lr" in text and "Tuned on dev" not in text
    assert "--no-tune --section fidelity-tiny" in text and "| vs full at its default, points" in text and "| vs tuned full" not in text
    assert "--train" not in text and " --train 500 --dev 300 --no-extras" in bf.report({**res, "limit": {"train": 500, "dev": 300}},
                                                                                      [], "fidelity-tiny")  # slices: remade as run
    assert "within 1.0 point of `full` at its default" in text and "Learned nothing" not in text
    assert bf._speedups(res)["tiny"]["reduced"] == 1.0  # the speed line reads the default rows


@pytest.mark.real
def test_fidelity_report_flags_a_run_that_learned_nothing(tmp_path, monkeypatch):
    """A baseline stuck at the majority label (MPNet sci-cite `full` at 1e-4 did this) is named, not averaged quietly."""
    bf, calls = _fake_fidelity(tmp_path, monkeypatch)
    trained = bf._train

    def full_stalls(*a):
        r = trained(*a)
        return {**r, "dev": 0.5} if a[3].method == "full" else r  # the tiny task's dev is balanced: majority 0.5

    monkeypatch.setattr(bf, "_train", full_stalls)
    res = bf.run(tmp_path / "data", seeds=(0, 1), runs=None, extras=False, log=lambda line: None, tune=False)
    assert res["majority_dev"]["tiny"]["micro_f1"] == 0.5
    text = bf.report(res, [], "fidelity-tiny")
    line = next(x for x in text.splitlines() if "Learned nothing" in x)
    assert "tiny full lr 0.0001 seed 0 (dev 0.5000); tiny full lr 0.0001 seed 1 (dev 0.5000)." in line
    assert "reduced" not in line and "lora" not in line
