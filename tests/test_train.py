"""Training on the upper part: equivalence with freezing, the three methods end to end, artefacts."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from er_core import TrainConfig, finetune, ingest_local, load_task, open_cache
from er_core.errors import ArtifactMismatchError
from er_core.artifacts import check_cache, load_trained
from er_core.store.codecs import get_codec
from er_core.evaluate import predict
from er_core.heads import FullModel, RecycledModel, make_head
from er_core.recycle import Recycler
from er_core.split import split_encoder
from er_core.task_data import join_cache, label_map
from er_core.tasks import example_input
from tests.tiny_models import TINY_CONFIGS, make_tiny, padded_batch


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("k", [1, 2])
def test_reduced_step_equals_frozen_full_model(name, k):
    """Loss and upper gradients from cached fp32 states equal the full model's with layers < k frozen."""
    enc = make_tiny(name)
    ref = copy.deepcopy(enc)
    ids, mask = padded_batch(enc.config)
    labels = torch.tensor([0, 1, 2])
    torch.manual_seed(1)
    head = make_head("classification", enc.config.hidden_size, 3)
    ref_head = copy.deepcopy(head)

    lower, upper = split_encoder(enc, k)
    with torch.no_grad():
        states = lower(ids, mask)
    codec = get_codec("fp32")  # through the cache codec, so the cached bytes are what is tested
    cached = torch.stack([torch.from_numpy(codec.decode(*codec.encode(s.numpy()), s.shape).copy()) for s in states])
    model = RecycledModel(upper, head).eval()
    loss = torch.nn.functional.cross_entropy(model(cached, mask), labels)
    loss.backward()

    full = FullModel(ref, ref_head).eval()
    ref_lower, ref_upper = split_encoder(ref, k)
    for p in ref_lower.parameters():
        p.requires_grad_(False)
    ref_loss = torch.nn.functional.cross_entropy(full(ids, mask), labels)
    ref_loss.backward()

    assert abs(loss.item() - ref_loss.item()) < 1e-5
    grads = dict(upper.named_parameters())
    checked = 0
    for n, p in ref_upper.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n].grad, p.grad, atol=1e-5), n
            checked += 1
    assert checked > 0
    for n, p in ref_head.named_parameters():
        assert torch.allclose(dict(head.named_parameters())[n].grad, p.grad, atol=1e-5)


@pytest.mark.parametrize("method", ["reduced", "lora", "full"])
def test_methods_train_save_and_reload(tiny_cache, tmp_path, method):
    url, folder, rec = tiny_cache
    cfg = TrainConfig(method=method, epochs=2, lr=1e-3, batch_size=8, seed=3)
    out = tmp_path / "out"
    m = finetune(url, str(folder), str(out), cfg, progress=False, log=lambda r: None)
    assert json.loads((out / "metrics.json").read_text())["test"] == m["test"]
    assert set(m["test"]) >= {"micro_f1", "macro_f1"}
    if method == "lora":
        assert (out / "adapter" / "adapter_config.json").exists()
    # reload and predict: same metrics on test as at the end of training
    meta, lower, model, tok = load_trained(out)
    reader = open_cache(url)
    task = load_task(folder)
    data = join_cache(task, "test", tok, reader.spec.tokenizer, label_map(task), reader=None if method == "full" else reader)
    preds = predict(model, data, "text" if method == "full" else "cache", label_map(task))
    from er_core.evaluate import score

    assert score("classification", data.items, preds) == m["test"]
    # the same seed on the same cache repeats the run
    again = finetune(url, str(folder), str(tmp_path / "again"), cfg, progress=False, log=lambda r: None)
    assert again["test"] == m["test"]
    assert [e["train_loss"] for e in again["history"]] == [e["train_loss"] for e in m["history"]]


def test_a_run_that_learns_nothing_says_so_in_its_metrics_and_summary(tiny_cache, tmp_path, capsys):
    from pipelines.train import print_metrics

    url, folder, _ = tiny_cache
    runs = {lr: finetune(url, str(folder), str(tmp_path / f"o-{lr:g}"), TrainConfig(epochs=2, lr=lr, batch_size=8),
                         progress=False, log=lambda r: None) for lr in (1e-3, 1e3)}
    assert "warning" not in runs[1e-3] and runs[1e-3]["dev"]["micro_f1"] > runs[1e-3]["dev_majority_baseline"]["micro_f1"]
    bad = runs[1e3]  # far too high a rate: a constant predictor
    assert "learned nothing" in bad["warning"]
    assert json.loads((tmp_path / "o-1000" / "metrics.json").read_text())["warning"] == bad["warning"]
    print_metrics(bad)
    assert f"warning: {bad['warning']}" in capsys.readouterr().err


