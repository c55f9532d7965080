"""`er sweep`: validation reports every problem at once; trials run concurrently; a failed trial spoils only itself."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from er_core import ErError
from pipelines.cli import main as er
from pipelines.sweep import expand, load_sweep

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, sweep: dict) -> Path:
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_every_problem_is_reported_at_once(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {
        "cache": "c", "outptu": "o", "tasks": [str(tmp_path / "nope"), {"path": str(tmp_path), "lim": 3}],
        "methods": ["reduced", "full"], "defaults": {"epochs": "two", "foo": 1}, "grid": {"lora_r": 4, "lr": ["x"]},
        "max_concurrent": 0, "resources": {"cpus_per_worker": 0}, "limit": {"train": -1},
    })
    with pytest.raises(ErError) as e:
        load_sweep(bad)
    msg = str(e.value)
    expected = ["unknown key 'outptu'", "missing required key 'output'", "nope not found", "unknown key(s) ['lim']",
                "'full' trains from raw text", "defaults.epochs must be an integer", "unknown training field 'foo'",
                "grid.lora_r must be a non-empty list", "grid.lr must be a number", "max_concurrent must be an integer >= 1",
                "cpus_per_worker must be a number > 0", "limit['train'] must be an integer >= 0"]
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
    assert len(expand(sweep)) == 9


def _relabelled(folder: Path, dest: Path) -> Path:
    """A second task on the same texts (so the same cache rows): is the sentence long or short?"""
    dest.mkdir()
    for f in folder.glob("*.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        dest.joinpath(f.name).write_text("".join(
            json.dumps({"text": r["text"], "label": "long" if len(r["text"].split()) > 6 else "short"}) + "\n" for r in rows))
    return dest


@pytest.mark.ray
def test_sweep_runs_trials_concurrently_and_survives_a_failure(ray_session, tiny_cache, tmp_path, capsys):
    url, folder, _ = tiny_cache
    broken = tmp_path / "broken"  # one train example the cache never saw: its trial must fail, alone
    shutil.copytree(folder, broken)
    with open(broken / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "a sentence never ingested", "label": "inhibitor"}) + "\n")
    shutil.copytree(folder, tmp_path / "tiny")
    tasks = [str(broken), str(tmp_path / "tiny"), str(_relabelled(folder, tmp_path / "length"))]
    path = _write(tmp_path / "sweep.yaml", {
        "cache": url, "output": "runs", "tasks": tasks, "methods": ["reduced"], "max_concurrent": 2,
        "defaults": {"epochs": 1, "batch_size": 32, "lr": 3.0e-3}, "resources": {"cpus_per_worker": 0.5},
    })
    assert er(["sweep", str(path)]) == 1  # a failed trial makes the exit status non-zero ...
    rows = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert [r["task"] for r in rows] == ["broken", "tiny", "length"]
    failed, *ok = rows
    assert failed["status"] == "failed" and "not in the cache" in failed["error"]
    assert (Path(failed["out_dir"]) / "error.txt").exists()
    assert all(r["status"] == "ok" and r["test_micro_f1"] is not None and r["train_seconds"] > 0 for r in ok)  # ... the rest ran
    assert all(Path(r["out_dir"], "metrics.json").exists() for r in ok)
    (a, b) = ok
    assert max(a["start"], b["start"]) < min(a["end"], b["end"]), "the two good trials did not overlap"
    with open(tmp_path / "runs" / "results.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["failed", "ok", "ok"]
    out = capsys.readouterr().out
    assert "start tiny-reduced" in out and "FAILED broken-reduced" in out and "failed trials:" in out


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
