"""Storage faults fail fast and end in one `er` line naming the URL and the endpoint; the traceback only on request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from er_core.store.storage import explain_storage_error, url_to_fs
from pipelines.cli import main as er

ROOT = Path(__file__).resolve().parents[1]


def _dead_endpoint() -> str:
    """A local port where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _er(*args, env: dict, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env={**env, "PYTHONPATH": str(ROOT)},
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - t0


def _aws_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ER_"))}
    env.update(RAY_AUTH_MODE="disabled", AWS_EC2_METADATA_DISABLED="true", AWS_REGION="us-east-1")
    env.update(overrides)
    return env


def _one_error_line(stderr: str, cmd: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("er ")]
    assert len(lines) == 1 and lines[0].startswith(f"er {cmd}: error: "), stderr[-3000:]
    return lines[0]


def test_ingest_to_an_unreachable_endpoint_fails_fast_in_one_line(tmp_path, tiny_bert):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the protein binds gene {i}"}) + "\n" for i in range(5)))
    endpoint = _dead_endpoint()
    env = _aws_env(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    out, seconds = _er("ingest", str(corpus), "--cache", "s3://bucket/x", "--model", tiny_bert, "--layer", "2", env=env)
    assert out.returncode != 0
    assert seconds < 30, f"took {seconds:.1f} s"
    line = _one_error_line(out.stderr, "ingest")
    assert endpoint in line and "s3://bucket/x" in line and "cannot connect" in line

    out, _ = _er("cache", "info", "s3://bucket/x", "--verbose", env=env)  # the traceback, on request
    assert out.returncode == 2 and "Traceback" in out.stderr and endpoint in out.stderr.splitlines()[-1]


def test_missing_credentials_are_one_line(s3, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    env = _aws_env(AWS_ENDPOINT_URL=s3.endpoint_url, AWS_SHARED_CREDENTIALS_FILE=str(empty), AWS_CONFIG_FILE=str(empty))
    out, _ = _er("cache", "verify", f"s3://{s3.bucket}/nothing", env=env)
    assert out.returncode == 2
    line = _one_error_line(out.stderr, "cache")
    assert "no S3 credentials" in line and s3.endpoint_url in line and "AWS_ACCESS_KEY_ID" in line


def test_wrong_secret_is_access_denied_in_one_line(s3):
    env = _aws_env(**{**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong"})
    out, _ = _er("cache", "info", f"s3://{s3.bucket}/nothing", env=env)
    assert out.returncode == 2
    line = _one_error_line(out.stderr, "cache")
    assert "denied" in line and s3.endpoint_url in line and "credentials" in line


def test_cache_path_that_is_a_file(tmp_path, tiny_bert, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "the gene"}) + "\n")
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert er(["ingest", str(corpus), "--cache", str(f), "--model", tiny_bert, "--layer", "2", "--local"]) == 2
    line = _one_error_line(capsys.readouterr().err, "ingest")
    assert f"{f} is a file, not a folder" in line
    assert er(["cache", "verify", str(f / "sub")]) == 2
    assert f"{f} is a file, not a folder" in _one_error_line(capsys.readouterr().err, "cache")
    assert f.read_text() == "mine"


def test_an_unexpected_error_is_one_line_too(tmp_path, monkeypatch, capsys):
    import er_core

    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(er_core, "open_cache", boom)
    assert er(["cache", "info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "er cache: error: RuntimeError: boom (run with --verbose for the traceback)\n"
    assert er(["--verbose", "cache", "info", str(tmp_path)]) == 1  # before the subcommand ...
    assert "Traceback" in capsys.readouterr().err
    assert er(["cache", "info", str(tmp_path), "--verbose"]) == 1  # ... or after it
    assert "Traceback" in capsys.readouterr().err


def test_errors_from_ray_tasks_are_explained_through_the_wrapper():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError
    from ray.exceptions import RayTaskError

    cause = EndpointConnectionError(endpoint_url="http://10.1.2.3:9000/b/k")
    wrapped = RayTaskError("read_rows", "Traceback ...", cause).as_instanceof_cause()
    err = explain_storage_error(wrapped, "s3://b/cache", {"client_kwargs": {"endpoint_url": "http://10.1.2.3:9000"}})
    assert err is not None and "cannot connect to the S3 endpoint http://10.1.2.3:9000 for s3://b/cache" in str(err)
    try:
        try:
            raise NoCredentialsError()
        except NoCredentialsError as e:
            raise OSError("while opening") from e
    except OSError as e:
        assert "no S3 credentials" in str(explain_storage_error(e, "s3://b/c"))
    assert explain_storage_error(ValueError("not storage")) is None


def test_s3_timeouts_and_retries_reach_botocore_and_options_stay_untouched(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    from pipelines.cli import build_parser, storage_options

    fs, _ = url_to_fs("s3://bucket/defaults", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}})
    fs.connect()
    cfg = fs.s3.meta.config
    assert (cfg.connect_timeout, cfg.read_timeout) == (3.0, 30.0)
    assert cfg.retries == {"total_max_attempts": 3, "mode": "standard"} and fs.retries == 1

    args = build_parser().parse_args(["cache", "info", "s3://bucket/flags", "--s3-connect-timeout", "1.5",
                                      "--s3-read-timeout", "7", "--s3-retries", "0"])
    opts = storage_options(args)
    frozen = json.dumps(opts, sort_keys=True)
    for _ in range(2):  # botocore rewrites the retries dict it gets: ours must not change
        fs, _ = url_to_fs("s3://bucket/flags", {**opts, "client_kwargs": {"endpoint_url": "http://127.0.0.1:2"}})
        fs.connect()
        cfg = fs.s3.meta.config
        assert (cfg.connect_timeout, cfg.read_timeout, cfg.retries["total_max_attempts"]) == (1.5, 7.0, 1)
    assert json.dumps(opts, sort_keys=True) == frozen

    monkeypatch.setenv("ER_S3_RETRIES", "5")
    fs, _ = url_to_fs("s3://bucket/env", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:3"}})
    fs.connect()
    assert fs.s3.meta.config.retries["total_max_attempts"] == 6
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cache", "info", "x", "--s3-retries", "-1"])
