"""Task readers: the real task folders, then one small bad file per error path."""

import json
from pathlib import Path

import pytest

from er_core.errors import DataFormatError, ErError, LabelError
from er_core.tasks import (
    Example,
    LabelMap,
    example_input,
    load_task,
    read_conll,
    read_jsonl_classification,
    read_squad,
    task_inputs,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"

# (folder, kind, train/dev/test sizes, labels or None to only count them, label count)
REAL_TASKS = [
    ("chemprot", "classification", (4169, 2427, 3469), None, 13),
    ("sci-cite", "classification", (7320, 916, 1861), ["background", "method", "result"], 3),
    ("ncbi-disease", "ner", (5424, 923, 940), ["O", "B-Disease", "I-Disease"], 3),
]


@pytest.mark.real
@pytest.mark.skipif(not DATA.is_dir(), reason=f"task data not found at {DATA} (expected ../shared/data/tasks)")
@pytest.mark.parametrize("folder,kind,sizes,labels,n_labels", REAL_TASKS)
def test_real_tasks_load(folder, kind, sizes, labels, n_labels):
    task = load_task(DATA / folder)
    assert task.name == folder and task.kind == kind
    assert tuple(len(task.splits[s]) for s in ("train", "dev", "test")) == sizes
    assert len(task.labels) == n_labels
    if labels is not None:
        assert task.labels == labels
    ex = task.splits["dev"][0]
    assert ex.id == "dev:0"
    if kind == "ner":
        assert len(ex.words) == len(ex.tags) > 0
        assert set(example_input(ex)) == {"words"}
    else:
        assert ex.text.strip() and ex.label in task.labels
        assert set(example_input(ex)) == {"text"}
    assert sum(1 for _ in task_inputs(task)) == sum(sizes)


@pytest.mark.real
@pytest.mark.skipif(not DATA.is_dir(), reason=f"task data not found at {DATA}")
def test_limit_slices_but_keeps_full_label_set():
    task = load_task(DATA / "chemprot", limit={"train": 5, "validation": 3})
    assert [len(task.splits[s]) for s in ("train", "dev", "test")] == [5, 3, 3469]
    assert len(task.labels) == 13  # from the full train file, so ids match the unsliced task
    assert all(len(v) == 2 for v in load_task(DATA / "ncbi-disease", limit=2).splits.values())


# ---------------------------------------------------------------- classification JSONL


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jl(**row) -> str:
    return json.dumps(row) + "\n"


def test_jsonl_reads_and_skips_blank_lines(tmp_path):
    p = _write(tmp_path / "train.jsonl", _jl(text="a b", label="X") + "\n  \n" + _jl(text="c", label=3))
    exs = read_jsonl_classification(p)
    assert exs == [Example(id="train:0", text="a b", label="X"), Example(id="train:1", text="c", label="3")]


@pytest.mark.parametrize(
    "bad_line,match",
    [
        ('{"text": "broken", "label": \n', "not valid JSON"),
        (_jl(label="X"), "missing field 'text'"),
        (_jl(text="   ", label="X"), "'text' is empty"),
        (_jl(text=["a"], label="X"), "must be a string"),
    ],
    ids=["malformed", "missing-text", "empty-text", "non-string-text"],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, match):
    # Line 3 is bad: a good line, a blank line (still counted), then the bad one.
    p = _write(tmp_path / "dev.jsonl", _jl(text="ok", label="X") + "\n" + bad_line)
    with pytest.raises(DataFormatError, match=match) as err:
        read_jsonl_classification(p)
    assert "dev.jsonl:3:" in str(err.value)


def test_jsonl_custom_field_names(tmp_path):
    p = _write(tmp_path / "train.jsonl", _jl(sentence="hi", intent="greet"))
    assert read_jsonl_classification(p, text_field="sentence", label_field="intent")[0].label == "greet"


def test_unknown_dev_label_raises_label_error(tmp_path):
    _write(tmp_path / "train.jsonl", _jl(text="a", label="X") + _jl(text="b", label="Y"))
    _write(tmp_path / "validation.jsonl", _jl(text="c", label="X") + _jl(text="d", label="NEWLABEL"))
    with pytest.raises(LabelError, match=r"'NEWLABEL' in dev .*not seen in training; known labels: \['X', 'Y'\]"):
        load_task(tmp_path)


def test_folder_without_train_says_what_was_expected(tmp_path):
    _write(tmp_path / "dev.jsonl", _jl(text="a", label="X"))
    with pytest.raises(ErError, match=r"no train file.*train\.jsonl.*train\.conll.*train\.json"):
        load_task(tmp_path)


def test_validation_alias_and_bad_limit(tmp_path):
    _write(tmp_path / "train.jsonl", _jl(text="a", label="X"))
    _write(tmp_path / "validation.jsonl", _jl(text="b", label="X"))
    task = load_task(tmp_path)
    assert set(task.splits) == {"train", "dev"} and task.splits["dev"][0].id == "dev:0"
    with pytest.raises(ErError, match="unknown split 'tain'"):
        load_task(tmp_path, limit={"tain": 1})


# ---------------------------------------------------------------- CoNLL


CONLL = "-DOCSTART- -X- O O\n\nAPC\tNN\tO\tB-Disease\ntumour\tNN\tO\tI-Disease\n.\t.\tO\tO\n\nOk O\n"


def test_conll_reads_sentences_and_skips_docstart(tmp_path):
    exs = read_conll(_write(tmp_path / "train.conll", CONLL))
    assert [e.words for e in exs] == [("APC", "tumour", "."), ("Ok",)]
    assert exs[0].tags == ("B-Disease", "I-Disease", "O") and exs[1].id == "train:1"


@pytest.mark.parametrize(
    "bad_line,match",
    [("lonely\n", "at least 2 columns"), ("word\tNN\tO\tDisease\n", "'Disease' is not BIO")],
    ids=["one-column", "bad-tag"],
)
def test_conll_errors_name_file_and_line(tmp_path, bad_line, match):
    p = _write(tmp_path / "test.conll", "a\tO\n\nb\tB-X\n" + bad_line)  # bad line is line 4
    with pytest.raises(DataFormatError, match=match) as err:
        read_conll(p)
    assert "test.conll:4:" in str(err.value)


def test_ner_labels_cover_b_and_i_and_unknown_tag_type(tmp_path):
    _write(tmp_path / "train.conll", "a\tB-X\nb\tO\n")
    _write(tmp_path / "dev.conll", "a\tB-X\nb\tI-X\n")
    assert load_task(tmp_path).labels == ["O", "B-X", "I-X"]  # I-X unseen in train, still known
    _write(tmp_path / "dev.conll", "a\tB-Y\n")
    with pytest.raises(LabelError, match="'B-Y'"):
        load_task(tmp_path)


# ---------------------------------------------------------------- SQuAD


SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "t",
            "paragraphs": [
                {
                    "context": "Ray was created at Berkeley in 2016.",
                    "qas": [
                        {"id": "q1", "question": "Where?", "answers": [{"text": "Berkeley", "answer_start": 19}]},
                        {"id": "q2", "question": "When?", "answers": [{"text": "2016", "answer_start": 31}]},
                    ],
                }
            ],
        }
    ],
}


