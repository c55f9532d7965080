"""The per-method defaults of TrainConfig are the settings REPORT `defaults-dev` chose on dev, and that choice rests on
every task: the sweeps' rows (benchmarks/results/defaults-dev-*.json) are read here and the choice is made again."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.sweep_report import BASE_TRAIN, choose, train_examples
from er_core import TrainConfig
from er_core.models import bundled_model_path
from er_core.train_config import METHODS

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# the sweeps ran on the bundled MiniLM; an encoder much wider than it takes train_config.WIDE_LR
BUNDLED_HIDDEN = json.loads((bundled_model_path() / "config.json").read_text())["hidden_size"]


def _rows() -> list[dict]:
    return [r for f in sorted(RESULTS.glob("defaults-dev-*.json")) for r in json.loads(f.read_text())["rows"]]


def test_every_method_was_swept_on_every_task_and_its_chosen_setting_ran_on_all():
    rows = _rows()
    tasks = {r["task"] for r in rows}
    assert len(tasks) >= 3
    chosen = choose(rows)
    for method in METHODS:
        assert {r["task"] for r in rows if r["method"] == method} == tasks, f"{method} was not swept on every task"
        assert chosen[method]["tasks"] == sorted(tasks)


def test_trainconfig_defaults_are_the_settings_chosen_on_dev():
    for method, setting in choose(_rows()).items():
        default = TrainConfig(method=method).for_encoder(BUNDLED_HIDDEN)
        for name in ("lr", "head_lr", "min_steps", "epochs", "patience", "batch_size",
                     "lora_modules", "lora_r", "lora_alpha", "lora_variant"):
            if name in setting:
                assert getattr(default, name) == setting[name], (method, name, getattr(default, name), setting[name])


def test_a_larger_slice_decides_only_the_fields_it_varied_the_rest_stay_the_first_sweeps_choice():
    rows = _rows()
    first = choose([r for r in rows if train_examples(r) == BASE_TRAIN])
    for method, c in choose(rows).items():
        larger = [r["setting"] for r in rows if r["method"] == method and train_examples(r) == c["train_examples"]]
        varied = {k for k in larger[0] if len({json.dumps(s[k]) for s in larger}) > 1}
        assert {k: v for k, v in c.items() if k in larger[0] and k not in varied} == \
            {k: v for k, v in first[method].items() if k in larger[0] and k not in varied}, method


def test_a_sweep_at_a_larger_slice_decides_between_the_settings_it_reran_and_seeds_are_averaged_per_task():
    def row(task, head, dev, train=None, seed=0):
        r = {"task": task, "method": "lora", "dev": dev, "seed": seed,
             "setting": {"lr": 1e-3, "head_lr": head, "epochs": 4, "lora_modules": "all", "lora_r": 16, "lora_alpha": 32,
                         "lora_variant": "lora"}}
        return r if train is None else {**r, "train_examples": train}  # rows saved without a slice: the first sweeps'

    small = [row("a", 1e-2, 0.9), row("a", None, 0.8), row("b", 1e-2, 0.9), row("b", None, 0.8)]
    assert choose(small)["lora"]["head_lr"] == 1e-2
    # at 2000, head at lr leads on a's mean over two seeds (0.75 vs 0.7) and b (0.8 vs 0.79), though seed 1 of a has
    # the single best dev with the head at 1e-2
    large = [row("a", None, 0.7, 2000), row("a", None, 0.8, 2000, 1), row("a", 1e-2, 0.55, 2000), row("a", 1e-2, 0.85, 2000, 1),
             row("b", None, 0.8, 2000), row("b", 1e-2, 0.79, 2000)]
    got = choose(small + large)["lora"]
    assert got["head_lr"] is None and got["train_examples"] == 2000 and got["mean_dev"] == round((0.75 + 0.8) / 2, 4)
