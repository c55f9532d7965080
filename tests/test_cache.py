"""The cache format: codecs, ragged storage, manifest checks, commit protocol, lock, and the local ingest loop."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from er_core import ErError, open_cache
from er_core.store.writer import CacheWriter
from er_core.errors import CacheCorruptError, CacheLockedError, CacheMismatchError
from er_core.store.codecs import CODECS
from er_core.recycle import Recycler, ingest_local
from er_core.store.storage import read_lock, url_to_fs
from er_core.task_data import grouped_order

H = 32


def _spec(recycler, **kw):
    from dataclasses import replace

    return replace(recycler.spec, **kw)


@pytest.fixture(scope="module")
def rec(tiny_bert):
    return Recycler.load(tiny_bert, layer=2, codec="fp32")


def _rows(n=20, seed=0, lo=1, hi=30):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(lo, hi))
        out.append((f"k{i}", rng.integers(0, 100, L).astype(np.int32), (rng.standard_normal((L, H)) * 3).astype(np.float32)))
    return out


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_rows_decoded_into_a_padded_batch_equal_the_row_decoder(codec):
    from er_core.task_data import collate, padded_states

    c = CODECS[codec]
    rows = [(c.encode(h), len(h)) for _, _, h in _rows(n=6)]
    stored = [(payload, scale, n) for (payload, scale), n in rows]
    batch = padded_states(c, stored, H)
    one_by_one = collate("classification", [np.zeros(n) for _, _, n in stored], None,
                         [c.decode(p, s, (n, H)) for p, s, n in stored], 0)["hidden_states"]
    assert batch.dtype == torch.float32 and torch.equal(batch, one_by_one)  # the same values, zeros in the padding


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_round_trip_within_stated_bound(tmp_path, rec, codec):
    rows = _rows()
    with CacheWriter(str(tmp_path / "c"), _spec(rec, codec=codec), shard_rows=7) as w:
        for k, ids, h in rows:
            w.add(k, ids, h)
    r = open_cache(str(tmp_path / "c"))
    got = r.load()
    assert len(got) == len(rows) and len(r.shards()) == 3
    for k, ids, h in rows:
        i = got.index[k]
        x = got.hidden(i)
        assert np.array_equal(np.asarray(got.input_ids[i]), ids)
        if codec == "fp32":
            assert np.array_equal(x, h)  # bit-exact
        elif codec == "fp16":
            assert np.all(np.abs(x - h) <= np.abs(h) * 2**-11 + 1e-7)
        elif codec == "bf16":
            assert np.all(np.abs(x - h) <= np.abs(h) * 2**-8)
        else:
            bound = np.abs(h).max(axis=1, keepdims=True) / 254 * (1 + 1e-6)
            assert np.all(np.abs(x - h) <= bound)


def test_no_padding_stored_bytes_scale_with_real_tokens(tmp_path, rec):
    def build(name, length):
        with CacheWriter(str(tmp_path / name), _spec(rec, codec="fp16")) as w:
            for i in range(64):
                w.add(f"{name}{i}", np.arange(length, dtype=np.int32), np.ones((length, H), np.float32) * i)
        return open_cache(str(tmp_path / name)).manifest.totals

    short, long = build("short", 5), build("long", 40)
    assert short["tokens"] == 64 * 5 and long["tokens"] == 64 * 40
    payload = 2 * H  # fp16 bytes per token of hidden states; ids add up to 4 more
    assert long["bytes"] - short["bytes"] == pytest.approx(64 * 35 * (payload + 4), rel=0.1)
    t = pq.read_table(tmp_path / "long" / open_cache(str(tmp_path / "long")).shards()[0].path)
    assert all(len(b) == 40 * payload for b in t.column("hidden").to_pylist())


def test_shuffle_yields_every_row_once_per_epoch():
    lengths = np.random.default_rng(1).integers(1, 100, 1000)
    orders = []
    for epoch in range(3):
        batches = grouped_order(lengths, 32, shuffle=True, seed=7, epoch=epoch)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(1000))
        orders.append(flat)
        # grouped by length: padding waste stays small
        waste = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches) / lengths.sum()
        assert waste < 0.1
    assert not np.array_equal(orders[0], orders[1])


def test_files_are_plain_parquet(tmp_path, rec):
    with CacheWriter(str(tmp_path / "c"), rec.spec) as w:
        for k, ids, h in _rows(5):
            w.add(k, ids, h)
    df = pd.read_parquet(tmp_path / "c" / open_cache(str(tmp_path / "c")).shards()[0].path)
    assert list(df.columns) == ["key", "length", "input_ids", "hidden", "scale", "truncated"]
    row = df.iloc[0]
    assert np.frombuffer(row["hidden"], "<f4").reshape(row["length"], H).shape == (row["length"], H)


def test_mismatched_model_layer_tokenizer_are_refused(tmp_path, rec):
    url = str(tmp_path / "c")
    with CacheWriter(url, rec.spec) as w:
        w.add("a", np.array([2, 3], np.int32), np.zeros((2, H), np.float32))
    before = sorted(os.listdir(tmp_path / "c" / "_log"))
    with pytest.raises(CacheMismatchError, match="layer k: cache has 2, requested 3"):
        open_cache(url, expect=_spec(rec, layer=3))
    with pytest.raises(CacheMismatchError, match="model: cache was built with"):
        open_cache(url, expect=_spec(rec, lower_fingerprint="f" * 64))
    from dataclasses import replace

    tok = replace(rec.spec.tokenizer, fingerprint="0" * 64)
    with pytest.raises(CacheMismatchError, match="tokenizer"):
        open_cache(url, expect=_spec(rec, tokenizer=tok))
    with pytest.raises(CacheMismatchError, match="codec"):
        CacheWriter(url, _spec(rec, codec="int8"))
    assert sorted(os.listdir(tmp_path / "c" / "_log")) == before  # nothing committed
    assert read_lock(*url_to_fs(url)) is None  # released


def test_corrupted_shard_is_refused_by_name(tmp_path, rec):
    url = str(tmp_path / "c")
    with CacheWriter(url, rec.spec, shard_rows=5) as w:
        for k, ids, h in _rows(10):
            w.add(k, ids, h)
    shard = open_cache(url).shards()[1]
    p = tmp_path / "c" / shard.path
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=shard.path.replace(".", r"\.")):
        open_cache(url).load()
    problems = open_cache(url).verify()
    assert len(problems) == 1 and shard.path in problems[0]


def test_truncated_commit_is_a_clear_error(tmp_path, rec):
    url = str(tmp_path / "c")
    with CacheWriter(url, rec.spec) as w:
        w.add("a", np.array([2, 3], np.int32), np.zeros((2, H), np.float32))
    m = tmp_path / "c" / "_log" / "00000000000000000001.json"
    m.write_bytes(m.read_bytes()[:100])
    with pytest.raises(CacheCorruptError, match="truncated or not valid JSON"):
        open_cache(url)
    with pytest.raises(ErError, match="no er cache"):
        open_cache(str(tmp_path / "nothing"))


def test_failed_write_leaves_previous_cache_and_no_orphans(tmp_path, rec):
    url = str(tmp_path / "c")
    with CacheWriter(url, rec.spec, shard_rows=2) as w:
        for k, ids, h in _rows(4):
            w.add(k, ids, h)
    before = open_cache(url).manifest
    with pytest.raises(RuntimeError):
        with CacheWriter(url, rec.spec, shard_rows=2) as w:
            for k, ids, h in _rows(6, seed=3):
                w.add("new" + k, ids, h)
            raise RuntimeError("crash mid-run")
    after = open_cache(url).manifest  # only the fence's writer stamp was committed: one version, nothing added
    assert (after.index, after.totals, after.generation) == (before.index, before.totals, before.generation + 1)
    assert after.writer == w.run_id
    assert len(os.listdir(tmp_path / "c" / "shards")) > 2  # the crashed run's shards exist, unlisted
    assert len(open_cache(url).load()) == 4
    with CacheWriter(url, rec.spec):  # the next writer removes them: their run released its lock
        pass
    assert len(os.listdir(tmp_path / "c" / "shards")) == 2


def test_second_writer_is_refused_and_stale_lock_taken_over(tmp_path, rec):
    url = str(tmp_path / "c")
    w = CacheWriter(url, rec.spec)
    with pytest.raises(CacheLockedError, match="being written by run"):
        CacheWriter(url, rec.spec)
    w.close()
    # a lock left by a dead process on this host is stale
    lock = tmp_path / "c" / "_writer.lock"
    import socket

    lock.write_text(json.dumps({"run_id": "dead", "host": socket.gethostname(), "pid": 2**22 + 12345, "heartbeat": 0}))
    CacheWriter(url, rec.spec).close()
    assert json.loads(lock.read_text())["released"] and read_lock(*url_to_fs(url)) is None


def test_ingest_local_matches_plain_lower_and_handles_edge_inputs(tmp_path, rec):
    texts = ["the protein binds cancer cells", "gene", "", "   ", " ".join(["disease"] * 100), "the protein binds cancer cells"]
    url = str(tmp_path / "c")
    m = ingest_local(({"text": t} for t in texts), url, rec, progress=False)
    assert m.totals["rows"] == 3  # two empties skipped, one duplicate
    assert m.skipped == {"empty_text": 2}
    assert m.totals["truncated"] == 1
    rows = open_cache(url, expect=rec.spec).load()
    for t in ("the protein binds cancer cells", "gene", " ".join(["disease"] * 100)):
        (tok,) = rec.tokenize([{"text": t}])
        assert len(tok.input_ids) <= rec.spec.tokenizer.max_length
        with torch.no_grad():
            ref = rec.lower(torch.tensor(tok.input_ids[None], dtype=torch.long), torch.ones(1, len(tok.input_ids), dtype=torch.long))[0]
        i = rows.index[rec.key({"text": t})]
        np.testing.assert_allclose(rows.hidden(i), ref.numpy(), atol=1e-5)
    # incremental: a second run over a grown corpus adds only the new key
    m2 = ingest_local(({"text": t} for t in texts + ["the gene"]), url, rec, progress=False)
    assert m2.totals["rows"] == 4 and m2.generation == m.generation + 2  # the writer's stamp, then its commit


def test_keys_depend_on_text_and_tokenizer_settings(rec):
    from dataclasses import replace

    from er_core.keys import example_key

    a = example_key({"text": "x"}, rec.spec.tokenizer)
    assert a == example_key({"text": "x"}, rec.spec.tokenizer)
    assert a != example_key({"text": "y"}, rec.spec.tokenizer)
    assert a != example_key({"text": "x"}, replace(rec.spec.tokenizer, max_length=8))
    assert a == example_key({"text": "x"}, replace(rec.spec.tokenizer, name="elsewhere"))


def _as_format_3(url: str) -> None:
    """Rewrite a cache's metadata the way er wrote formats 1-3: one manifest.json listing every shard, no log."""
    import hashlib
    import shutil
    from dataclasses import asdict

    r = open_cache(url)
    m = {"format": "er-embedding-cache", "format_version": 3, "generation": 1, "created": 0.0, "updated": 0.0,
         "writer": "", "spec": r.spec.to_dict(), "totals": r.manifest.totals, "skipped": r.manifest.skipped,
         "next_id": r.manifest.next_id,
         "shards": [{**asdict(s), "sha256": hashlib.sha256(open(f"{url}/{s.path}", "rb").read()).hexdigest()}
                    for s in r.shards()],
         "index": [{"path": s.path, "rows": s.rows, "bytes": s.bytes, "sha256": s.sha256} for s in r.manifest.index]}
    shutil.rmtree(f"{url}/_log")
    open(f"{url}/manifest.json", "w").write(json.dumps(m))


