"""`er serve`: a classification, an NER and a QA model served together over one cache, on the shared local Ray.

Cached documents must get exactly what `er predict` gives, misses too; misses go to the miss log, and an ingest of
that log turns them into hits; bad requests get a 4xx one-liner; a wrong model is refused; a killed replica is
replaced."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from er_core import TrainConfig, finetune, ingest_local, load_task
from er_core.recycle import Recycler
from er_core.tasks import example_input
from pipelines.cli import main as er
from pipelines.serve import BadRequest, parse_documents

from .conftest import WORDS, write_tiny_task
from .ports import free_port

TOKEN = "a-test-token-of-24-chars"
FILLERS = [w for w in WORDS if w not in ("cancer", "protein", "gene")]


def _ner_task(folder: Path, seed=0) -> Path:
    rnd = random.Random(seed)
    folder.mkdir(parents=True)
    for split, n in (("train", 96), ("dev", 24), ("test", 24)):
        lines = []
        for _ in range(n):
            words = [rnd.choice(FILLERS) for _ in range(rnd.randint(4, 9))]
            at = rnd.randrange(len(words))
            words[at:at] = ["cancer", "cells"] if rnd.random() < 0.5 else ["cancer"]
            tags = ["O"] * len(words)
            tags[at] = "B-Disease"
            if at + 1 < len(words) and words[at + 1] == "cells":
                tags[at + 1] = "I-Disease"
            lines += [f"{w}\tNN\tO\t{t}" for w, t in zip(words, tags)] + [""]
        (folder / f"{split}.conll").write_text("\n".join(lines) + "\n")
    return folder


def _qa_task(folder: Path, seed=0) -> Path:
    rnd = random.Random(seed)
    folder.mkdir(parents=True)
    for split, n in (("train", 96), ("dev", 24), ("test", 24)):
        paras = []
        for i in range(n):
            answer, words = rnd.choice(["protein", "gene", "cancer"]), [rnd.choice(FILLERS) for _ in range(12)]
            at = rnd.randrange(0, 12)
            start = len(" ".join(words[:at])) + (1 if at else 0)
            words.insert(at, answer)
            paras.append({"context": " ".join(words), "qas": [{"id": f"{split}{i}", "question": "what is it",
                                                               "answers": [{"text": answer, "answer_start": start}]}]})
        (folder / f"{split}.json").write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paras}]}))
    return folder


def _post(url: str, body, token: str | None = TOKEN, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def served(ray_session, tiny_bert, tmp_path_factory):
    """Three models over one tiny cache (k=2), served with a token; the documents a test may ask about."""
    from ray import serve

    from pipelines.configs import ServeConfig
    from pipelines.serve import start

    base = tmp_path_factory.mktemp("serve")
    tasks = {"cls": write_tiny_task(base / "cls"), "ner": _ner_task(base / "ner"), "qa": _qa_task(base / "qa")}
    cache = str(base / "cache")
    rec = Recycler.load(tiny_bert, layer=2, codec="fp16")
    loaded = {k: load_task(d) for k, d in tasks.items()}
    ingest_local([example_input(e) for t in loaded.values() for exs in t.splits.values() for e in exs], cache, rec,
                 progress=False)
    models = {}
    for kind, folder in tasks.items():
        models[kind] = str(base / f"model-{kind}")
        finetune(cache, str(folder), models[kind], TrainConfig(epochs=2, lr=1e-3, batch_size=16), progress=False,
                 log=lambda r: None)
    port = free_port()
    import hashlib

    cfg = ServeConfig(cache=cache, model_dir=list(models.values()), port=port, route_prefix="/er", refresh_s=0.5,
                      flush_s=0.2, token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest(), max_documents=40,
                      max_batch_size=8)  # a request of 20 documents goes to Upper in 5 calls, answered in order
    handle = start(cfg)
    yield {"cfg": cfg, "handle": handle, "url": f"http://127.0.0.1:{port}/er", "cache": cache, "models": models,
           "tasks": loaded, "base": base, "rec": rec}
    serve.shutdown()


def _documents(t) -> list[dict]:
    """Hits from each task's test split, and one miss of each form."""
    cls = [{"text": e.text} for e in t["cls"].splits["test"][:6]] + [{"text": "cancer gene activates the new receptor"}]
    ner = [{"words": list(e.words)} for e in t["ner"].splits["test"][:6]] + [{"words": ["new", "cancer", "cells", "here"]}]
    qa = [{"question": e.text, "context": e.text_pair} for e in t["qa"].splits["test"][:4]] + [
        {"question": "what is it", "context": "a brand new protein in human cells"}]
    return cls + ner + qa


