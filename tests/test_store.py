"""The store at scale: row-level reads, the commit log (flat opens and commits), compaction under readers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest

from er_core.recycle import Recycler
from er_core.store import compact_cache, open_cache
from er_core.store import log as commit_log
from er_core.store.writer import CacheWriter

H = 32


@pytest.fixture(scope="module")
def spec(tiny_bert):
    return Recycler.load(tiny_bert, layer=2, codec="fp16").spec


def _rows(n, seed=0, start=0):
    rng = np.random.default_rng(seed)
    for i in range(start, start + n):
        L = int(rng.integers(4, 24))
        yield f"k{i}", rng.integers(0, 100, L).astype(np.int32), rng.standard_normal((L, H)).astype(np.float32)


class _Counted:
    """Bytes and requests of every ranged read of local files, by file kind."""

    def __init__(self, monkeypatch):
        self.bytes, self.requests = {}, {}
        real = fsspec.implementations.local.LocalFileSystem.cat_ranges

        def counting(fs, paths, starts, ends, *a, **kw):
            for p, s, e in zip(paths, starts, ends):
                kind = "shards" if "/shards/" in p else "index" if "/index/" in p else "other"
                self.bytes[kind] = self.bytes.get(kind, 0) + e - s
                self.requests[kind] = self.requests.get(kind, 0) + 1
            return real(fs, paths, starts, ends, *a, **kw)

        monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "cat_ranges", counting)


def test_a_scattered_sample_reads_its_own_rows_bytes_not_their_row_groups(tmp_path, spec, monkeypatch):
    url = str(tmp_path / "c")
    rows = list(_rows(4096))
    with CacheWriter(url, spec, shard_rows=1024) as w:
        for k, ids, h in rows:
            w.add(k, ids, h)
    sample = rows[::97]  # about one row in 97: each in its own row group of 64
    own = sum(len(ids) * H * 2 for _, ids, _ in sample)  # fp16 states
    r = open_cache(url)
    counted = _Counted(monkeypatch)
    got = r.load([k for k, _, _ in sample])
    assert counted.bytes["shards"] <= 2 * own  # was ~64x: a whole row group per row
    assert counted.requests["shards"] <= 2 * len(sample)  # states and token ids, no footer
    for k, ids, h in sample:
        i = got.index[k]
        assert np.array_equal(np.asarray(got.input_ids[i]), ids)
        np.testing.assert_allclose(got.hidden(i), h, rtol=2**-10, atol=1e-3)


def test_neighbouring_rows_are_fetched_in_one_request(tmp_path, spec, monkeypatch):
    url = str(tmp_path / "c")
    rows = list(_rows(600))
    with CacheWriter(url, spec, shard_rows=600) as w:
        for k, ids, h in rows:
            w.add(k, ids, h)
    r = open_cache(url)
    locs = r.locate([k for k, _, _ in rows[100:164]])  # one row group's run
    counted = _Counted(monkeypatch)
    r.read_located(locs, ["hidden", "length"])
    assert counted.requests["shards"] == 1


def test_a_row_whose_bytes_changed_is_refused(tmp_path, spec):
    url = str(tmp_path / "c")
    rows = list(_rows(50))
    with CacheWriter(url, spec) as w:
        for k, ids, h in rows:
            w.add(k, ids, h)
    r = open_cache(url)
    at = r.locate(["k7"]).column("hidden_at")[0].as_py()
    path = tmp_path / "c" / r.shards()[0].path
    data = bytearray(path.read_bytes())
    data[at + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    from er_core.errors import CacheCorruptError

    with pytest.raises(CacheCorruptError, match="fails its checksum"):
        open_cache(url).load(["k7"])
    assert len(open_cache(url).load(["k8"])) == 1  # other rows still read


def test_opening_reads_one_checkpoint_and_at_most_a_checkpoints_worth_of_commits(tmp_path, spec):
    url = str(tmp_path / "c")
    sizes = []
    with CacheWriter(url, spec, shard_rows=4) as w:
        for i in range(3 * commit_log.CHECKPOINT_EVERY + 5):
            for k, ids, h in _rows(4, seed=i, start=4 * i):
                w.add(k, ids, h)
            w.commit()
            read = []
            state = open_cache(url).manifest
            commit_log.read_state(*fsspec.core.url_to_fs(url), url, counter=read.append)
            sizes.append(len(read))
            assert len(state.index) <= 4 and state.totals["rows"] == 4 * (i + 1)  # one size tier: merged at 4
    assert max(sizes) <= commit_log.CHECKPOINT_EVERY + 2  # pointer + checkpoint + the commits after it
    assert any(name.endswith(".checkpoint.json") for name in os.listdir(tmp_path / "c" / "_log"))
    # the state never lists shards: its size follows the index segments, which merging keeps few
    last = sorted(p for p in os.listdir(tmp_path / "c" / "_log") if p.endswith(".checkpoint.json"))[-1]
    assert os.path.getsize(tmp_path / "c" / "_log" / last) < 8192


def test_two_writers_cannot_both_win_a_version(tmp_path, spec):
    url = str(tmp_path / "c")
    with CacheWriter(url, spec) as w:
        w.add("a", np.array([1, 2], np.int32), np.zeros((2, H), np.float32))
    fs, root = fsspec.core.url_to_fs(url)
    state = commit_log.read_state(fs, root, url)
    rec = commit_log.record(state, spec, "someone", "stamp")
    commit_log.commit(fs, root, url, state, rec)
    from er_core.store.storage import PreconditionFailed

    with pytest.raises(PreconditionFailed):
        commit_log.commit(fs, root, url, state, commit_log.record(state, spec, "other", "stamp"))


def _incremental(url, spec, runs=30, per_run=5):
    rows = []
    for i in range(runs):
        with CacheWriter(url, spec, shard_rows=per_run) as w:
            for k, ids, h in _rows(per_run, seed=i, start=per_run * i):
                w.add(k, ids, h)
                rows.append((k, ids, h))
    return rows


def test_compaction_merges_small_shards_while_an_open_reader_keeps_reading(tmp_path, spec):
    url = str(tmp_path / "c")
    rows = _incremental(url, spec)
    keys = [k for k, _, _ in rows]
    before = open_cache(url)  # a reader of the version before compaction (a training that is running)
    assert before.manifest.totals["shards"] == 30
    want = before.load(keys)
    rep = compact_cache(url, shard_rows=64)
    assert rep["compacted"] and rep["shards_after"] == 3 and rep["segments"] == 1
    again = before.load(keys)  # its files are kept for the retention
    assert all(np.array_equal(again.hidden(again.index[k]), want.hidden(want.index[k])) for k in keys)
    after = open_cache(url)
    assert after.verify() == [] and after.manifest.totals["rows"] == len(rows) and len(after.shards()) == 3
    got = after.load(keys)
    assert all(np.array_equal(got.hidden(got.index[k]), want.hidden(want.index[k])) for k in keys)
    assert len(os.listdir(tmp_path / "c" / "shards")) == 33  # merged-away files stay for older readers
    CacheWriter(url, spec, retain=0).close()  # a later writer after the retention removes them
    assert sorted(os.listdir(tmp_path / "c" / "shards")) == sorted(s.path.split("/")[1] for s in after.shards())
    assert open_cache(url).verify() == []


def test_index_only_compaction_merges_the_segments_and_reads_no_states(tmp_path, spec):
    url = str(tmp_path / "c")
    rows = _incremental(url, spec, runs=12)
    before = open_cache(url)
    assert len(before.manifest.index) > 1
    shard_files = {s.path: os.path.getmtime(tmp_path / "c" / s.path) for s in before.shards()}
    rep = compact_cache(url, shard_rows=64, index_only=True)
    assert rep["compacted"] and rep["merged"] == rep["written"] == 0 and rep["segments"] == 1
    after = open_cache(url)
    assert {s.path: os.path.getmtime(tmp_path / "c" / s.path) for s in after.shards()} == shard_files  # untouched
    assert after.verify() == [] and after.manifest.totals["rows"] == len(rows)
    got, want = after.load([k for k, _, _ in rows]), before.load([k for k, _, _ in rows])
    assert all(np.array_equal(got.hidden(got.index[k]), want.hidden(want.index[k])) for k, _, _ in rows)
    assert not compact_cache(url, index_only=True)["compacted"]  # one segment: nothing to do


_SLOW_COMPACT = """
import sys, time
from er_core.store import maintenance, writer
real = writer.write_shard
def slow(*a, **kw):
    out = real(*a, **kw)
    print("wrote", flush=True)
    time.sleep(30)
    return out