@pytest.mark.parametrize("hidden", [32, 768])
def test_the_default_lr_follows_the_width_of_the_caches_encoder_and_a_given_lr_is_kept(tmp_path, hidden):
    # reduced's MiniLM rate diverged on the 768-wide MPNet: a wide encoder trains at WIDE_LR unless told otherwise
    from er_core.train_config import DEFAULT_LR, WIDE_LR
    from tests.conftest import save_tiny, write_tiny_task

    model = save_tiny("bert", tmp_path / "m", hidden_size=hidden, intermediate_size=64, num_hidden_layers=2)
    folder = write_tiny_task(tmp_path / "t", sizes=(("train", 16), ("dev", 8), ("test", 8)))
    url = str(tmp_path / "c")
    ingest_local((example_input(e) for exs in load_task(folder).splits.values() for e in exs), url,
                 Recycler.load(str(model), layer=1, codec="fp32"), progress=False)
    for method in ("reduced", "full"):  # full stalled at the majority label on MPNet sci-cite at its MiniLM rate
        want = WIDE_LR[method] if hidden == 768 else DEFAULT_LR[method]
        assert want != DEFAULT_LR[method] or hidden < 768
        for cfg, lr in ((TrainConfig(method=method, epochs=1), want), (TrainConfig(method=method, epochs=1, lr=5e-4), 5e-4)):
            out = tmp_path / f"o-{method}-{lr:g}"
            finetune(url, str(folder), str(out), cfg, progress=False, log=lambda r: None)
            assert json.loads((out / "er_model.json").read_text())["train_config"]["lr"] == lr
    # lora's head on a wide encoder trains at its own rate (at lr it stalled MPNet NER at all-O)
    out = tmp_path / "o-lora"
    finetune(url, str(folder), str(out), TrainConfig(method="lora", epochs=1, min_steps=0), progress=False, log=lambda r: None)
    want = 1e-2 if hidden == 768 else None  # None: the head at lr
    assert json.loads((out / "er_model.json").read_text())["train_config"]["head_lr"] == want


def test_lora_trains_only_adapters_and_head(tiny_bert):
    from er_core.train import build_model

    rec = Recycler.load(tiny_bert, layer=2)
    model = build_model(rec.encoder, 2, "classification", 2, TrainConfig(method="lora"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "head" in n for n in trainable)


def test_artifact_refuses_other_cache(tiny_cache, tmp_path):
    url, folder, rec = tiny_cache
    out = tmp_path / "out"
    finetune(url, str(folder), str(out), TrainConfig(epochs=1, batch_size=16), progress=False, log=lambda r: None)
    from dataclasses import replace

    from er_core.artifacts import read_meta

    meta = read_meta(out)
    check_cache(meta, open_cache(url).spec, out)  # its own cache is fine
    with pytest.raises(ArtifactMismatchError, match="trained on another cache"):
        check_cache(meta, replace(open_cache(url).spec, layer=1), out)


def test_missing_examples_are_reported(tiny_bert, tiny_cache, tmp_path):
    url, folder, rec = tiny_cache
    import shutil

    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    with open(grown / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "a brand new sentence", "label": "inhibitor"}) + "\n")
    from er_core import ErError

    with pytest.raises(ErError, match="1 train examples are not in the cache"):
        finetune(url, str(grown), str(tmp_path / "o"), TrainConfig(epochs=1), progress=False)


def test_missing_examples_can_be_ingested_on_the_fly(tiny_cache, tmp_path):
    import shutil

    url, folder, rec = tiny_cache
    cache = tmp_path / "cache"
    shutil.copytree(url, cache)  # the shared cache stays as it was
    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    with open(grown / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "a brand new sentence", "label": "inhibitor"}) + "\n")
    before = open_cache(str(cache)).manifest.totals["rows"]
    m = finetune(str(cache), str(grown), str(tmp_path / "o"), TrainConfig(epochs=1), progress=False, log=lambda r: None,
                 ingest_missing=True)
    assert open_cache(str(cache)).manifest.totals["rows"] == before + 1
    assert "test" in m