def _er_predict(served, kind: str, rows: list[dict], tmp: Path) -> list[dict]:
    corpus = tmp / f"{kind}.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / f"{kind}-preds.jsonl"
    assert er(["predict", "--cache", served["cache"], "--model-dir", served["models"][kind], "--corpus", str(corpus),
               "--out", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_http_and_handle_answer_every_model_as_er_predict_does(served, tmp_path):
    docs = _documents(served["tasks"])
    status, got = _post(served["url"] + "/predict", {"documents": docs})
    assert status == 200, got
    answers = got["documents"]
    assert [a["cached"] for a in answers] == [True] * 6 + [False] + [True] * 6 + [False] + [True] * 4 + [False]
    names = {kind: json.loads((Path(d) / "er_model.json").read_text())["task"]["name"] for kind, d in served["models"].items()}
    # er predict, one model at a time, on the same documents (a corpus row per document, in er's input forms)
    cls_rows = [{"text": d["text"]} for d in docs if "text" in d] + [{"text": d["words"]} for d in docs if "words" in d]
    ner_rows = [{"text": d["words"]} for d in docs if "words" in d]
    qa_rows = [{"text": {"text": d["question"], "text_pair": d["context"], "stride": 128}} for d in docs if "question" in d]
    want_cls = [r[names["cls"]] for r in _er_predict(served, "cls", cls_rows, tmp_path)]
    want_ner = [r[names["ner"]] for r in _er_predict(served, "ner", ner_rows, tmp_path)]
    want_qa = [r[names["qa"]] for r in _er_predict(served, "qa", qa_rows, tmp_path)]
    text_docs = [a for d, a in zip(docs, answers) if "text" in d]
    word_docs = [a for d, a in zip(docs, answers) if "words" in d]
    qa_docs = [a for d, a in zip(docs, answers) if "question" in d]
    assert [a["predictions"][names["cls"]]["label"] for a in text_docs + word_docs] == want_cls
    assert [a["predictions"][names["ner"]]["tags"] for a in word_docs] == want_ner
    assert [a["predictions"][names["qa"]]["answer"] for a in qa_docs] == want_qa
    assert all(set(a["predictions"]) == {names["cls"]} for a in text_docs)  # NER and QA take other forms
    assert all(set(a["predictions"]) == {names["cls"], names["ner"]} for a in word_docs)
    assert all(0 < a["predictions"][names["cls"]]["score"] <= 1 for a in text_docs)
    tagged = [a for a in word_docs if any(t != "O" for t in a["predictions"][names["ner"]]["tags"])]
    assert all(a["predictions"][names["ner"]]["entities"] for a in tagged)
    # the same through a DeploymentHandle, without HTTP
    from ray import serve

    by_handle = serve.get_app_handle(served["cfg"].name).answer.remote(parse_documents({"documents": docs}, 40)).result()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "timing_ms"} for r in rows]  # noqa: E731
    assert strip(by_handle["documents"]) == strip(answers)


