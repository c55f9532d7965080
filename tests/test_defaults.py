"""The per-method defaults of TrainConfig are the settings REPORT `defaults-dev` chose on dev, and that choice rests on
every task: the sweeps' rows (benchmarks/results/defaults-dev-*.json) are read here and the choice is made again."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.sweep_report import choose
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