maintenance.write_shard = slow
maintenance.compact_cache(sys.argv[1], shard_rows=64)
"""


def test_kill_9_mid_compaction_loses_nothing(tmp_path, spec):
    url = str(tmp_path / "c")
    rows = _incremental(url, spec, runs=12)
    before = open_cache(url).manifest
    p = subprocess.Popen([sys.executable, "-c", _SLOW_COMPACT, url], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert p.stdout.readline().strip() == "wrote"  # one merged shard written, not committed
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    r = open_cache(url)
    # only the compaction's writer stamp was committed: the same shards and index
    assert (r.manifest.index, r.manifest.totals) == (before.index, before.totals) and r.verify() == []
    got = r.load([k for k, _, _ in rows])
    assert len(got) == len(rows)
    time.sleep(0.1)
    assert compact_cache(url, shard_rows=64)["compacted"]  # the next writer takes the dead run's lock
    r = open_cache(url)
    assert r.verify() == [] and len(r.load([k for k, _, _ in rows])) == len(rows)


def test_a_training_reading_while_compaction_commits_gets_the_same_result(tmp_path, tiny_bert, monkeypatch):
    """30 incremental runs hold a task; a training opens the cache, compaction commits before its first row read,
    and the training (which reads the version it opened) ends with exactly the metrics of one without compaction."""
    from er_core import TrainConfig, finetune, ingest_local, load_task
    from er_core.store import reader as store_reader
    from er_core.tasks import example_input
    from tests.conftest import write_tiny_task

    folder = write_tiny_task(tmp_path / "task", sizes=(("train", 90), ("dev", 30), ("test", 30)))
    rec = Recycler.load(tiny_bert, layer=2, codec="fp16")
    inputs = [example_input(e) for exs in load_task(folder).splits.values() for e in exs]
    url = str(tmp_path / "c")
    for i in range(30):
        ingest_local(iter(inputs[i * 5:(i + 1) * 5]), url, rec, progress=False)
    assert open_cache(url).manifest.totals["shards"] == 30
    cfg = TrainConfig(method="reduced", epochs=2, batch_size=16, seed=3)
    quiet = dict(log=lambda *a: None, progress=False)
    alone = finetune(url, str(folder), str(tmp_path / "alone"), cfg, **quiet)

    real, compacted = store_reader.CacheReader.read_located, []

    def compact_first(self, locs, columns):
        if not compacted:
            compacted.append(compact_cache(url, shard_rows=64))
        return real(self, locs, columns)

    monkeypatch.setattr(store_reader.CacheReader, "read_located", compact_first)
    during = finetune(url, str(folder), str(tmp_path / "during"), cfg, **quiet)
    assert compacted and compacted[0]["compacted"] and open_cache(url).manifest.totals["shards"] == 3
    for split in ("dev", "test"):
        assert during[split] == alone[split]
    assert open_cache(url).verify() == []


def test_merged_away_segments_are_deleted_at_once_and_an_older_reader_finds_its_keys_in_the_merged_one(tmp_path, spec):
    url = str(tmp_path / "c")
    with CacheWriter(url, spec, shard_rows=4) as w:
        for i in range(4):
            for k, ids, h in _rows(4, seed=i, start=4 * i):
                w.add(k, ids, h)
            w.commit()
        old = open_cache(url)  # 4 segments
        for i in range(4, 12):  # 4 segments of a size tier merge into one: their files are deleted
            for k, ids, h in _rows(4, seed=i, start=4 * i):
                w.add(k, ids, h)
            w.commit()
    listed = {s.path.split("/")[1] for s in open_cache(url).manifest.index}
    assert set(os.listdir(tmp_path / "c" / "index")) == listed  # no merged-away file kept
    assert not {s.path.split("/")[1] for s in old.manifest.index} <= listed
    got = old.load([f"k{i}" for i in range(16)])  # its segments are gone: it looks up in the latest ones
    assert len(got) == 16


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8"])
def test_row_reads_equal_whole_shard_reads_for_every_codec(tmp_path, spec, codec):
    from dataclasses import replace

    url = str(tmp_path / "c")
    rows = list(_rows(150))
    with CacheWriter(url, replace(spec, codec=codec), shard_rows=64) as w:
        for k, ids, h in rows:
            w.add(k, ids, h)
    r = open_cache(url)
    whole, by_key = r.load(), r.load([k for k, _, _ in rows[::-7]])
    for k, _, _ in rows[::-7]:
        assert np.array_equal(by_key.hidden(by_key.index[k]), whole.hidden(whole.index[k]))
        assert by_key.input_ids[by_key.index[k]] == whole.input_ids[whole.index[k]]


def _three_segments(tmp_path, spec) -> str:
    """A cache of 3 commits of 4,000 rows (k0..k11999): 3 index segments, none merged."""
    url = str(tmp_path / "c")
    with CacheWriter(url, spec, shard_rows=2000) as w:
        for i in range(3):
            for k, ids, h in _rows(4000, seed=i, start=4000 * i):
                w.add(k, ids, h)
            w.commit()
    return url


def test_key_claims_skip_the_buckets_of_segments_whose_bloom_filter_says_no(tmp_path, spec, monkeypatch):
    from er_core.corpus import KeyClaims
    from er_core.store.index import key_digests

    url = _three_segments(tmp_path, spec)
    asked = key_digests([f"new{i}" for i in range(2000)] + [f"k{i}" for i in range(0, 12000, 1200)])
    exact = open_cache(url).index.holds(asked)
    assert exact.sum() == 10
    read = {}
    for bloom in (False, True):
        counted = _Counted(monkeypatch)
        index = open_cache(url).index
        if bloom:
            KeyClaims(index=index)  # turns the filters on, whatever the lookup's size
            assert index.bloom is True
        else:
            index.bloom = False  # buckets only (left to itself, a lookup this big would ask the filters too)
        assert np.array_equal(index.holds(asked), exact)  # the filter only skips, never answers
        read[bloom] = counted.bytes["index"]
    # 2,010 keys touch every bucket of every segment; through the filters, ~1% of the new keys and the 10 cached
    assert read[True] * 4 < read[False]
    got = KeyClaims(index=open_cache(url).index).claim([f"new{i}" for i in range(10)] + ["k0", "k1200"], "t1")
    assert got.tolist() == [True] * 10 + [False, False]


def test_a_reader_keeps_bloom_filters_within_its_budget_and_claims_keep_all(tmp_path, spec, monkeypatch):
    from er_core.corpus import KeyClaims
    from er_core.store import index as index_mod
    from er_core.store.index import bloom_size, key_digests

    url = _three_segments(tmp_path, spec)
    monkeypatch.setattr(index_mod, "CACHED_FILTER_BYTES", bloom_size(4000) + 1)  # room for one segment's filter
    asked = key_digests([f"new{i}" for i in range(2000)] + [f"k{i}" for i in range(0, 12000, 1200)])
    want = open_cache(url).index.holds(asked)
    reader = open_cache(url).index
    for _ in range(2):  # a lookup this big asks every segment's filter, and keeps one of them
        assert np.array_equal(reader.holds(asked), want)
        held = [s for s in reader._open.values() if s.has_bloom]
        assert len(reader._open) == 3 and len(held) == 1 and reader._filter_bytes == held[0].bloom_bytes
    claims = open_cache(url).index
    KeyClaims(index=claims)
    assert np.array_equal(claims.holds(asked), want)
    assert sum(s.has_bloom for s in claims._open.values()) == 3  # a claim asks them all again on every call


def test_a_lookup_asks_a_segments_bloom_filter_only_where_that_reads_fewer_bytes(tmp_path, spec, monkeypatch):
    from er_core.store.index import BUCKET_ENTRIES, RECORD, bloom_size, key_digests

    url = str(tmp_path / "c")
    with CacheWriter(url, spec, shard_rows=4000) as w:
        for k, ids, h in _rows(4000):
            w.add(k, ids, h)
    keys = [f"k{i}" for i in range(0, 4000, 200)] + [f"new{i}" for i in range(1000)]
    read = {}
    for bloom in (None, False, True):
        counted = _Counted(monkeypatch)
        index = open_cache(url).index
        index.bloom = bloom
        assert index.holds(key_digests(keys)).sum() == 20
        read[bloom] = counted.bytes["index"]
    assert read[None] == read[True] < read[False] / 4  # 1,020 keys: the filter (5 KB) beats all 250 buckets (256 KB)
    one = {}
    for bloom in (None, True):
        counted = _Counted(monkeypatch)
        index = open_cache(url).index
        index.bloom = bloom
        assert index.holds(key_digests(["k8"])).tolist() == [True]
        one[bloom] = counted.bytes["index"]
    assert one[None] < one[True]  # one key: its bucket (~1 KB), not the filter too
    assert one[None] <= 4 * BUCKET_ENTRIES * RECORD.itemsize and bloom_size(4000) == 5000


def test_commits_merge_segments_up_to_a_top_tier_and_leave_bigger_ones_to_compaction():
    from er_core.store.index import COMMIT_TIERS, TIER, TIER_BASE, SegmentInfo, merge_plan, tier

    def segs(rows):
        return [SegmentInfo(f"s{i}", rows, 0, "") for i in range(TIER)]

    below = TIER_BASE * TIER ** (COMMIT_TIERS - 1)  # a tier COMMIT_TIERS - 1 segment: its merge makes a top one
    assert tier(below) == COMMIT_TIERS - 1 and len(merge_plan(segs(below))) == TIER
    top = TIER_BASE * TIER ** COMMIT_TIERS
    assert tier(top) == COMMIT_TIERS and merge_plan(segs(top)) == []
    assert len(merge_plan(segs(top), tiers=COMMIT_TIERS + 1)) == TIER



def test_a_cache_with_many_index_segments_is_pointed_at_compaction():
    from er_core.store import compact_advised, compact_hint
    from er_core.store.index import COMPACT_HINT

    assert not compact_advised(COMPACT_HINT) and compact_advised(COMPACT_HINT + 1)

    assert compact_hint("s3://b/c", COMPACT_HINT) == ""
    assert "`er cache compact --index-only s3://b/c`" in compact_hint("s3://b/c", COMPACT_HINT + 1)
