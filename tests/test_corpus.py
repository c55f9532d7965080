"""Corpus reading (formats, folders, globs, S3), bad input named by file and row, and key claims. No Ray."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from er_core import ErError
from er_core.errors import DataFormatError
from er_core.corpus import KeyClaims, batch_token, find_sources, key_digests, read_corpus, read_source, scan


def _texts(paths, **kw):
    return [r.inputs for s in find_sources(paths) for r in read_source(s, **kw)]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text('{"text": "the gene", "id": 7}\n\n{"text": ""}\n{"text": ["pre", "split"], "id": "w"}\n')
    (d / "b.txt").write_text("\ufeffline one\n\n   \nline two\r\n")
    (d / "c.csv").write_text('id,text\n1,"a, quoted\nnewline"\n2,plain\n')
    (d / "d.tsv").write_text("text\tid\ntab text\t3\n")
    pq.write_table(pa.table({"text": ["p1", "p2"], "id": [1, 2]}), d / "e.parquet")
    with gzip.open(d / "f.jsonl.gz", "wt") as f:
        f.write('{"text": "zipped"}\n')
    (d / "_SUCCESS").write_text("")
    (d / "notes.md").write_text("not a corpus file")
    return d


def test_every_format_in_a_folder(corpus):
    srcs = find_sources([str(corpus)])
    assert [s.fmt for s in srcs] == ["jsonl", "text", "csv", "tsv", "parquet", "jsonl"]
    assert _texts([str(corpus)]) == [
        {"text": "the gene"}, {"text": ""}, {"words": ["pre", "split"]},
        {"text": "line one"}, {"text": "line two"},  # blank and whitespace-only lines are no examples
        {"text": "a, quoted\nnewline"}, {"text": "plain"},
        {"text": "tab text"},
        {"text": "p1"}, {"text": "p2"},
        {"text": "zipped"},
    ]
    stats = scan(srcs)
    assert (stats.rows, stats.empty, stats.usable) == (11, 1, 10)


def test_globs_are_expanded_and_rows_keep_line_numbers(corpus):
    srcs = find_sources([str(corpus / "*.jsonl"), str(corpus / "a.jsonl")])
    assert len(srcs) == 1  # named twice, read once
    assert [r.row for r in read_source(srcs[0])] == [1, 3, 4]  # file line numbers, blank line 2 skipped


def test_read_corpus_gives_ids_for_prediction(corpus):
    recs = list(read_corpus([str(corpus / "a.jsonl"), str(corpus / "e.parquet")]))
    assert [r.id.rsplit("/", 1)[1] for r in recs] == ["a.jsonl:1", "a.jsonl:4", "e.parquet row 1", "e.parquet row 2"]
    assert [r.id for r in read_corpus([str(corpus / "e.parquet")], id_field="id")] == ["1", "2"]


def test_id_field_and_limit(corpus):
    (src,) = find_sources([str(corpus / "e.parquet")])
    assert [(r.row, r.ident) for r in read_source(src, id_field="id")] == [(1, "1"), (2, "2")]
    assert len(list(read_source(src, limit=1))) == 1
    (src,) = find_sources([str(corpus / "a.jsonl")])
    with pytest.raises(DataFormatError, match=r"a\.jsonl:3: missing id field 'id'"):
        list(read_source(src, id_field="id"))


def test_task_folder_reads_its_splits(data_dir):
    (src,) = find_sources([str(data_dir / "ncbi-disease")])
    assert src.fmt == "task"
    first = next(read_source(src, limit=2))
    assert set(first.inputs) == {"words"}
    with pytest.raises(ErError, match="--id-field does not apply to task folders"):
        next(read_source(src, id_field="id"))


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "broken\n', r"bad\.jsonl:2: not valid JSON"),
        ("bad.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: missing field 'text' \(fields present: \['body'\]\)"),
        ("bad.jsonl", b'{"text": 3}\n', r"bad\.jsonl:1: field 'text' must be a string"),
        ("bad.jsonl", b'[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)"),
        ("bad.txt", b"fine\n\xff\xfe oops\n", r"bad\.txt:2: not valid UTF-8"),
        ("bad.csv", b"text\nok\n\xe9t\xe9\n", r"bad\.csv:3: not valid UTF-8"),
        ("bad.csv", b"body\nx\n", r"bad\.csv:1: no column 'text' in the header \['body'\]"),
        ("bad.csv", b"text,id\na,1,extra\n", r"bad\.csv:2: 3 columns, the header has 2"),
        ("bad.jsonl.gz", b"not gzip at all", r"bad\.jsonl\.gz: unreadable"),
        ("bad.parquet", b"PAR1 not really", r"bad\.parquet: unreadable"),
    ],
)
def test_bad_input_names_file_and_row(tmp_path, name, data, match):
    (tmp_path / name).write_bytes(data)
    (src,) = find_sources([str(tmp_path / name)])
    with pytest.raises(DataFormatError, match=match):
        scan([src])


def test_bad_parquet_columns_and_nulls(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "b.parquet")
    with pytest.raises(DataFormatError, match=r"a\.parquet: no column 'text' \(columns: \['body'\]\)"):
        scan(find_sources([str(tmp_path / "a.parquet")]))
    with pytest.raises(DataFormatError, match=r"b\.parquet row 2: field 'text' must be a string .* got null"):
        scan(find_sources([str(tmp_path / "b.parquet")]))


def test_missing_and_unknown_paths_are_clear(tmp_path):
    with pytest.raises(ErError, match="does not exist"):
        find_sources([str(tmp_path / "nope.jsonl")])
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(ErError, match=r"no readable files .*expected extensions"):
        find_sources([str(tmp_path / "data.bin")])


def test_s3_folder_is_read_like_a_local_one(s3, corpus):
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options())
    fs.put(str(corpus / "a.jsonl"), f"{s3.bucket}/corpus/a.jsonl")
    fs.put(str(corpus / "e.parquet"), f"{s3.bucket}/corpus/sub/e.parquet")
    url = f"s3://{s3.bucket}/corpus"
    srcs = find_sources([url])  # endpoint and credentials from the AWS_* environment
    assert [s.url for s in srcs] == [f"{url}/a.jsonl", f"{url}/sub/e.parquet"]
    assert _texts([url]) == [{"text": "the gene"}, {"text": ""}, {"words": ["pre", "split"]}, {"text": "p1"}, {"text": "p2"}]
    assert scan(find_sources([f"{url}/*.jsonl"])).rows == 3


def test_claims_grant_each_key_once():
    claims = KeyClaims(["cached"])
    got = claims.claim(["cached", "new", "new", "other"])
    assert got.tolist() == [False, True, False, True]  # cached, new, duplicate in the batch, new
    assert claims.claim(["new", "third"]).tolist() == [False, True]
    assert claims.stats() == {"known": 4, "claimed": 3}


def test_claims_are_idempotent_per_batch_token():
    # A worker dies after claiming; Ray retries the same batch: it must get the same answer back.
    claims = KeyClaims()
    token = batch_token(np.array([0, 0]), np.array([1, 2]))
    first = claims.claim(["a", "b"], token)
    assert first.tolist() == [True, True]
    assert claims.claim(["a", "b"], token).tolist() == [True, True]
    assert claims.claim(["a", "b"], batch_token(np.array([1, 1]), np.array([1, 2]))).tolist() == [False, False]
    assert claims.claimed == 2


def test_claims_stay_small_after_merging():
    claims = KeyClaims(np.array(key_digests([f"old{i}" for i in range(1000)]), dtype="S16"), merge_every=100)
    for start in range(0, 1000, 50):
        claims.claim([f"k{i}" for i in range(start, start + 50)])
    assert len(claims) == 2000 and claims.claimed == 1000
    assert claims._sorted.nbytes == 16 * len(claims._sorted) and len(claims._recent) < 100
    assert not claims.claim([f"k{i}" for i in range(0, 1000, 7)] + ["old3"]).any()
    assert key_digests(["x"])[0] != key_digests(["y"])[0] and len(key_digests(["x"])[0]) == 16


def test_a_scan_that_stops_early_says_so_only_when_rows_remain(tmp_path):
    from er_core.corpus import find_sources, scan

    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(8)))
    exact = scan(find_sources([str(path)]), enough=8)
    assert (exact.usable, exact.complete) == (8, True)  # all read: the bar can show a total
    more = scan(find_sources([str(path)]), enough=5)
    assert (more.usable, more.complete) == (5, False)
