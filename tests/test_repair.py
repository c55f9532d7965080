"""`er cache repair`: bad or missing shards leave the manifest in one commit under the writer lock, their files
are deleted, and a re-ingest of the same corpus recomputes exactly their examples."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

from er_core import open_cache
from er_core.store.storage import url_to_fs
from pipelines.cli import main as er
from tests.conftest import WORDS


def _jsonl(path: Path, n: int, seed: int) -> str:
    rnd = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 20)))}) + "\n"
                            for _ in range(n)))
    return str(path)


def _keys(url: str) -> list[str]:
    return sorted(open_cache(url).keys())


def _flip_a_byte(url: str, rel: str) -> None:
    fs, root = url_to_fs(url)
    data = bytearray(fs.cat_file(f"{root}/{rel}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{root}/{rel}", bytes(data))


def test_corrupt_shard_is_dropped_and_a_reingest_restores_every_example(tmp_path, tiny_bert, capsys):
    a, b = _jsonl(tmp_path / "a.jsonl", 40, 1), _jsonl(tmp_path / "b.jsonl", 40, 2)
    url = str(tmp_path / "cache")
    opts = ["--cache", url, "--model", tiny_bert, "--layer", "2", "--codec", "fp32", "--local"]
    assert er(["ingest", a, *opts]) == 0 and er(["ingest", a, b, *opts]) == 0  # two shards
    before = _keys(url)
    bad = open_cache(url).shards()[0]
    _flip_a_byte(url, bad.path)
    capsys.readouterr()

    assert er(["cache", "verify", url]) == 1
    assert bad.path in capsys.readouterr().err
    assert er(["cache", "verify", url, "--repair"]) == 0
    out, err = capsys.readouterr()
    assert f"dropped {bad.path} ({bad.rows} examples)" in err
    assert "1 dropped" in out and f"{bad.rows} examples must be re-ingested" in out
    assert not (Path(url) / bad.path).exists()  # the bad file went with it
    assert len(_keys(url)) == len(before) - bad.rows
    assert er(["cache", "verify", url]) == 0

    assert er(["ingest", a, b, *opts]) == 0
    assert f"examples written  {bad.rows} " in capsys.readouterr().out  # exactly those, nothing else
    assert _keys(url) == before
    assert er(["cache", "verify", url]) == 0


def test_repair_on_s3_then_a_ray_reingest(ray_session, s3, tmp_path, tiny_bert, capsys):
    from pipelines.ingest import run

    corpus = _jsonl(tmp_path / "c.jsonl", 96, 3)
    url = f"s3://{s3.bucket}/repair/{uuid.uuid4().hex[:8]}"
    fast = dict(model=tiny_bert, layer=2, codec="fp32", actors=2, threads=1, progress=False, shard_rows=16)
    run([corpus], url, **fast)
    before = _keys(url)
    corrupt, missing = open_cache(url).shards()[1:3]
    _flip_a_byte(url, corrupt.path)
    fs, root = url_to_fs(url)
    fs.rm_file(f"{root}/{missing.path}")

    assert er(["cache", "repair", url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(d["path"] for d in report["dropped"]) == sorted([corrupt.path, missing.path])
    assert report["rows_to_reingest"] == corrupt.rows + missing.rows
    assert not fs.exists(f"{root}/{corrupt.path}")

    again = run([corpus], url, **fast)
    assert again.summary["examples"] == corrupt.rows + missing.rows
    assert _keys(url) == before
    assert open_cache(url).verify() == []