def _long_qa_task(folder, seed=0):
    """SQuAD-format QA over 100-word contexts (the tiny tokenizer's max length is 48): the answer, the one
    protein/gene/cancer word, lies anywhere in train and past the first window in dev and test."""
    import random

    from tests.conftest import WORDS

    rnd = random.Random(seed)
    folder.mkdir()
    for split, n in (("train", 128), ("dev", 16), ("test", 16)):
        paras = []
        for i in range(n):
            answer, words = rnd.choice(["protein", "gene", "cancer"]), [rnd.choice(WORDS[:20]) for _ in range(100)]
            at = rnd.randrange(0, 98) if split == "train" else rnd.randrange(50, 98)
            start = len(" ".join(words[:at])) + (1 if at else 0)
            words.insert(at, answer)
            paras.append({"context": " ".join(words), "qas": [{"id": f"{split}{i}", "question": "what is it",
                                                               "answers": [{"text": answer, "answer_start": start}]}]})
        (folder / f"{split}.json").write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paras}]}))
    return folder


def test_qa_answers_beyond_the_first_window_of_a_long_context_are_found(tiny_bert, tmp_path):
    """Long contexts are read in overlapping windows (one cache row each), windows without the answer learn [CLS],
    and the best window's span is scored against the full context."""
    from er_core.predict import MultiTaskPredictor
    from er_core.task_data import encode_split

    folder = _long_qa_task(tmp_path / "qa")
    rec = Recycler.load(tiny_bert, layer=1, codec="fp16")
    task = load_task(folder)
    url = str(tmp_path / "cache")
    ingest_local((example_input(e) for exs in task.splits.values() for e in exs), url, rec, progress=False)
    items = encode_split(task, "test", rec.tokenizer, rec.spec.tokenizer, None)
    first = {it.example.id: it for it in items if it.window == 0}
    for ex in task.splits["test"]:  # cut at the max length instead, no answer here could be found
        assert ex.answers[0][1] >= max(o[1] for o in first[ex.id].offsets if o is not None)
    assert len(items) >= 3 * len(task.splits["test"])
    assert open_cache(url).manifest.totals["rows"] == sum(len(encode_split(task, s, rec.tokenizer, rec.spec.tokenizer, None))
                                                          for s in task.splits)  # a row per window
    m = finetune(url, str(folder), str(tmp_path / "o"), TrainConfig(epochs=8, lr=1e-3, batch_size=16), progress=False,
                 log=lambda r: None)
    assert m["test"]["exact_match"] >= 0.75, m["test"]  # 0.94 when written; 0 if windows were cut or not decoded
    # `er predict`'s path: cached first windows or misses, the other windows embedded; the same answers either way
    reader = open_cache(url)
    exs = task.splits["test"]
    rows = reader.load([rec.key(example_input(e)) for e in exs])
    pred = MultiTaskPredictor([str(tmp_path / "o")], reader.spec)
    hits = pred.predict(exs, [rows.hidden(rows.index[rec.key(example_input(e))]) for e in exs])
    assert hits == pred.predict(exs, [None] * len(exs))
    found = sum(next(iter(p.values())) == e.answers[0][0] for p, e in zip(hits, exs)) / len(exs)
    assert found == pytest.approx(m["test"]["exact_match"])


def test_task_without_dev_holds_out_part_of_train_and_says_so(tiny_cache, tmp_path, caplog):
    import shutil

    url, folder, _ = tiny_cache
    nodev = tmp_path / "nodev"
    nodev.mkdir()
    for split in ("train", "test"):
        shutil.copy(folder / f"{split}.jsonl", nodev / f"{split}.jsonl")
    with caplog.at_level("WARNING", logger="er.train"):
        m = finetune(url, str(nodev), str(tmp_path / "o"), TrainConfig(epochs=1), progress=False, log=lambda r: None)
    note = "held-out 26 of 256 train examples (10%, seed 0): the task has no dev split"
    assert m["dev_source"] == note and note in caplog.text
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["dev_source"] == note
    assert "dev" in m and "dev_micro_f1" in m["history"][0]  # early stopping watched the held-out slice


@pytest.mark.parametrize("peft_config", [{"peft_type": "LORA", "r": 4, "lora_alpha": 8},
                                         {"peft_type": "IA3"},
                                         {"peft_type": "LOHA", "r": 4, "alpha": 8}], ids=lambda d: d["peft_type"])
