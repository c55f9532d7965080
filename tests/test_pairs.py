"""Text pairs are cached exactly: segment ids reach the embeddings at ingest, in the full model, and for cache misses.

The reference is always the model's own forward on the tokenizer's own encoding of the pair
(`tokenizer(text, pair, truncation=...)`), layer k of `output_hidden_states`.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from er_core import Recycler, ingest_local, open_cache
from er_core.heads import FullModel, RecycledModel, SequenceClassificationHead
from er_core.split import split_encoder
from er_core.tasks import Example, example_input
from tests.conftest import save_tiny
from tests.tiny_models import TINY_CONFIGS

K = 2
LONG = " ".join(["protein binds the receptor and the gene"] * 12)  # past the tiny tokenizer's 48 tokens
INPUTS = {
    "single": {"text": "the protein binds"},
    "qa pair": example_input(Example("q", text="what binds the receptor", text_pair=LONG, answers=())),
    "nli pair": example_input(Example("c", text="the protein binds the gene", text_pair="the gene is reduced", label="x")),
    "long nli pair": example_input(Example("c", text=LONG, text_pair=LONG + " gene", label="x")),
}


def _reference(model, tokenizer, inp: dict, k: int, max_length: int) -> tuple[np.ndarray, dict]:
    pair = (inp["text"], inp["text_pair"]) if "text_pair" in inp else (inp["text"],)
    enc = tokenizer(*pair, truncation=inp.get("truncation", "only_second") if len(pair) == 2 else True,
                    max_length=max_length, return_tensors="pt")
    accepted = inspect.signature(model.forward).parameters
    enc = {n: v for n, v in enc.items() if n in accepted}
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return out.hidden_states[k][0].numpy(), enc


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def family(request, tmp_path_factory):
    folder = save_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))
    return request.param, Recycler.load(str(folder), layer=K, codec="fp32")


def test_pairs_and_qa_are_cached_as_the_model_computes_them(family, tmp_path):
    name, rec = family
    url = str(tmp_path / "c")
    ingest_local(list(INPUTS.values()), url, rec, progress=False)
    got = open_cache(url).load([rec.key(i) for i in INPUTS.values()])
    types_used = False
    for what, inp in INPUTS.items():
        want, enc = _reference(rec.encoder, rec.tokenizer, inp, K, rec.spec.tokenizer.max_length)
        i = got.index[rec.key(inp)]
        assert np.array_equal(np.asarray(got.input_ids[i]), enc["input_ids"][0].numpy()), (name, what)
        np.testing.assert_allclose(got.hidden(i), want, atol=1e-5, rtol=0, err_msg=f"{name}: {what}")
        types_used |= "token_type_ids" in enc and bool(enc["token_type_ids"].any())
    takes_types = "token_type_ids" in inspect.signature(rec.encoder.forward).parameters
    if takes_types and (getattr(rec.encoder.config, "type_vocab_size", 0) or 0) > 1:
        assert types_used, f"{name}: no pair here had a segment 1, so the test shows nothing"


def test_every_window_of_a_long_qa_context_is_cached_as_the_model_computes_it(family, tmp_path):
    """A context past the max length is cached as the tokenizer's overflowing windows (stride 8), each row equal to
    the model's own layer k on that window, keyed (example, window) with window 0 under the input's own key."""
    from er_core.keys import window_key

    name, rec = family
    inp = example_input(Example("q", text="what binds the receptor", text_pair=LONG, answers=(), stride=8))
    url, L = str(tmp_path / "c"), rec.spec.tokenizer.max_length
    ingest_local([inp], url, rec, progress=False)
    enc = rec.tokenizer(inp["text"], inp["text_pair"], truncation="only_second", max_length=L, stride=8,
                        return_overflowing_tokens=True)
    n = len(enc["input_ids"])
    assert n >= 3 and open_cache(url).manifest.totals["rows"] == n
    keys = [window_key(inp, rec.spec.tokenizer, w) for w in range(n)]
    assert keys[0] == rec.key(inp) and len(set(keys)) == n
    got = open_cache(url).load(keys)
    accepted = inspect.signature(rec.encoder.forward).parameters
    for w in range(n):
        one = {k: torch.tensor([enc[k][w]]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in accepted}
        with torch.no_grad():
            want = rec.encoder(**one, output_hidden_states=True).hidden_states[K][0].numpy()
        i = got.index[keys[w]]
        assert np.array_equal(np.asarray(got.input_ids[i]), enc["input_ids"][w]), (name, w)
        np.testing.assert_allclose(got.hidden(i), want, atol=1e-5, rtol=0, err_msg=f"{name}: window {w}")


def test_a_pairs_logits_match_between_the_full_model_and_the_recycled_upper(family):
    name, rec = family
    torch.manual_seed(0)
    head = SequenceClassificationHead(rec.encoder.config.hidden_size, 3).eval()
    upper = split_encoder(rec.encoder, K)[1]
    full, recycled = FullModel(rec.encoder, head).eval(), RecycledModel(upper, head).eval()
    toks = rec.tokenize([INPUTS["nli pair"]])
    states = rec.embedder()([t.input_ids for t in toks], [t.type_ids for t in toks])
    ids = torch.from_numpy(toks[0].input_ids.astype(np.int64))[None]
    mask = torch.ones_like(ids)
    types = None if toks[0].type_ids is None else torch.from_numpy(toks[0].type_ids.astype(np.int64))[None]
    if "token_type_ids" not in inspect.signature(rec.encoder.forward).parameters:
        types = None
    with torch.no_grad():
        a = full(ids, mask, types)
        b = recycled(torch.from_numpy(states[0])[None], mask)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=0, err_msg=name)


def test_segment_ids_change_the_states_of_bert_like_families(tmp_path):
    """Control: with the segments dropped (all zeros), a BERT pair's states differ, so the tests above can fail."""
    rec = Recycler.load(str(save_tiny("bert", tmp_path / "m")), layer=K, codec="fp32")
    toks = rec.tokenize([INPUTS["nli pair"]])
    assert toks[0].type_ids is not None and toks[0].type_ids.any()
    right = rec.embedder()([toks[0].input_ids], [toks[0].type_ids])[0]
    dropped = rec.embedder()([toks[0].input_ids])[0]
    assert np.abs(right - dropped).max() > 1e-2


