"""`er advise`: short probes at several k from caches at those layers, and the cheapest k within tolerance of the best."""

from __future__ import annotations

import json

import pytest

from er_core.advise import AdviseConfig, recommend
from pipelines.cli import main as er


def test_the_largest_k_within_tolerance_of_the_best_is_recommended():
    rows = [{"layer": 0, "dev": 0.900}, {"layer": 2, "dev": 0.905}, {"layer": 3, "dev": 0.896}, {"layer": 4, "dev": 0.880}]
    assert recommend(rows, tolerance=1.0)["layer"] == 3  # 0.9 points behind the best (k=2): within 1
    assert recommend(rows, tolerance=0.5)["layer"] == 2
    assert recommend(rows, tolerance=3.0)["layer"] == 4


@pytest.mark.parametrize("method", ["reduced", "lora"])
def test_a_probe_trains_exactly_its_epochs_whatever_the_method(method):
    steps_per_epoch = -(-AdviseConfig().budget // AdviseConfig().batch_size)
    assert AdviseConfig(method=method, epochs=2).probe_config().max_epochs(steps_per_epoch) == 2


@pytest.mark.real
def test_advise_on_a_bundled_task_probes_every_k_and_follows_its_rule(data_dir, tmp_path, capsys):
    from er_core import Recycler, ingest_local, load_task
    from er_core.tasks import example_input

    def labels(d):  # the classification task with the fewest labels learns most in a short probe
        return len({json.loads(line)["label"] for line in (d / "train.jsonl").read_text().splitlines()[:2000]})

    task_dir = min((d for d in sorted(data_dir.iterdir()) if (d / "train.jsonl").exists()), key=labels)
    cache = str(tmp_path / "cache")
    seed = load_task(task_dir, limit={"train": 8, "dev": 0, "test": 0})  # a cache at k=3 holding a few of its examples
    ingest_local([example_input(e) for e in seed.splits["train"]], cache, Recycler.load("bundled", layer=3, max_length=96),
                 progress=False)
    out = tmp_path / "advice"
    assert er(["advise", "--cache", cache, "--task", str(task_dir), "--budget", "160", "--dev", "60", "--epochs", "2",
               "--lr", "3e-4", "--out", str(out)]) == 0
    advice = json.loads((out / "advice.json").read_text())
    table = {r["layer"]: r for r in advice["table"]}
    assert sorted(table) == [0, 2, 3, 4]  # 0, L/4, L/2, 3L/4 of MiniLM's 6 layers
    assert table[3]["cache"] == cache and table[3]["ingested"] > 0  # the task's missing examples went into the cache
    assert all(table[k]["cache"] == str(out / "caches" / f"k{k}") for k in (0, 2, 4))
    assert all(0 <= r["dev"] <= 1 and r["train_seconds"] > 0 and r["trained_layers"] == 6 - r["layer"] for r in table.values())
    best = max(r["dev"] for r in table.values())
    assert advice["recommended"] == max(k for k, r in table.items() if 100 * (best - r["dev"]) <= 1.0 + 1e-9)
    assert f"--layer {advice['recommended']}" in advice["command"]
    printed = capsys.readouterr().out
    assert f"recommended k={advice['recommended']}" in printed and "<- recommended" in printed


def test_several_tasks_get_the_shallowest_k_any_of_them_needs(monkeypatch):
    from er_core import advise as advise_mod
    from er_core.advise import AdviseConfig, advise_tasks, format_advice

    wants = {"cls": 4, "ner": 1, "cls2": 3}

    def fake(cache, task, cfg, workdir, storage_options=None, log=print):
        k = wants[task]
        return {"cache": cache, "task": task, "model": "m", "num_layers": 6, "config": {}, "recommended": k,
                "table": [{"layer": k, "trained_layers": 6 - k, "metric": "f1", "dev": 0.5, "train_seconds": 1.0,
                           "train_examples_per_second": 1.0, "ingest_seconds": 1.0}], "rule": "r",
                "command": f"er ingest CORPUS --cache NEW_CACHE --model m --layer {k} --codec fp16"}

    monkeypatch.setattr(advise_mod, "advise", fake)
    got = advise_tasks("c", list(wants), AdviseConfig(), "w")
    assert got["recommended"] == 1 and got["per_task"] == wants and "--layer 1 " in got["command"]
    assert "one cache at k=1 serves all 3 tasks" in got["rule"] and "ingest the corpus 3 times" in got["rule"]
    text = format_advice(got)
    assert "== ner" in text and "recommended k=1" in text.splitlines()[-2]
    assert advise_tasks("c", ["cls"], AdviseConfig(), "w")["recommended"] == 4  # one task: its own advice