def _as_format_1(url: str) -> None:
    """Rewrite a cache the way er wrote format 1: plain Parquet shards, no index, whole-file sha256 only."""
    import hashlib

    root = url
    _as_format_3(url)
    m = json.loads(open(f"{root}/manifest.json").read())
    for s in m["shards"]:
        t = pq.read_table(f"{root}/{s['path']}")
        pq.write_table(t, f"{root}/{s['path']}", row_group_size=256, use_dictionary=False)
        data = open(f"{root}/{s['path']}", "rb").read()
        s.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        for k in ("footer_sha256", "group_rows", "id"):
            del s[k]
    for p in m.pop("index"):
        os.remove(f"{root}/{p['path']}")
    del m["next_id"]
    m["format_version"] = 1
    open(f"{root}/manifest.json", "w").write(json.dumps(m))


def test_format_1_cache_is_refused_with_a_hint_then_upgraded_in_place(tmp_path, rec, capsys):
    from er_core.store import upgrade_cache
    from er_core.errors import CacheFormatError
    from pipelines.cli import main

    url = str(tmp_path / "c")
    rows = _rows(150, seed=4)
    with CacheWriter(url, rec.spec, shard_rows=70) as w:
        for k, ids, h in rows:
            w.add(k, ids, h)
    _as_format_1(url)
    with pytest.raises(CacheFormatError, match=f"er cache upgrade {url}"):
        open_cache(url)
    assert main(["cache", "info", url]) != 0
    assert "er cache upgrade" in capsys.readouterr().err
    assert main(["cache", "upgrade", url]) == 0
    assert "upgraded" in capsys.readouterr().out
    r = open_cache(url)
    assert r.verify() == [] and len(r.shards()) == 3 and r.manifest.totals["rows"] == 150
    assert sorted(os.listdir(tmp_path / "c" / "shards")) == sorted(s.path.split("/")[1] for s in r.shards())
    got = r.load([k for k, _, _ in rows[::-1]])
    assert sorted(got.keys) == sorted(k for k, _, _ in rows)
    for k, ids, h in rows:
        assert np.array_equal(got.hidden(got.index[k]), h) and np.array_equal(np.asarray(got.input_ids[got.index[k]]), ids)
    assert upgrade_cache(url)["upgraded"] is False  # a current cache is left as it is