def test_pair_truncation_is_part_of_the_key(tmp_path):
    rec = Recycler.load(str(save_tiny("bert", tmp_path / "m")), layer=K, codec="fp32")
    qa = {"text": "a b", "text_pair": "c d"}
    nli = example_input(Example("x", text="a b", text_pair="c d", label="y"))
    assert nli["truncation"] == "longest_first" and "truncation" not in qa
    assert rec.key(qa) != rec.key(nli)
    q_ids, n_ids = (t.input_ids for t in rec.tokenize([INPUTS["qa pair"], INPUTS["long nli pair"]]))
    assert len(q_ids) == len(n_ids) == rec.spec.tokenizer.max_length


@pytest.mark.real
def test_real_minilm_caches_a_text_pair_as_the_model_computes_it(tmp_path):
    """Before segment ids reached the embeddings, layer-3 states of a pair differed by up to 0.29 from the model's own."""
    rec = Recycler.load("bundled", layer=3, codec="fp16")
    inputs = [example_input(Example("c", text="Aspirin inhibits COX-1.", text_pair="COX-1 is not inhibited by aspirin.", label="x")),
              example_input(Example("q", text="What does aspirin inhibit?", text_pair="Aspirin irreversibly inhibits COX-1 and COX-2.",
                                    answers=(("COX-1", 34),)))]
    url = str(tmp_path / "c")
    ingest_local(inputs, url, rec, progress=False)
    got = open_cache(url).load([rec.key(i) for i in inputs])
    for inp in inputs:
        want, enc = _reference(rec.encoder, rec.tokenizer, inp, 3, rec.spec.tokenizer.max_length)
        assert enc["token_type_ids"].any()
        h = got.hidden(got.index[rec.key(inp)])
        assert np.abs(h - want).max() <= 1e-5 + np.abs(want).max() * 2.0 ** -10  # fp16: 10 mantissa bits


def _pair_task(folder, n=(("train", 96), ("dev", 16), ("test", 16))):
    """A pair task whose label is readable only in the second text, so it needs the pair to be learnt."""
    import json
    import random

    rnd = random.Random(0)
    folder.mkdir(parents=True)
    words = "the protein gene binds cell drug patients".split()
    for split, count in n:
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(count):
                label = ("inhibitor", "activates")[i % 2]
                first = " ".join(rnd.choice(words) for _ in range(5))
                second = " ".join(rnd.choice(words) for _ in range(3)) + f" {label}"
                f.write(json.dumps({"text": first, "text_pair": second, "label": label}) + "\n")
    return folder


@pytest.mark.parametrize("method", ["reduced", "full"])
def test_a_sentence_pair_task_trains_and_predicts_hits_and_misses_alike(tmp_path, method):
    from er_core import TrainConfig, finetune, load_task
    from er_core.predict import MultiTaskPredictor

    folder = _pair_task(tmp_path / "pairs")
    rec = Recycler.load(str(save_tiny("bert", tmp_path / "m")), layer=K, codec="fp32")
    task = load_task(folder)
    assert task.splits["train"][0].text_pair and example_input(task.splits["train"][0])["truncation"] == "longest_first"
    url = str(tmp_path / "c")
    ingest_local([example_input(e) for exs in task.splits.values() for e in exs], url, rec, progress=False)
    m = finetune(url, str(folder), str(tmp_path / "out"), TrainConfig(method=method, epochs=6, lr=2e-3, batch_size=8, seed=1),
                 progress=False, log=lambda r: None)
    assert m["test"]["micro_f1"] >= 0.75  # the label is in the second text only
    if method == "full":
        return
    reader = open_cache(url)
    pred = MultiTaskPredictor([str(tmp_path / "out")], reader.spec)
    exs = task.splits["test"]
    rows = reader.load([rec.key(example_input(e)) for e in exs])
    hits = pred.predict(exs, [rows.hidden(rows.index[rec.key(example_input(e))]) for e in exs])
    misses = pred.predict(exs, [None] * len(exs))  # through the lower part, with the pair's segments
    assert hits == misses


@pytest.mark.parametrize("stride", [None, 8])
def test_a_question_that_leaves_no_room_for_its_context_is_refused_in_one_line(tmp_path, stride):
    from er_core import ErError

    rec = Recycler.load(str(save_tiny("bert", tmp_path / "m")), layer=K, codec="fp32")
    inp = example_input(Example("q", text=LONG, text_pair="the gene", answers=(), stride=stride))
    with pytest.raises(ErError, match=r"leaves no room for (its context|the second) at max length 48; raise --max-length"):
        ingest_local([inp], str(tmp_path / "c"), rec, progress=False)
    assert not (tmp_path / "c" / "_log").exists()
