"""Outputs are never destroyed: every command refuses a folder or file it did not write, `--overwrite` replaces
only er's own files, and a failure while writing leaves nothing that looks complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from er_core import ErError, TrainConfig, finetune
from er_core.artifacts import read_meta
from er_core.outputs import MARKER, OutputDir, read_status
from pipelines.cli import main as er

QUICK = ["--epochs", "1", "--batch-size", "16"]


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def _untouched(path: Path) -> None:
    assert sorted(p.name for p in path.iterdir()) == ["thesis.tex"]
    assert (path / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("workers", ["0", "1"])
def test_train_refuses_a_folder_holding_user_files(tiny_cache, tmp_path, capsys, workers):
    url, folder, _ = tiny_cache
    out = _user_folder(tmp_path / "results")
    argv = ["train", "--cache", url, "--task", str(folder), "--out", str(out), "--workers", workers, *QUICK]
    assert er(argv) == 2
    assert "holds files er did not write (thesis.tex)" in capsys.readouterr().err
    _untouched(out)
    assert er(argv + ["--overwrite"]) == 2  # --overwrite never removes what er did not write
    _untouched(out)


def test_predict_sweep_and_demo_refuse_user_files(tiny_cache, tmp_path, capsys):
    url, folder, _ = tiny_cache
    user_file = tmp_path / "preds.jsonl"
    user_file.write_text("my own notes\n")
    for flags in ([], ["--overwrite"]):  # refused before any work, and --overwrite does not make it ours
        assert er(["predict", "--cache", url, "--model-dir", str(tmp_path / "m"), "--corpus", str(folder),
                   "--out", str(user_file), *flags]) == 2
        assert user_file.read_text() == "my own notes\n"
    assert "already exists" in capsys.readouterr().err

    out = _user_folder(tmp_path / "sweep-out")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"cache": url, "output": str(out), "tasks": [str(folder)]}))
    assert er(["sweep", str(sweep)]) == 2
    assert er(["sweep", str(sweep), "--overwrite"]) == 2
    _untouched(out)

    work = _user_folder(tmp_path / "demo")
    assert er(["demo", str(folder), "--workdir", str(work), "--local"]) == 2
    _untouched(work)
    assert "holds files er did not write" in capsys.readouterr().err


def test_overwrite_replaces_an_earlier_run_and_only_that(tiny_cache, tmp_path, capsys):
    url, folder, _ = tiny_cache
    out = tmp_path / "run"
    argv = ["train", "--cache", url, "--task", str(folder), "--out", str(out), "--workers", "0", *QUICK]
    assert er(argv) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert read_status(out)["status"] == "complete" and not (out / "checkpoints").exists()

    assert er(argv) == 2  # an earlier er output: refused without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text()) == first

    assert er(argv[:-4] + ["--epochs", "2", "--batch-size", "16", "--overwrite"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 2

    (out / "notes.txt").write_text("mine")  # a user file beside er's: --overwrite must refuse
    assert er(argv + ["--overwrite"]) == 2
    assert (out / "notes.txt").read_text() == "mine" and (out / "er_model.json").exists()


def test_empty_folder_is_fine_and_a_file_is_not(tiny_cache, tmp_path):
    url, folder, _ = tiny_cache
    empty = tmp_path / "empty"
    empty.mkdir()
    finetune(url, str(folder), str(empty), TrainConfig(epochs=1), progress=False, log=lambda r: None)
    assert read_meta(empty)["method"] == "reduced"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ErError, match="is a file"):
        OutputDir.claim(str(a_file), "train")


def test_failure_while_writing_leaves_nothing_that_looks_complete(tiny_cache, tmp_path, monkeypatch):
    url, folder, _ = tiny_cache
    import safetensors.torch as st  # what er_core.artifacts saves with (imported where it saves)

    real, calls = st.save_file, []

    def fail_second(*a, **kw):  # the head's file fails after the upper layers' file is written
        calls.append(a)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real(*a, **kw)

    monkeypatch.setattr(st, "save_file", fail_second)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="injected"):
        finetune(url, str(folder), str(out), TrainConfig(epochs=1), progress=False, log=lambda r: None)
    assert read_status(out)["status"] == "failed"
    assert not (out / "er_model.json").exists() and not (out / "metrics.json").exists()
    with pytest.raises(ErError, match="not a complete trained model"):
        read_meta(out)

    # a crash in the middle of moving the staged files into place: still not complete
    monkeypatch.setattr(st, "save_file", real)
    import er_core.outputs as outputs

    real_replace, moved = outputs.os.replace, []

    def crash_after_one(src, dst):
        real_replace(src, dst)
        if ".staging-" in str(src):  # the first staged file moved into place, then a kill: nothing after it runs
            moved.append(dst)
            raise KeyboardInterrupt
    monkeypatch.setattr(outputs.os, "replace", crash_after_one)
    out2 = tmp_path / "run2"
    with pytest.raises(KeyboardInterrupt):
        finetune(url, str(folder), str(out2), TrainConfig(epochs=1), progress=False, log=lambda r: None)
    assert len(moved) == 1 and read_status(out2)["status"] != "complete"
    with pytest.raises(ErError, match="not a complete trained model"):
        read_meta(out2)


def test_marker_lists_what_er_wrote(tiny_cache, tmp_path):
    url, folder, _ = tiny_cache
    out = tmp_path / "run"
    finetune(url, str(folder), str(out), TrainConfig(epochs=1), progress=False, log=lambda r: None)
    marker = json.loads((out / MARKER).read_text())
    on_disk = {p.name for p in out.iterdir()} - {MARKER}
    assert set(marker["entries"]) == on_disk == {"er_model.json", "metrics.json", "upper.safetensors", "head.safetensors"}
    assert marker["request"]["task"] == str(folder) and "secret" not in json.dumps(marker).lower()