def _as_format_2(url: str) -> None:
    """Rewrite a cache's index the way er wrote format 2: Parquet segments in 4096-entry row groups."""
    import hashlib

    from er_core.store.parquet_io import to_parquet

    entries = open_cache(url).index.entries().select(["digest", "shard", "length"])
    _as_format_3(url)
    m = json.loads(open(f"{url}/manifest.json").read())
    for p in m["index"]:
        os.remove(f"{url}/{p['path']}")
    data, footer = to_parquet(entries.sort_by("digest"), 4096, "zstd", statistics=["digest"])
    open(f"{url}/index/seg-old-00000001.parquet", "wb").write(data)
    m["index"] = [{"path": "index/seg-old-00000001.parquet", "rows": entries.num_rows, "bytes": len(data),
                   "sha256": hashlib.sha256(data).hexdigest(), "footer_sha256": footer}]
    m["format_version"] = 2
    open(f"{url}/manifest.json", "w").write(json.dumps(m))


def test_format_2_cache_is_refused_with_a_hint_then_rewritten(tmp_path, rec, capsys):
    from er_core.errors import CacheFormatError
    from pipelines.cli import main

    url = str(tmp_path / "c")
    rows = _rows(90, seed=8)
    with CacheWriter(url, rec.spec, shard_rows=40) as w:
        for k, ids, h in rows:
            w.add(k, ids, h)
    _as_format_2(url)
    with pytest.raises(CacheFormatError, match=f"format version 2 .*er cache upgrade {url}"):
        open_cache(url)
    assert main(["cache", "upgrade", url]) == 0
    assert "from format version 2 to 4" in capsys.readouterr().out
    r = open_cache(url)
    assert r.verify() == [] and r.manifest.format_version == 4 and not (tmp_path / "c" / "manifest.json").exists()
    assert os.listdir(tmp_path / "c" / "index") == [r.manifest.index[0].path.split("/")[1]]  # the old segment is gone
    assert sorted(os.listdir(tmp_path / "c" / "shards")) == sorted(s.path.split("/")[1] for s in r.shards())
    got = r.load([k for k, _, _ in rows])
    for k, ids, h in rows:
        assert np.array_equal(got.hidden(got.index[k]), h)


