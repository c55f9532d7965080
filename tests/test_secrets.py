"""Secrets never reach a log or a file.

Storage options carrying a credential are refused (they would travel in Ray task arguments and
configs, which Ray logs); and after `er ingest` to S3 and `er train` from it, run as a user would
with AWS_SECRET_ACCESS_KEY set to a unique marker, the marker is in no file under the Ray temp dir
(session logs), the cache, the checkpoints or the outputs.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from er_core import ErError
from er_core.secrets import find_secrets, reject_secrets
from pipelines.ingest import run
from tests.conftest import write_tiny_task
from tests.s3_server import SeaweedS3

ROOT = Path(__file__).resolve().parents[1]


def test_credentials_in_storage_options_are_named_never_echoed():
    opts = {"client_kwargs": {"endpoint_url": "http://s3", "region_name": "eu", "aws_secret_access_key": "S3KR1T"},
            "Key": "AKIA-XYZ", "config_kwargs": {"retries": {"max_attempts": 2}}, "extra": [{"token": "T0K3N"}],
            "secret": None, "anon": False}
    assert find_secrets(opts) == ["storage_options['client_kwargs']['aws_secret_access_key']",
                                  "storage_options['Key']", "storage_options['extra'][0]['token']"]
    with pytest.raises(ErError, match=r"storage_options\['Key'\].*holds a credential.*AWS_SECRET_ACCESS_KEY") as e:
        reject_secrets(opts)
    assert not any(v in str(e.value) for v in ("S3KR1T", "AKIA-XYZ", "T0K3N"))
    reject_secrets({"client_kwargs": {"endpoint_url": "http://s3", "region_name": "eu"}})  # settings pass
    reject_secrets(None)


def test_ingest_refuses_credentials_before_touching_anything(tmp_path, tiny_bert):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "the gene"}\n')
    with pytest.raises(ErError, match=r"storage_options\['secret'\] holds a credential"):
        run([str(corpus)], str(tmp_path / "cache"), model=tiny_bert, layer=2, progress=False,
            storage_options={"key": "", "secret": "S3KR1T"})
    assert not (tmp_path / "cache").exists()


def test_train_predict_and_sweep_refuse_credentials(tmp_path, tiny_cache):
    import yaml

    from pipelines.predict import predict
    from pipelines.sweep import load_sweep
    from pipelines.train_ray import train_on_ray
    from er_core import TrainConfig

    url, folder, _ = tiny_cache
    creds = {"client_kwargs": {"aws_secret_access_key": "S3KR1T"}}
    with pytest.raises(ErError, match="holds a credential"):
        train_on_ray(url, str(folder), str(tmp_path / "o"), TrainConfig(), storage_options=creds)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ErError, match="holds a credential"):
        predict(url, [str(tmp_path / "m")], [str(folder)], str(tmp_path / "p.jsonl"), storage_options=creds)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"cache": url, "output": "o", "tasks": [str(folder)], "storage_options": creds}))
    with pytest.raises(ErError, match="holds a credential") as e:
        load_sweep(sweep)
    assert "S3KR1T" not in str(e.value)


def _files_with(marker: bytes, folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and marker in p.read_bytes()]


def test_secret_key_reaches_no_log_cache_checkpoint_or_output(tiny_bert, tmp_path, ray_tmp, monkeypatch):
    import s3fs

    marker = f"er-secret-{uuid.uuid4().hex}"
    task = write_tiny_task(tmp_path / "task", sizes=(("train", 64), ("dev", 16), ("test", 16)))
    out = ray_tmp / "out"
    # Everything the commands and their Ray write lands under ray_tmp: Ray's sessions, temp files
    # (checkpoints), anything under HOME (~/ray_results), and the output.
    (ray_tmp / "home").mkdir()
    for name in [n for n in os.environ if n.startswith("AWS_")]:  # weed takes its identity from these if set
        monkeypatch.delenv(name)
    with SeaweedS3(tmp_path / "weed", secret_key=marker) as server:  # only its own config holds the marker
        env = {**os.environ, **server.env(), "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
               "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(ray_tmp), "HOME": str(ray_tmp / "home")}
        env.pop("RAY_ADDRESS", None)
        cache = f"s3://{server.bucket}/cache"
        for cmd in (["ingest", str(task), "--cache", cache, "--model", tiny_bert, "--layer", "2"],
                    ["train", "--cache", cache, "--task", str(task), "--out", str(out), "--workers", "1", "--epochs", "1",
                     "--cpus-per-worker", "0.5"]):
            r = subprocess.run([sys.executable, "-m", "pipelines.cli", *cmd], env=env, cwd=ROOT, capture_output=True,
                               text=True, timeout=900)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
            assert marker not in r.stdout + r.stderr

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
        objects = fs.find(f"{server.bucket}/cache")
        leaks = [o for o in objects if marker.encode() in fs.cat_file(o)]
    # Grepped what there is to grep: the cache, both commands' Ray sessions and logs, the output.
    assert any("/_log/" in o for o in objects) and any(o.endswith(".parquet") for o in objects)
    sessions = glob.glob(f"{ray_tmp}/ray/session_2*")
    assert len(sessions) == 2 and all(glob.glob(f"{s}/logs/raylet.out") for s in sessions)
    assert glob.glob(f"{out}/**/metrics.json", recursive=True)
    assert leaks + _files_with(marker.encode(), ray_tmp) == []