def test_squad_round_trip(tmp_path):
    _write(tmp_path / "train.json", json.dumps(SQUAD))
    _write(tmp_path / "dev.json", json.dumps(SQUAD))
    task = load_task(tmp_path)
    assert task.kind == "qa" and task.labels == []
    q1 = task.splits["dev"][0]
    assert q1.id == "q1" and q1.answers == (("Berkeley", 19),)
    text, start = q1.answers[0]
    assert q1.text_pair[start : start + len(text)] == text
    assert example_input(q1) == {"text": "Where?", "text_pair": SQUAD["data"][0]["paragraphs"][0]["context"], "stride": 128}


def test_squad_malformed_names_item(tmp_path):
    bad = json.loads(json.dumps(SQUAD))
    del bad["data"][0]["paragraphs"][0]["qas"][1]["question"]
    p = _write(tmp_path / "train.json", json.dumps(bad))
    with pytest.raises(DataFormatError, match=r"train\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\]: missing 'question'"):
        read_squad(p)


# ---------------------------------------------------------------- LabelMap


def test_label_map():
    lm = LabelMap(["O", "B-X", "I-X"])
    assert [lm.encode(t) for t in ("O", "I-X")] == [0, 2] and lm.decode(1) == "B-X" and len(lm) == 3
    with pytest.raises(LabelError, match="'B-Z' in test was not seen"):
        lm.encode("B-Z", where="test")
    assert LabelMap(["O", "B-X"], unknown="O").encode("B-Z") == 0
    with pytest.raises(LabelError, match="out of range"):
        lm.decode(3)


def test_span_decoding_equals_brute_force_on_random_logits():
    import numpy as np

    from er_core.evaluate import best_span

    def brute(start, end, ok, max_len):
        best = (-np.inf, -1, -1)
        for s in range(len(ok)):
            for e in range(s, min(len(ok), s + max_len)):
                if ok[s] and ok[e] and start[s] + end[e] > best[0]:
                    best = (float(start[s] + end[e]), s, e)
        return best

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 120))
        start, end = rng.standard_normal(n), rng.standard_normal(n)
        ok = rng.random(n) < rng.uniform(0.05, 1)
        max_len = int(rng.integers(1, 40))
        assert best_span(start, end, ok, max_len) == brute(start, end, ok, max_len), trial
    assert best_span(np.zeros(3), np.zeros(3), np.zeros(3, bool)) == (-np.inf, -1, -1)