def _entries(n: int, seed: int):
    from er_core.store.index import key_digests, shard_entries

    keys = [f"key-{seed}-{i}" for i in range(n)]
    rows = {c: np.zeros(n) for c in ("crc", "ids_at", "hidden_at", "scale_at", "ids_crc")}
    rows.update(length=np.full(n, 5), row=np.arange(n))
    return keys, shard_entries(key_digests(keys), 0, "part-000000000000-000000000001.parquet", rows)


def _segment(tmp_path, n: int):
    import hashlib

    from er_core.store.index import Index, SegmentInfo, segment_bytes

    keys, t = _entries(n, 0)
    data, rows = segment_bytes([t], [])
    (tmp_path / "seg.idx").write_bytes(data)
    fs, root = url_to_fs(str(tmp_path))
    return keys, data, lambda: Index(fs, root, [SegmentInfo("seg.idx", rows, len(data), hashlib.sha256(data).hexdigest())], str(tmp_path))


def test_index_lookups_read_bytes_in_proportion_to_the_keys_not_the_cache(tmp_path, monkeypatch):
    import fsspec

    from er_core.store import index

    monkeypatch.setattr(index, "COALESCE", 0)
    keys, data, open_index = _segment(tmp_path, 20_000)
    read = []
    real = fsspec.implementations.local.LocalFileSystem.cat_ranges

    def counting(self, paths, starts, ends, *a, **kw):
        read.extend(e - s for s, e in zip(starts, ends))
        return real(self, paths, starts, ends, *a, **kw)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "cat_ranges", counting)
    ix = open_index()
    assert read == []  # opening reads nothing
    got = ix.locate(keys[:10] + ["absent"])
    assert sorted(got.column("key").to_pylist()) == sorted(keys[:10])
    per_bucket = index.BUCKET_ENTRIES * index.RECORD.itemsize
    assert 0 < sum(read) < 10 * 4 * per_bucket and sum(read) * 50 < len(data)  # 10 buckets (about 10 KB) of 1.2 MB
    assert set(got.column("shard").to_pylist()) == {0} and set(got.column("length").to_pylist()) == {5}


