"""Drivers plan and check with a model folder's remembered spec (er_core.model_specs); the workers check the weights.

A remembered spec must equal the loaded one, be computed again when the folder's files change, spare a driver
torch and transformers, and, when wrong, fail a run before anything is committed rather than cache other states.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from er_core import Recycler
from er_core.errors import CacheMismatchError
from er_core.recycle import cache_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def specs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ER_SPECS", str(tmp_path / "specs"))
    return tmp_path / "specs"


def test_a_remembered_spec_is_the_loaded_one_until_the_folder_changes(tiny_bert, tmp_path, specs, monkeypatch):
    from transformers import AutoModel

    model = shutil.copytree(tiny_bert, tmp_path / "model")
    first = cache_spec(str(model), "1", "fp16")
    assert first == Recycler.load(str(model), "1", "fp16").spec

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although its spec is remembered")

    with monkeypatch.context() as m:
        m.setattr(Recycler, "load", no_load)
        assert cache_spec(str(model), "1", "fp16") == first
        # as a cache's spec asks for it (er train's check): the layer and max length resolved
        assert cache_spec(str(model), first.layer, "fp16", first.tokenizer.max_length) == first

    enc = AutoModel.from_pretrained(model)  # new weights in the same folder: a new spec, not the remembered one
    enc.embeddings.word_embeddings.weight.data.add_(0.5)
    enc.save_pretrained(model)
    again = cache_spec(str(model), "1", "fp16")
    assert again.lower_fingerprint != first.lower_fingerprint
    assert again == Recycler.load(str(model), "1", "fp16").spec


def test_a_driver_with_a_remembered_spec_imports_neither_torch_nor_transformers(tiny_bert, specs):
    cache_spec(tiny_bert, "1", "fp16")
    script = ("import sys\nimport pipelines.ingest\nfrom er_core.recycle import cache_spec\n"
              f"cache_spec({tiny_bert!r}, '1', 'fp16')\n"
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    got = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "ER_SPECS": str(specs)})
    assert got.returncode == 0 and got.stdout.strip() == "[]", got.stdout + got.stderr[-2000:]


def _spoil(specs: Path) -> None:
    for entry in specs.glob("*.json"):
        entry.write_text(json.dumps({**json.loads(entry.read_text()), "lower_fingerprint": "0" * 64}))


def test_a_wrong_remembered_spec_fails_the_ingest_before_anything_is_committed(ray_session, tiny_bert, tmp_path, specs):
    from pipelines.ingest import run

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the protein {i} binds"}) + "\n" for i in range(20)))
    cache_spec(tiny_bert, "1", "fp16")
    _spoil(specs)
    with pytest.raises(CacheMismatchError, match="on this worker does not match"):  # the actor's check, in one line
        run([str(corpus)], str(tmp_path / "cache"), model=tiny_bert, layer="1", codec="fp16", progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert not list((tmp_path / "cache").rglob("*.parquet"))


def test_a_wrong_remembered_spec_stops_a_training_driver(tiny_bert, tiny_task, tmp_path, specs):
    from er_core import ingest_local
    from er_core.finetuning import setup_data
    from er_core.tasks import example_input, load_task
    from er_core.train import TrainConfig

    cache = str(tmp_path / "cache")
    rec = Recycler.load(tiny_bert, "1", "fp16")
    ingest_local([example_input(e) for exs in load_task(tiny_task).splits.values() for e in exs], cache, rec, progress=False)
    p = setup_data(cache, str(tiny_task), TrainConfig(), encoder=False)
    assert p.encoder is None and p.data["train"].items
    _spoil(specs)
    with pytest.raises(CacheMismatchError, match="differs from the one cache"):
        setup_data(cache, str(tiny_task), TrainConfig(), encoder=False)
