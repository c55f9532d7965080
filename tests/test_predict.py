"""`er predict`: cache hits run only the upper layers, and give exactly the full model's predictions."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from er_core import TrainConfig, finetune, load_task, open_cache
from er_core.artifacts import read_meta
from er_core.evaluate import predict as predict_items
from er_core.heads import FullModel, make_head
from er_core.models import load_encoder
from er_core.split import split_encoder
from er_core.task_data import join_cache
from pipelines.cli import main as er

pytestmark = pytest.mark.ray


def _full_model_predictions(model_dir, folder, spec):
    """The same trained weights run as one unsplit model from token ids."""
    meta = read_meta(model_dir)
    enc, tok = load_encoder(meta["model"]["name"])
    _, upper = split_encoder(enc, meta["cache"]["layer"])
    upper.load_state_dict(load_file(f"{model_dir}/upper.safetensors"))
    head = make_head("classification", enc.config.hidden_size, len(meta["task"]["labels"]))
    head.load_state_dict(load_file(f"{model_dir}/head.safetensors"))
    model = FullModel(enc, head).eval()
    from er_core.tasks import LabelMap

    task = load_task(folder)
    labels = LabelMap(meta["task"]["labels"])
    out = {}
    for split, exs in task.splits.items():
        data = join_cache(task, split, tok, spec.tokenizer, labels)
        for it, p in zip(data.items, predict_items(model, data, "text", labels)):
            out[it.example.id] = p
    return out


def test_predict_on_cached_examples_equals_full_model(ray_session, tiny_cache, tmp_path):
    url, folder, rec = tiny_cache
    model_dir = tmp_path / "model"
    finetune(url, str(folder), str(model_dir), TrainConfig(epochs=2, lr=1e-3, batch_size=8), progress=False, log=lambda r: None)
    # a second folder of texts the cache has never seen: misses go through the lower layers
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "train.jsonl").write_text("\n".join(json.dumps({"text": t, "label": "x"}) for t in
                                                 ["the gene binds the protein", "cancer cells in patients"]) + "\n")
    out = tmp_path / "preds.jsonl"
    assert er(["predict", "--cache", url, "--model-dir", str(model_dir), "--corpus", str(folder), str(fresh), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    task_name = read_meta(model_dir)["task"]["name"]
    expected = _full_model_predictions(model_dir, folder, open_cache(url).spec)
    hits = [r for r in rows if r["cached"]]
    assert len(hits) == len(expected) and {r["id"] for r in hits} == set(expected)
    assert all(r[task_name] == expected[r["id"]] for r in hits)
    misses = [r for r in rows if not r["cached"]]
    assert len(misses) == 2 and all(r[task_name] in ("inhibitor", "activates") for r in misses)


def test_predict_refuses_model_trained_on_other_cache(ray_session, tiny_cache, tiny_bert, tmp_path, capsys):
    url, folder, rec = tiny_cache
    model_dir = tmp_path / "model"
    finetune(url, str(folder), str(model_dir), TrainConfig(epochs=1), progress=False, log=lambda r: None)
    from er_core import ingest_local
    from er_core.recycle import Recycler
    from er_core.tasks import example_input

    other = str(tmp_path / "other")
    t = load_task(folder)
    ingest_local((example_input(e) for e in t.splits["test"]), other, Recycler.load(tiny_bert, layer=1, codec="fp32"), progress=False)
    assert er(["predict", "--cache", other, "--model-dir", str(model_dir), "--corpus", str(folder), "--out", str(tmp_path / "p.jsonl")]) != 0
    assert "trained on another cache" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_a_full_model_predicts_from_text_what_it_scores(ray_session, tiny_cache, tmp_path):
    """The `full` baseline predicts too (every example from text, the cache unread): its test predictions score as
    its metrics.json says."""
    from er_core.evaluate import score
    from er_core.tasks import LabelMap

    url, folder, _ = tiny_cache
    model_dir = tmp_path / "full"
    metrics = finetune(url, str(folder), str(model_dir), TrainConfig(method="full", epochs=1, lr=1e-3, batch_size=16),
                       progress=False, log=lambda r: None)
    test = tmp_path / "test"
    test.mkdir()
    (test / "test.jsonl").write_text((folder / "test.jsonl").read_text())
    out = tmp_path / "preds.jsonl"
    assert er(["predict", "--cache", url, "--model-dir", str(model_dir), "--corpus", str(test), "--out", str(out)]) == 0
    rows = {f"test:{int(r['id'].rsplit(':', 1)[1]) - 1}": r for r in map(json.loads, out.read_text().splitlines())}  # path:line
    task = load_task(folder)
    name, tok = read_meta(model_dir)["task"]["name"], load_encoder(read_meta(model_dir)["model"]["name"])[1]
    data = join_cache(task, "test", tok, open_cache(url).spec.tokenizer, LabelMap(read_meta(model_dir)["task"]["labels"]))
    assert len(rows) == len(data.items) and not any(r["cached"] for r in rows.values())
    assert score("classification", data.items, [rows[it.example.id][name] for it in data.items]) == metrics["test"]
