"""Drivers plan and check with a model folder's remembered spec (er_core.model_specs); the workers check the weights.

A remembered spec must equal the loaded one, be computed again when the folder's files change, spare a driver
torch and transformers, and, when wrong, fail a run before anything is committed rather than cache other states, and be refreshed.
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

    # New weights in the same folder, of the same size and with the old times put back (as `cp -p` or rsync would):
    # a new spec, not the remembered one.
    weights = model / "model.safetensors"
    st = weights.stat()
    enc = AutoModel.from_pretrained(model)
    enc.embeddings.word_embeddings.weight.data.add_(0.5)
    enc.save_pretrained(model)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size
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


def _spoiled(specs: Path) -> bool:
    return any(json.loads(e.read_text())["lower_fingerprint"] == "0" * 64 for e in specs.glob("*.json"))


def test_a_wrong_remembered_spec_fails_an_ingest_before_any_commit_and_is_refreshed(ray_session, tiny_bert, tmp_path,
                                                                                      specs):
    from er_core import open_cache
    from er_core.keys import example_key
    from pipelines.ingest import run

    def corpus(n: int) -> list[str]:
        path = tmp_path / f"c{n}.jsonl"
        path.write_text("".join(json.dumps({"text": f"the protein {i} binds"}) + "\n" for i in range(n)))
        return [str(path)]

    cache = tmp_path / "cache"
    args = dict(model=tiny_bert, layer="1", codec="fp16", progress=False)
    cache_spec(tiny_bert, "1", "fp16")
    _spoil(specs)
    # A new cache: the actors' check fails the run in one line; nothing is committed, and the entry is refreshed.
    with pytest.raises(CacheMismatchError, match="on this worker does not match.*now refreshed: run the command again"):
        run(corpus(20), str(cache), **args)
    assert not (cache / "_log").exists() and not list(cache.rglob("*.parquet"))
    assert not _spoiled(specs)
    run(corpus(20), str(cache), **args)
    # An existing cache: the driver finds its spec differs from the cache's, computes it afresh, and goes on.
    _spoil(specs)
    run(corpus(30), str(cache), **args)
    reader = open_cache(str(cache))
    assert not reader.spec.diff(Recycler.load(tiny_bert, "1", "fp16").spec) and not _spoiled(specs)
    assert set(reader.keys()) == {example_key({"text": f"the protein {i} binds"}, reader.spec.tokenizer) for i in range(30)}


def test_a_training_driver_refreshes_a_wrong_entry_and_refuses_a_changed_model(tiny_bert, tiny_task, tmp_path, specs):
    from transformers import AutoModel

    from er_core import ingest_local
    from er_core.finetuning import setup_data
    from er_core.tasks import example_input, load_task
    from er_core.train import TrainConfig

    model = shutil.copytree(tiny_bert, tmp_path / "model")
    cache = str(tmp_path / "cache")
    rec = Recycler.load(str(model), "1", "fp16")
    ingest_local([example_input(e) for exs in load_task(tiny_task).splits.values() for e in exs], cache, rec, progress=False)
    p = setup_data(cache, str(tiny_task), TrainConfig(), load_model=False)
    assert p.encoder is None and p.data["train"].items
    _spoil(specs)
    setup_data(cache, str(tiny_task), TrainConfig(), load_model=False)
    assert not _spoiled(specs)
    enc = AutoModel.from_pretrained(model)  # the model changed since the cache was built
    enc.embeddings.word_embeddings.weight.data.add_(0.5)
    enc.save_pretrained(model)
    with pytest.raises(CacheMismatchError, match="differs from the one cache"):
        setup_data(cache, str(tiny_task), TrainConfig(), load_model=False)