def test_a_corrupt_index_bucket_is_refused_and_the_rest_still_read(tmp_path):
    from er_core.store.index import RECORD

    keys, data, open_index = _segment(tmp_path, 3000)
    bad = bytearray(data)
    bad[100 * RECORD.itemsize + 20] ^= 0xFF  # the shard id of entry 100
    (tmp_path / "seg.idx").write_bytes(bytes(bad))
    ix = open_index()
    with pytest.raises(CacheCorruptError, match="seg.idx of .* fails its checksum"):
        ix.locate(keys)
    with pytest.raises(CacheCorruptError, match="seg.idx of .* fails its checksum"):
        ix.entries()
    broken = np.frombuffer(bytes(data[: 3000 * RECORD.itemsize]), RECORD)["digest"][100]
    from er_core.store.index import key_digests

    fine = [k for k, d in zip(keys, key_digests(keys)) if d[:1] != broken[:1]][:50]  # keys in other buckets
    assert ix.locate(fine).num_rows == 50


def test_a_corrupt_index_is_found_by_verify_and_rebuilt_by_repair(tmp_path, rec):
    from er_core.store import repair_cache

    url = str(tmp_path / "c")
    rows = _rows(60, seed=9)
    with CacheWriter(url, rec.spec, shard_rows=30) as w:
        for k, ids, h in rows:
            w.add(k, ids, h)
    seg = open_cache(url).manifest.index[0]
    p = tmp_path / "c" / seg.path
    data = bytearray(p.read_bytes())
    data[40] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError):
        open_cache(url).locate([k for k, _, _ in rows])
    assert any(seg.path in x for x in open_cache(url).verify())
    rep = repair_cache(url)
    assert rep["dropped"] == [] and rep["index_rebuilt"]
    r = open_cache(url)
    assert r.verify() == [] and r.locate([k for k, _, _ in rows]).num_rows == 60


