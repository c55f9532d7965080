"""`er ingest` on Ray Data: equal to the plain loop on disk and S3, incremental, crash-safe, GPU-aware, clear on bad input.

Ray-level tests share the session's local Ray (`ray_session`); the crash and logical-GPU tests run
`er ingest` in a subprocess with its own Ray, as a user would.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from er_core import open_cache
from er_core.store.writer import CacheWriter
from er_core.errors import CacheLockedError, DataFormatError
from er_core.corpus import find_sources, read_source
from er_core.recycle import Recycler, ingest_local
from er_core.store.storage import read_lock, url_to_fs
from pipelines.cli import main as er
from pipelines.ingest import read_rows, run
from pipelines.placement import Cluster, Node, Pool, plan_pool
from tests.conftest import WORDS

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(layer=2, codec="fp32", actors=2, threads=1, progress=False)


@pytest.fixture(scope="module")
def rec(tiny_bert):
    return Recycler.load(tiny_bert, layer=2, codec="fp32")


def _texts(n, seed=0, longest=60):
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, longest))) for _ in range(n)]


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _rows(url: str) -> dict:
    """key -> (input ids, hidden bytes) of a committed cache; fails on a duplicated key."""
    out = {}
    for t in open_cache(url).iter_tables(["key", "input_ids", "hidden"]):
        for k, ids, h in zip(*(t.column(c).to_pylist() for c in ("key", "input_ids", "hidden"))):
            assert k not in out, f"key {k} stored twice"
            out[k] = (tuple(ids), h)
    return out


def _reference(paths, rec, url) -> dict:
    """The plain single-process loop over the same corpus reader."""
    inputs = (r.inputs for s in find_sources(paths) for r in read_source(s))
    ingest_local(inputs, url, rec, progress=False)
    return _rows(url)


def _assert_close(got: dict, ref: dict, exact: dict | None = None):
    assert set(got) == set(ref)
    for k, (ids, h) in got.items():
        assert ids == ref[k][0]
        a, b = np.frombuffer(h, "<f4"), np.frombuffer(ref[k][1], "<f4")
        np.testing.assert_allclose(a, b, atol=1e-5)  # batch composition differs from the plain loop's
        if exact is not None:
            assert h == exact[k][1], "same batches must give bit-identical states"


# ---------------------------------------------------------------- Ray pipeline


def test_disk_and_s3_caches_are_identical_and_equal_the_plain_loop(ray_session, s3, rec, tiny_bert, tmp_path):
    # One file; duplicates sit next to each other, so every run batches exactly the same rows.
    texts = _texts(150)
    for i in (3, 40, 77):
        texts.insert(i + 1, texts[i])
    texts += ["", "   "]
    corpus = _jsonl(tmp_path / "corpus.jsonl", texts)
    ref = _reference([str(corpus)], rec, str(tmp_path / "ref"))

    disk = str(tmp_path / "cache")
    rep = run([str(corpus)], disk, model=tiny_bert, shard_rows=32, commit_every=2, **FAST)
    bucket = f"s3://{s3.bucket}/ingest/cache"
    rep_s3 = run([str(corpus)], bucket, model=tiny_bert, shard_rows=32, commit_every=2, **FAST)

    local_rows, s3_rows = _rows(disk), _rows(bucket)
    assert local_rows == s3_rows  # keys, ids and hidden bytes
    _assert_close(local_rows, ref)
    for r, url in ((rep, disk), (rep_s3, bucket)):
        s = r.summary
        assert (s["examples"], s["skipped_empty"], s["skipped_cached_or_duplicate"]) == (150, 2, 3)
        assert s["tokens"] == r.manifest.totals["tokens"] and s["truncated"] == r.manifest.totals["truncated"] > 0
        assert r.manifest.skipped == open_cache(str(tmp_path / "ref")).manifest.skipped == {"empty_text": 2}
        assert r.manifest.generation >= 3  # committed along the way, not only at the end
        assert open_cache(url).verify() == []
        assert r.actors and all(a["device"] == "cpu" and "GPU" not in a["resources"] for a in r.actors)
        assert read_lock(*url_to_fs(url)) is None  # released


def test_incremental_runs_over_mixed_formats_equal_one_run(ray_session, rec, tiny_bert, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b = _texts(70, seed=1), _texts(50, seed=2)
    folder = tmp_path / "corpus"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", a + a[:5])  # duplicates within a file
    (folder / "b.txt").write_text("\n".join(b + a[10:15]) + "\n")  # ... and across files
    pq.write_table(pa.table({"text": _texts(30, seed=3) + b[:4]}), folder / "c.parquet")
    ref = _reference([str(folder)], rec, str(tmp_path / "ref"))

    url = str(tmp_path / "cache")
    first = run([str(folder / "a.jsonl"), str(folder / "b.txt")], url, model=tiny_bert, shard_rows=24, **FAST)
    assert first.summary["examples"] == 120
    second = run([str(folder)], url, model=tiny_bert, shard_rows=24, **FAST)
    assert second.summary["examples"] == 30  # only the Parquet file's new texts
    assert second.summary["skipped_cached_or_duplicate"] == 70 + 5 + 50 + 5 + 4
    _assert_close(_rows(url), ref)  # no duplicates (checked by _rows), nothing missed


def test_long_qa_contexts_are_ingested_as_one_row_per_window_like_the_plain_loop(ray_session, rec, tiny_bert, tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    paras = [{"context": ctx, "qas": [{"id": f"q{i}", "question": "what is it", "answers": [{"text": ctx.split()[0], "answer_start": 0}]}]}
             for i, ctx in enumerate(_texts(12, seed=4, longest=120))]
    (folder / "train.json").write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paras}]}))
    ref = _reference([str(folder)], rec, str(tmp_path / "ref"))
    url = str(tmp_path / "cache")
    first = run([str(folder)], url, model=tiny_bert, shard_rows=8, **FAST)
    assert first.summary["examples"] == 12 and first.summary["rows"] == len(ref) > 12  # long contexts: several windows
    _assert_close(_rows(url), ref)
    again = run([str(folder)], url, model=tiny_bert, shard_rows=8, **FAST)
    assert (again.summary["examples"], again.summary["rows"], again.summary["skipped_cached_or_duplicate"]) == (0, 0, 12)


def test_ray_ingest_keys_rows_by_the_id_field_and_takes_paths_relative_to_the_callers_folder(
        ray_session, tiny_bert, tmp_path, monkeypatch):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "doc": f"d{i}"}) + "\n" for i, t in enumerate(_texts(12))))
    # Ray's workers run in another folder (the Ray's own): relative paths are the caller's, not theirs.
    monkeypatch.chdir(tmp_path)
    run(["c.jsonl"], "cache", model=os.path.relpath(tiny_bert), id_field="doc", **FAST)
    assert sorted(_rows(str(tmp_path / "cache"))) == sorted(f"d{i}" for i in range(12))
    cache = open_cache(str(tmp_path / "cache"))
    assert cache.verify() == [] and cache.spec.model_name == os.path.abspath(tiny_bert)  # what later commands load


def test_error_inside_a_read_task_names_file_and_line(ray_session, tiny_bert, tmp_path, monkeypatch):
    # Skip the driver's up-front scan, so the bad row is met by a Ray read task instead.
    import pipelines.ingest as ingest
    from er_core.corpus import CorpusStats

    monkeypatch.setattr(ingest, "scan", lambda *a, **k: CorpusStats(rows=2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: missing field 'text'"):
        run([str(bad)], str(tmp_path / "cache"), model=tiny_bert, **FAST)
    assert not (tmp_path / "cache" / "_log").exists()
    assert read_lock(*url_to_fs(str(tmp_path / "cache"))) is None  # released


def test_bad_input_past_the_drivers_first_rows_fails_in_the_stream_and_a_rerun_completes(
        ray_session, rec, tiny_bert, tmp_path, monkeypatch):
    # The driver reads one shard's worth of rows only: line 40 of the file is met by a read task.
    import pipelines.ingest as ingest

    monkeypatch.setattr(ingest, "PROBE_SHARDS", 1)
    texts = _texts(60, seed=7)
    lines = [json.dumps({"text": t}) for t in texts[:30]] + ["", json.dumps({"text": "  "})]  # a blank line, an empty text
    lines += [json.dumps({"text": t}) for t in texts[30:37]] + ['{"text": "cut off']
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    assert len(lines) == 40
    url = str(tmp_path / "cache")
    kw = dict(model=tiny_bert, shard_rows=8, commit_every=1, **FAST)
    with pytest.raises(DataFormatError, match=r"c\.jsonl:40: not valid JSON"):
        run([str(corpus)], url, **kw)
    if (tmp_path / "cache" / "manifest.json").exists():  # what it committed before failing stays valid
        assert open_cache(url).verify() == []
    assert read_lock(*url_to_fs(url)) is None  # released
    corpus.write_text("\n".join(lines[:-1] + [json.dumps({"text": t}) for t in texts[37:]]) + "\n")
    rep = run([str(corpus)], url, **kw)
    assert rep.summary["skipped_empty"] == 1
    assert set(_rows(url)) == {rec.key({"text": t}) for t in texts} and open_cache(url).verify() == []


def _er_ingest(corpus, cache, tiny_bert, *extra) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "ingest", str(corpus), "--cache", str(cache), "--model", tiny_bert,
            "--layer", "2", "--codec", "fp32", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}


def test_killed_run_keeps_last_commit_and_rerun_completes(ray_session, rec, tiny_bert, tmp_path):
    corpus = _jsonl(tmp_path / "big.jsonl", _texts(4000, seed=4, longest=40))
    url = tmp_path / "cache"
    cmd = _er_ingest(corpus, url, tiny_bert, "--shard-rows", "16", "--commit-every", "1", "--actors", "1", "--threads", "1")
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (url / "_log" / "00000000000000000001.json").exists():
            assert proc.poll() is None, "er ingest exited before its first commit"
            assert time.monotonic() < deadline, "no commit within 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # let it get mid-write
        assert proc.poll() is None, "the run finished before it could be killed; use a bigger corpus"
        os.kill(proc.pid, signal.SIGKILL)  # the driver, as a crash would
        proc.wait()  # reaped: its pid is gone, so its lock is stale
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the Ray it started, if anything outlived it
        except ProcessLookupError:
            pass

    reader = open_cache(str(url))
    assert reader.verify() == []
    partial = _rows(str(url))
    assert 0 < len(partial) < 4000
    ref = _reference([str(corpus)], rec, str(tmp_path / "ref"))
    assert set(partial) <= set(ref)

    rep = run([str(corpus)], str(url), model=tiny_bert, shard_rows=256, **FAST)  # takes over the stale lock
    assert rep.summary["examples"] == len(ref) - len(partial)
    assert set(_rows(str(url))) == set(ref)  # _rows also fails on any duplicated key
    assert open_cache(str(url)).verify() == []


def test_actors_ask_for_one_gpu_each_and_fall_back_to_cpu(tiny_bert, tmp_path):
    corpus = _jsonl(tmp_path / "c.jsonl", _texts(64, seed=5))
    script = textwrap.dedent(f"""
        import json, ray
        ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)
        from pipelines.ingest import run
        rep = run([{str(corpus)!r}], {str(tmp_path / "cache")!r}, model={tiny_bert!r}, layer=2, codec="fp32",
                  shard_rows=8, threads=1, progress=False)
        from er_core import open_cache
        problems = open_cache({str(tmp_path / "cache")!r}).verify()  # the staged path (GPUs) writes a sound cache too
        print("REPORT", json.dumps({{"actors": rep.actors, "examples": rep.summary["examples"], "problems": problems}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.split("REPORT", 1)[1])
    assert report["examples"] == 64 and report["problems"] == []
    assert report["actors"] and all(a["resources"].get("GPU") == 1.0 and a["device"] == "cpu" for a in report["actors"])
    assert "torch sees no CUDA; computing on CPU" in out.stderr + out.stdout


# ---------------------------------------------------------------- driver and CLI (no Ray)


def _cluster(*nodes: tuple[float, float], local=False) -> Cluster:
    """(CPUs, GPUs) per node, all on one host; the driver on the first (the head)."""
    return Cluster(tuple(Node(f"n{i}", "10.0.0.1", c, g) for i, (c, g) in enumerate(nodes)), "n0", local)


def test_pool_plan_follows_gpus_and_leaves_ray_data_a_cpu(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert plan_pool(_cluster((8, 2), local=True)) == Pool(size=2, num_gpus=1, num_cpus=1.0, threads=1)
    # 2 cores under 8 logical CPUs: one single-threaded actor per core
    assert plan_pool(_cluster((8, 0), local=True)) == Pool(size=2, num_gpus=0, num_cpus=1.0, threads=1)
    assert plan_pool(_cluster((8, 0), local=True), actors=1) == Pool(size=1, num_gpus=0, num_cpus=1.0, threads=2)
    # 2 logical CPUs only: one actor, the other CPU is left for reading
    assert plan_pool(_cluster((2, 0), local=True)) == Pool(size=1, num_gpus=0, num_cpus=1.0, threads=2)
    # a cluster: every CPU but one, whole CPUs, so the one left is free on some node
    assert plan_pool(_cluster((2, 0), (2, 0))) == Pool(size=3, num_gpus=0, num_cpus=1.0, threads=1)
    assert plan_pool(_cluster((0, 0), (16, 0), (16, 0))) == Pool(size=31, num_gpus=0, num_cpus=1.0, threads=1)
    assert plan_pool(_cluster((0, 0), (2, 0))) == Pool(size=1, num_gpus=0, num_cpus=1.0, threads=2)  # 0-CPU head
    # GPU nodes: one actor per GPU; a CPU each only where every GPU node has one per GPU, with one left to read
    assert plan_pool(_cluster((0, 0), (8, 1), (8, 1))) == Pool(size=2, num_gpus=1, num_cpus=1.0, threads=8)
    assert plan_pool(_cluster((1, 0), (2, 4))) == Pool(size=4, num_gpus=1, num_cpus=0.0, threads=1)
    # never more actors than the corpus has blocks: a small corpus loads the model once; --actors still rules
    assert plan_pool(_cluster((0, 0), (16, 0), (16, 0)), blocks=3) == Pool(size=3, num_gpus=0, num_cpus=1.0, threads=8)
    assert plan_pool(_cluster((8, 0), local=True), blocks=1) == Pool(size=1, num_gpus=0, num_cpus=1.0, threads=2)
    assert plan_pool(_cluster((1, 0), (2, 4)), blocks=1) == Pool(size=1, num_gpus=1, num_cpus=0.0, threads=3)
    assert plan_pool(_cluster((8, 0), local=True), actors=2, blocks=1).size == 2


def test_read_stage_skips_empties_and_uses_ids(tmp_path, rec):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a", "id": "x"}, {"text": "", "id": "y"}, {"text": "b", "id": 5}]))
    srcs = find_sources([str(f)])
    kw = dict(sources=srcs, text_field="text", tokenizer=rec.spec.tokenizer, storage_options=None, limit=None)
    (out,) = read_rows({"src": np.array([0])}, id_field="id", **kw)  # one output row: a shard's worth of rows
    assert out.num_rows == 1
    assert out.column("key")[0].as_py() == ["x", "5"] and out.column("row")[0].as_py() == [1, 3]
    assert out.column("src")[0].as_py() == [0, 0]
    chunks = list(read_rows({"src": np.array([0])}, id_field=None, chunk=1, **kw))
    assert [b.num_rows for b in chunks] == [1, 1] and [len(b.column("key")[0]) for b in chunks] == [1, 1]
    (out,) = read_rows({"src": np.array([0])}, id_field=None, **kw)
    assert out.column("key")[0].as_py() == [rec.key({"text": "a"}), rec.key({"text": "b"})]
    assert [json.loads(s) for s in out.column("input")[0].as_py()] == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": "ok" oops}\n', r"bad\.jsonl:2: not valid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n{"title": "x"}\n', r"bad\.jsonl:2: missing field 'text'"),
        ("bad.txt", b"ok\nbad \xff byte\n", r"bad\.txt:2: not valid UTF-8"),
        ("gone.jsonl", None, r"gone\.jsonl does not exist"),
    ],
)
def test_bad_input_fails_before_anything_is_committed(tmp_path, tiny_bert, capsys, name, data, match):
    good = _jsonl(tmp_path / "good.jsonl", _texts(20))
    if isinstance(data, str):
        (tmp_path / name).write_text(data)
    elif data is not None:
        (tmp_path / name).write_bytes(data)
    cache = tmp_path / "cache"
    assert er(["ingest", str(good), str(tmp_path / name), "--cache", str(cache), "--model", tiny_bert, "--layer", "2"]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (cache / "_log").exists() and not (cache / "_writer.lock").exists()


@pytest.mark.parametrize("local", [False, True], ids=["ray", "local"])
@pytest.mark.parametrize("texts, says", [([], "the corpus has no rows|no inputs"),
                                         (["", "  ", "\t"], "all 3 (rows of the corpus|inputs) have an empty")])
def test_empty_corpus_is_refused_and_writes_nothing(tmp_path, tiny_bert, rec, capsys, local, texts, says):
    corpus = _jsonl(tmp_path / "empty.jsonl", texts)
    args = ["ingest", str(corpus), "--model", tiny_bert, "--layer", "2", "--codec", "fp32"] + ["--local"] * local
    cache = tmp_path / "cache"
    assert er(args + ["--cache", str(cache)]) == 2  # refused before any Ray starts
    assert re.search(f"nothing to ingest into .*cache: ({says}).*nothing was written", capsys.readouterr().err, re.I)
    assert not cache.exists()  # no folder, lock or manifest

    ingest_local([{"text": "the gene"}], str(cache), rec, progress=False)
    before = {p.name: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert er(args + ["--cache", str(cache)]) == 2  # an existing cache stays exactly as it was
    assert {p.name: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before


def test_second_writer_is_refused_with_a_clear_message(tmp_path, tiny_bert, rec, capsys):
    corpus = _jsonl(tmp_path / "c.jsonl", _texts(10))
    url = str(tmp_path / "cache")
    with CacheWriter(url, rec.spec):
        code = er(["ingest", str(corpus), "--cache", url, "--model", tiny_bert, "--layer", "2", "--codec", "fp32"])
        assert code == 2 and "being written by run" in capsys.readouterr().err
        with pytest.raises(CacheLockedError):
            run([str(corpus)], url, model=tiny_bert, local=True, **{k: v for k, v in FAST.items() if k != "actors"})


def test_local_mode_ids_and_cache_info_verify(tmp_path, tiny_bert, rec, capsys):
    corpus = tmp_path / "c.jsonl"
    texts = _texts(30)
    corpus.write_text("".join(json.dumps({"text": t, "doc": f"d{i % 25}"}) + "\n" for i, t in enumerate(texts)))
    url = str(tmp_path / "cache")
    args = ["ingest", str(corpus), "--cache", url, "--model", tiny_bert, "--layer", "2", "--codec", "fp32", "--local"]
    assert er(args) == 0
    assert set(_rows(url)) == set(_reference([str(corpus)], rec, str(tmp_path / "ref")))
    assert "examples written  30" in capsys.readouterr().out

    by_id = str(tmp_path / "by-id")
    assert er(args[:3] + [by_id] + args[4:] + ["--id-field", "doc"]) == 0
    assert sorted(_rows(by_id)) == sorted(f"d{i}" for i in range(25))  # the first text of each id wins

    capsys.readouterr()
    assert er(["cache", "info", url]) == 0 and "rows        30" in capsys.readouterr().out
    assert er(["cache", "info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["totals"]["rows"] == 30 and info["index_segments"] >= 1 and info["compact_advised"] is False
    assert er(["cache", "verify", url]) == 0
    shard = Path(url) / open_cache(url).shards()[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert er(["cache", "verify", url]) == 1
    assert "fails its checksum" in capsys.readouterr().err