def test_misses_go_to_the_miss_log_and_a_later_ingest_turns_them_into_hits(served):
    from ray import serve

    new = [{"text": "receptor expression of human drug"}, {"words": ["cancer", "mutation", "in", "patients"]}]
    status, first = _post(served["url"] + "/predict", {"documents": new})
    assert status == 200 and [a["cached"] for a in first["documents"]] == [False, False]
    log = Path(served["cfg"].miss_log_url())
    misses, deadline = serve.get_deployment_handle("MissLog", served["cfg"].name), time.time() + 30
    while time.time() < deadline:  # the answer does not wait for the log: its record call may still be on its way
        misses.flush.remote().result()
        rows = [json.loads(line) for f in sorted(log.glob("*.jsonl")) for line in f.read_text().splitlines()]
        if len(rows) >= 2:
            break
        time.sleep(0.2)
    assert {"text": {"text": new[0]["text"]}} in rows and {"text": {"words": new[1]["words"]}} in rows
    assert er(["ingest", str(log), "--cache", served["cache"]]) == 0
    deadline = time.time() + 30
    while time.time() < deadline:  # the Lookup follows the new cache version within refresh_s
        status, again = _post(served["url"] + "/predict", {"documents": new})
        if all(a["cached"] for a in again["documents"]):
            break
        time.sleep(0.5)
    assert [a["cached"] for a in again["documents"]] == [True, True]
    assert [a["predictions"] for a in again["documents"]] == [a["predictions"] for a in first["documents"]]


def test_bad_requests_get_a_4xx_and_one_line(served):
    url = served["url"] + "/predict"
    cases = [
        (_post(url, None, raw=b"{not json"), 400, "not JSON"),
        (_post(url, {"docs": []}), 400, '{"documents": [...]}'),
        (_post(url, {"documents": [{"txt": "x"}]}), 400, "documents[0]: expected one of"),
        (_post(url, {"documents": [{"text": "x"}] * 41}), 413, "at most 40"),
        (_post(url, {"documents": [{"text": " ".join(["cancer"] * 200)}]}), 422, "the model takes at most"),
        (_post(url, {"documents": [{"question": " ".join(["cancer"] * 200), "context": "x"}]}), 422, "leaves no room"),
        (_post(url, {"documents": [{"text": "x"}]}, token=None), 401, "bearer token"),
        (_post(url, {"documents": [{"text": "x"}]}, token="wrong-token-of-24-chars!"), 401, "bearer token"),
    ]
    for (status, body), want_status, words in cases:
        assert status == want_status and words in body["error"] and "\n" not in body["error"], (status, body)
        assert "Traceback" not in body["error"]
    status, body = _post(url.replace("/predict", "/models"), None, token=None, raw=b"")
    assert status in (401, 405)


def test_a_model_of_another_cache_is_refused_at_start_in_one_line(served, tiny_bert, tmp_path, capsys):
    other = str(tmp_path / "other")
    ingest_local([{"text": "a gene"}], other, Recycler.load(tiny_bert, layer=1, codec="fp16"), progress=False)
    assert er(["serve", "--cache", other, "--model-dir", served["models"]["cls"], "--port", str(free_port())]) != 0
    # er's own lines only: the shared Ray forwards its replicas' logs to this process's stderr too
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("(", "\x1b", "INFO", "WARNING"))]
    assert len(err) == 1 and err[0].startswith("er serve: error:") and "trained on another cache" in err[0], err


def test_a_killed_upper_replica_is_replaced_and_service_resumes(served):
    import ray

    from .conftest_ray import actors_of

    def uppers():
        return [a["ActorID"] for a in actors_of(":Upper") if a["State"] == "ALIVE"]

    before = uppers()
    assert len(before) == 1
    name = next(a["Name"] for a in actors_of(":Upper") if a["ActorID"] == before[0])
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    docs = {"documents": [{"text": "the gene activates"}]}
    deadline, statuses = time.time() + 90, []
    while time.time() < deadline:
        status, body = _post(served["url"] + "/predict", docs)
        statuses.append(status)
        if status == 200 and uppers() and uppers() != before:
            break
        assert status in (200, 503), body  # in flight during the restart: a clear 5xx, never a traceback
        time.sleep(0.5)
    assert status == 200 and len(uppers()) == 1 and uppers() != before, statuses