def test_locating_keys_reads_the_index_not_the_states(tmp_path, rec):
    """Opening a cache and locating keys touches index segments only; reading them touches their row groups only."""
    import fsspec

    url = str(tmp_path / "c")
    rows = _rows(400, seed=5, lo=20, hi=30)
    with CacheWriter(url, rec.spec, shard_rows=100) as w:
        for i, (k, ids, h) in enumerate(rows):
            w.add(k, ids, h)
            if i % 100 == 99:
                w.commit()
    opened = []
    real_open = fsspec.implementations.local.LocalFileSystem._open

    def counting_open(self, path, *a, **kw):
        opened.append(path)
        return real_open(self, path, *a, **kw)

    fsspec.implementations.local.LocalFileSystem._open = counting_open
    try:
        r = open_cache(url)
        locs = r.locate(["k5", "k7", "nope"])
        assert locs.column("key").to_pylist() == ["k5", "k7"]
        assert opened and all("/index/" in p or "/_log/" in p for p in opened)
        opened.clear()
        got = r.read_located(locs, ["hidden", "length"])
    finally:
        fsspec.implementations.local.LocalFileSystem._open = real_open
    shard = {s.id: s for s in r.shards()}[locs.column("shard")[0].as_py()]
    assert got.column("key").to_pylist() == ["k5", "k7"]
    assert np.array_equal(r.decode(got["length"][0].as_py(), got["hidden"][0].as_py(), None), rows[5][2])
    assert {p.rsplit("/", 1)[-1] for p in opened} <= {shard.path.rsplit("/", 1)[-1]}


def test_a_reader_fetches_each_index_bucket_once(tmp_path, rec, monkeypatch):
    """Lookups one after another (a task's splits, a predictor's batches) fetch an index bucket once, whatever the order."""
    import fsspec

    from er_core.store import index

    monkeypatch.setattr(index, "BUCKET_ENTRIES", 4)  # many buckets per segment
    monkeypatch.setattr(index, "COALESCE", 0)
    url = str(tmp_path / "c")
    rows = _rows(120, seed=6, lo=2, hi=5)
    with CacheWriter(url, rec.spec, shard_rows=40) as w:
        for i, (k, ids, h) in enumerate(rows):
            w.add(k, ids, h)
            if i % 60 == 59:
                w.commit()
    fetched = []
    real = fsspec.implementations.local.LocalFileSystem.cat_ranges

    def counting(self, paths, starts, ends, *a, **kw):
        fetched.extend(p for p in paths if "/index/" in p)
        return real(self, paths, starts, ends, *a, **kw)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "cat_ranges", counting)
    keys = [k for k, _, _ in rows]
    r = open_cache(url)
    first = r.locate(keys[:50] + ["nope"]).to_pylist()
    n = len(fetched)
    assert n > 0 and r.locate(keys[:50] + ["nope"]).to_pylist() == first and len(fetched) == n  # same keys: nothing fetched
    r.locate(keys)
    everything = len(fetched)
    assert r.locate(keys[10:90]).num_rows == 80 and len(fetched) == everything  # all held now
    monkeypatch.setattr(index, "CACHED_ENTRIES", 20)  # a small budget drops the least recently used, answers stay right
    small = open_cache(url)
    for part in (keys[:30], keys[60:], keys[:30], keys[::7]):
        got = small.locate(part)
        assert sorted(got.column("key").to_pylist()) == sorted(part)
        assert got.to_pylist() == open_cache(url).locate(part).to_pylist()


def test_model_revision_is_recorded_reused_and_a_different_one_refused(tmp_path, tiny_bert):
    from er_core import TrainConfig, finetune
    from pipelines.ingest import IngestConfig, run
    from tests.conftest import write_tiny_task

    task = write_tiny_task(tmp_path / "task", sizes=(("train", 24), ("dev", 8), ("test", 8)))
    url = str(tmp_path / "c")
    cfg = dict(model=tiny_bert, layer=2, codec="fp32", local=True, progress=False)
    run([str(task)], url, IngestConfig(model_revision="v1", **cfg))
    assert open_cache(url).spec.model_revision == "v1"
    with pytest.raises(CacheMismatchError, match="at revision 'v1', requested revision 'v2'"):
        run([str(task)], url, IngestConfig(model_revision="v2", **cfg))
    (task / "more.jsonl").write_text('{"text": "a new text", "label": "x"}\n')
    run([str(task / "more.jsonl")], url, IngestConfig(**cfg))  # no --model-revision: the cache's own
    assert open_cache(url).spec.model_revision == "v1" and open_cache(url).manifest.totals["rows"] == 41
    finetune(url, str(task), str(tmp_path / "out"), TrainConfig(epochs=1, batch_size=8), progress=False, log=lambda r: None)
    assert json.loads((tmp_path / "out" / "er_model.json").read_text())["model"]["revision"] == "v1"