def test_any_peft_tuner_trains_saves_and_reloads_with_peft(tiny_cache, tmp_path, peft_config):
    import json

    from peft import PeftModel

    url, folder, rec = tiny_cache
    cfg = TrainConfig(method="lora", epochs=2, lr=3e-3, batch_size=8, seed=3, peft_config=peft_config)
    out = tmp_path / "out"
    m = finetune(url, str(folder), str(out), cfg, progress=False, log=lambda r: None)
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_config["peft_type"] and "head" in saved["modules_to_save"]
    if peft_config["peft_type"] == "IA3":  # targets from er's family table
        assert set(saved["target_modules"]) == {"key", "value", "output.dense"} and saved["feedforward_modules"] == ["output.dense"]
    meta, lower, model, tok = load_trained(out)  # PeftModel.from_pretrained, then merged where peft can
    assert isinstance(model, PeftModel) == (peft_config["peft_type"] != "LORA")
    reader = open_cache(url)
    task = load_task(folder)
    data = join_cache(task, "test", tok, reader.spec.tokenizer, label_map(task), reader=reader)
    from er_core.evaluate import score

    assert score("classification", data.items, predict(model, data, "cache", label_map(task))) == m["test"]


def test_peft_config_is_read_from_yaml_or_an_adapter_folder_and_checked(tmp_path):
    from er_core import ErError
    from er_core.train import read_peft_config

    (tmp_path / "ia3.yaml").write_text("peft_type: IA3\n")
    assert read_peft_config(str(tmp_path / "ia3.yaml")) == {"peft_type": "IA3"}
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "adapter_config.json").write_text('{"peft_type": "LOHA", "r": 2, "base_model_name_or_path": null}')
    assert read_peft_config(str(tmp_path / "saved"))["peft_type"] == "LOHA"
    with pytest.raises(ErError, match="peft_type"):
        TrainConfig(method="lora", peft_config={"peft_type": "NOPE"})
    with pytest.raises(ErError, match="use method lora"):
        TrainConfig(method="reduced", peft_config={"peft_type": "IA3"})
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ErError, match="expected a mapping with peft_type"):
        read_peft_config(str(tmp_path / "bad.yaml"))


EXPORT_USER = """
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

d, texts = sys.argv[1], json.loads(sys.argv[2])
model, tok = AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
w, head = load_file(f"{d}/head.safetensors"), json.load(open(f"{d}/er_head.json"))
out = []
with torch.no_grad():
    for t in texts:
        h = model(**tok(t, return_tensors="pt")).last_hidden_state
        logits = torch.relu(h[:, 0] @ w["dense.weight"].T + w["dense.bias"]) @ w["out.weight"].T + w["out.bias"]
        out.append(head["labels"][int(logits.argmax())])
assert not any(m.startswith(("er_core", "pipelines")) for m in sys.modules), "the export needs er"
print(json.dumps(out))
"""


@pytest.mark.parametrize("method", ["reduced", "lora"])
def test_an_export_loads_without_er_and_predicts_what_er_predicts(tiny_cache, tmp_path, method):
    import subprocess
    import sys

    from er_core.predict import MultiTaskPredictor
    from pipelines.cli import main as er

    url, folder, rec = tiny_cache
    out = tmp_path / "run"
    finetune(url, str(folder), str(out), TrainConfig(method=method, epochs=2, lr=1e-3, batch_size=8, seed=3),
             progress=False, log=lambda r: None)
    assert er(["export", str(out), "--to", str(tmp_path / "hf")]) == 0
    exs = load_task(folder).splits["test"]
    reader = open_cache(url)
    rows = reader.load([rec.key(example_input(e)) for e in exs])
    pred = MultiTaskPredictor([str(out)], reader.spec)
    want = [next(iter(p.values())) for p in pred.predict(exs, [rows.hidden(rows.index[rec.key(example_input(e))]) for e in exs])]
    got = subprocess.run([sys.executable, "-c", EXPORT_USER, str(tmp_path / "hf"), json.dumps([e.text for e in exs])],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert json.loads(got.stdout.strip().splitlines()[-1]) == want
    assert er(["export", str(out), "--to", str(tmp_path / "hf")]) != 0  # never over an existing export