def test_the_lookup_hands_rows_on_encoded_as_cached_and_keeps_at_most_lru_rows(served):
    from er_core.store import open_cache
    from pipelines.serve import Lookup

    reader = open_cache(served["cache"])
    keys = list(reader.keys())[:3]
    look = Lookup.func_or_class(served["cache"], None, 2, 60.0)  # the class behind the deployment, in this process
    codec, rows = look.get([*keys, "not-a-key"])
    assert codec == "fp16" and rows[-1] is None and len(look.rows) == 2
    for key, (n, hidden, scale) in zip(keys, rows):
        assert len(hidden) == n * reader.spec.hidden_size * 2  # fp16 as cached: half the bytes of float32 to Upper
        want = reader.load([key])
        assert np.array_equal(reader.decode(n, hidden, scale), want.hidden(want.index[key]))


def test_an_int8_cache_reaches_upper_as_a_quarter_of_the_bytes_and_decodes_as_the_cache_does(tiny_bert, tmp_path):
    from er_core.store import open_cache
    from pipelines.serve import Lookup, decode_rows

    cache = str(tmp_path / "cache8")
    ingest_local([{"text": t} for t in ("a gene", "the cancer protein binds", "cells")], cache,
                 Recycler.load(tiny_bert, layer=2, codec="int8"), progress=False)
    reader = open_cache(cache)
    keys = list(reader.keys())
    look = Lookup.func_or_class(cache, None, 8, 60.0)
    got = look.get([*keys, "not-a-key"])
    assert got[0] == "int8" and got[1][-1] is None
    for (n, hidden, scale) in got[1][:-1]:
        assert len(hidden) == n * reader.spec.hidden_size and len(scale) == 4 * n  # int8, one float32 scale a token
    want, decoded = reader.load(keys), decode_rows(got, reader.spec.hidden_size)
    assert len(decoded) == len(keys) + 1 and decoded[-1] is None
    for key, states in zip(keys, decoded):
        assert np.array_equal(states, want.hidden(want.index[key]))


def test_a_request_goes_to_upper_in_near_equal_calls_of_at_most_half_a_batch():
    from pipelines.serve import chunks

    assert [len(c) for c in chunks(list(range(20)), 8)] == [4, 4, 4, 4, 4]
    assert [len(c) for c in chunks(list(range(17)), 32)] == [8, 9]
    assert [len(c) for c in chunks(list(range(3)), 1)] == [1, 1, 1]
    assert sum(chunks(list(range(37)), 10), []) == list(range(37))  # every document once, in order


def test_documents_are_checked_before_any_model_runs():
    assert parse_documents({"documents": [{"text": "a", "ref": 3}]}, 4)[0] == {"form": "text", "input": {"text": "a"}, "ref": 3}
    assert parse_documents({"documents": [{"question": "q", "context": "c"}]}, 4)[0]["input"] == {
        "text": "q", "text_pair": "c", "stride": 128}
    for bad in ({"documents": [{"text": ""}]}, {"documents": [{"words": []}]}, {"documents": [{"id": True}]}, []):
        with pytest.raises(BadRequest):
            parse_documents(bad, 4)


def test_the_serve_deploy_config_is_valid_for_serve():
    from ray.serve.schema import ServeDeploySchema

    from pipelines.configs import ServeConfig
    from pipelines.serve import serve_config

    conf = serve_config(ServeConfig(cache="s3://bucket/cache", model_dir=["s3://bucket/m1", "s3://bucket/m2"],
                                    token_env="ER_TOKEN"))
    ServeDeploySchema.model_validate(conf) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(conf)
    assert conf["applications"][0]["import_path"] == "pipelines.serve:app"
    assert "ER_TOKEN" == conf["applications"][0]["args"]["token_env"]
