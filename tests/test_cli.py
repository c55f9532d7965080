"""The `er` command line: every subcommand explains itself, and bad input exits non-zero with a message."""

from __future__ import annotations

import pytest

from pipelines.cli import build_parser, main

SUBCOMMANDS = ["ingest", "train", "sweep", "predict", "bench", "advise", "cache", "demo", "cleanup"]


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out.splitlines()) > 3


def test_missing_cache_is_a_clear_error(tmp_path, capsys):
    assert main(["cache", "info", str(tmp_path / "nope")]) == 2
    assert "no er cache" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,says", [("--epochs", "0", "epochs (0)"), ("--lr", "-1", "lr (-1.0)"),
                                              ("--workers", "-1", "workers (-1)"), ("--s3-retries", "-1", "s3_retries")])
def test_bad_training_options_are_usage_errors_by_the_configs_own_checks(tmp_path, capsys, flag, value, says):
    with pytest.raises(SystemExit) as e:
        main(["train", "--cache", str(tmp_path), "--task", str(tmp_path), "--out", str(tmp_path / "o"), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err, err


@pytest.mark.parametrize("flag,value,says", [("--shard-rows", "0", "shard_rows must be a positive integer"),
                                              ("--commit-seconds", "0", "commit_seconds must be > 0")])
def test_bad_ingest_options_are_usage_errors_by_the_configs_own_checks(tmp_path, capsys, flag, value, says):
    with pytest.raises(SystemExit) as e:
        main(["ingest", str(tmp_path), "--cache", str(tmp_path / "c"), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err, err


def test_a_model_folder_given_relative_is_made_absolute_for_workers_and_the_manifest(tmp_path, monkeypatch):
    from pipelines.configs import IngestConfig

    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)  # Ray workers resolve a relative path in their own folder: the Hub, for "my-model"
    assert IngestConfig(model="my-model").model == str(tmp_path / "my-model")
    assert IngestConfig(model="org/not-a-folder-here").model == "org/not-a-folder-here"  # a Hub id stays one


COMMAND_LEVEL = {"help", "overwrite", "resume", "verbose", "config", "print_config", "address"}


def test_every_train_flag_is_a_config_field_and_every_field_a_flag():
    """The flags of `er train` are generated from TrainRun, TrainConfig and StorageConfig: no flag without a field,
    no field without a flag, one help text each (the field's)."""
    from dataclasses import fields

    from pipelines.configs import TRAIN_CONFIGS

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions} - COMMAND_LEVEL
    names = {f.name for c in TRAIN_CONFIGS for f in fields(c)}
    assert dests == names, (dests - names, names - dests)
    helps = {a.dest: a.help for a in train._actions}
    assert all(helps[f.name].replace("%%", "%").startswith(f.metadata["help"]) for c in TRAIN_CONFIGS for f in fields(c))


def test_every_ingest_flag_is_a_config_field_and_every_field_a_flag():
    from dataclasses import fields

    from er_core.store.storage import StorageConfig
    from pipelines.configs import INGEST_FLAGLESS, IngestConfig

    ingest = build_parser()._subparsers._group_actions[0].choices["ingest"]
    dests = {a.dest for a in ingest._actions} - COMMAND_LEVEL - {"corpus", "cache", "address"}
    names = {f.name for c in (IngestConfig, StorageConfig) for f in fields(c)} - set(INGEST_FLAGLESS)
    assert dests == names, (dests - names, names - dests)
    helps = {a.dest: a.help for a in ingest._actions}
    assert all(helps[f.name].replace("%%", "%").startswith(f.metadata["help"]) for f in fields(IngestConfig) if f.name in names)


def test_every_sweep_flag_is_a_sweep_file_key():
    from dataclasses import fields

    from pipelines.configs import SWEEP_FLAGS, Sweep

    sweep = build_parser()._subparsers._group_actions[0].choices["sweep"]
    dests = {a.dest for a in sweep._actions} - COMMAND_LEVEL - {"sweep", "address"}
    assert dests == set(SWEEP_FLAGS) and dests <= {f.name for f in fields(Sweep)}, dests
    helps = {a.dest: a.help for a in sweep._actions}
    assert all(helps[f.name].startswith(f.metadata["help"]) for f in fields(Sweep) if f.name in dests)


def test_train_config_file_with_flags_over_it_and_print_config(tmp_path, capsys):
    import yaml

    run = tmp_path / "run.yaml"
    run.write_text("cache: ./c\ntask: ./t\nout: ./o\nmethod: lora\nlr: 2.0e-3\nepochs: 5\nendpoint_url: http://s3:9000\n")
    assert main(["train", "--config", str(run), "--epochs", "7", "--print-config"]) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    assert (got["method"], got["lr"], got["epochs"], got["cache"], got["endpoint_url"]) == ("lora", 2e-3, 7, "./c", "http://s3:9000")
    assert got["batch_size"] == 16 and got["workers"] == 1  # the fields' defaults
    assert main(["train", "--method", "reduced", "--print-config"]) == 0  # no lr: settled from the cache's encoder
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["lr"] is None and "# lr null: reduced's default, 0.0003, or 0.0001 on an encoder" in out
    assert main(["train", "--method", "lora", "--print-config"]) == 0  # the head's rate is settled by width too
    assert "# head_lr null: lora's default, lr, or 0.01 on an encoder of hidden size >= 768" in capsys.readouterr().out
    run.write_text("method: lora\nlearning_rate: 1.0e-3\n")
    assert main(["train", "--config", str(run), "--print-config"]) == 2
    assert "unknown setting(s) learning_rate" in capsys.readouterr().err


def test_import_graph_runs_one_way():
    """er_core never imports pipelines; no program imports the CLI; nothing installed imports a top-level benchmarks."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imports(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return found

    for pkg in ("er_core", "pipelines", "benchmarks"):
        for path in (root / pkg).rglob("*.py"):
            if "io_probe" in path.parts:
                continue  # a sitecustomize the I/O benchmark puts on PYTHONPATH, not installed code
            names = imports(path)
            top = {n.split(".")[0] for n in names}
            assert "benchmarks" not in top, path
            if pkg == "er_core":
                assert "pipelines" not in top and "ray" not in top, path
            if pkg == "pipelines" and path.name != "cli.py":
                assert not {"pipelines.cli", "pipelines.cli.main"} & names, path


def test_no_exported_name_of_er_core_is_also_one_of_its_modules():
    """`from er_core import X` must give the function, not a module of the same name that another import loaded
    first (the package exports its names lazily, and loading a submodule sets the package attribute)."""
    from pathlib import Path

    import er_core

    modules = {p.stem for p in Path(er_core.__file__).parent.glob("*.py")}
    assert not modules & set(er_core._EXPORTS), modules & set(er_core._EXPORTS)


def test_er_core_public_api_is_small_and_pinned():
    import er_core

    assert er_core.__all__ == ["load_encoder", "split_encoder", "Recycler", "ingest_local", "open_cache", "CacheSpec",
                               "load_task", "Task", "Example", "TrainConfig", "finetune", "MultiTaskPredictor",
                               "export_model", "ErError"]
    for name in er_core.__all__:
        assert getattr(er_core, name).__name__ == name
    from er_core import errors

    specific = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, er_core.ErError) and v is not er_core.ErError]
    assert specific and not set(er_core.__all__) & {c.__name__ for c in specific}


@pytest.mark.real
def test_readme_library_example_runs_with_public_names_only(tmp_path, data_dir, monkeypatch):
    import re
    from pathlib import Path

    import er_core

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## The library.*?```python\n(.*?)```", readme, re.S).group(1)
    used = {n.strip() for line in re.findall(r"^from er_core import (.+)$", code, re.M) for n in line.split(",")}
    assert used and used <= set(er_core.__all__) and "er_core." not in code.replace("from er_core import", "")
    task = next(p for p in sorted(data_dir.iterdir()) if (p / "train.jsonl").is_file())
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code.replace('"path/to/task"', repr(str(task))), scope)
    assert 0 <= scope["m"]["test"]["micro_f1"] <= 1 and (tmp_path / "my-run" / "metrics.json").is_file()


def test_sweep_help_documents_the_training_fields_from_their_definitions(capsys):
    from dataclasses import fields

    from er_core import TrainConfig

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    from pipelines.configs import Sweep

    for cls in (Sweep, TrainConfig):
        for f in fields(cls):
            if f.name != "method" or cls is Sweep:
                assert f"  {f.name} (" in out and " ".join(f.metadata["help"].split()[:4]) in " ".join(out.split()), f.name


def test_readme_settings_tables_are_the_config_fields():
    """README documents every setting from the same definitions as the flags (regenerate: python -m pipelines.configs README.md)."""
    from pathlib import Path

    from pipelines.configs import README_MARKERS, settings_tables

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin, end = README_MARKERS
    assert text.split(begin, 1)[1].split(end, 1)[0].strip() == settings_tables().strip(), \
        "README's settings block is stale: run python -m pipelines.configs README.md"
    assert "| `lr` | `--lr` |" in text and "| `shard_rows` | `--shard-rows` |" in text


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_mistyped_task_folder_fails_at_once_and_leaves_no_output(tiny_cache, tmp_path, capsys, workers):
    """Checked before the output is claimed and before Ray starts (it took 8 s and left a failed output folder)."""
    url, folder, _ = tiny_cache
    out = tmp_path / "out"
    assert main(["train", "--cache", url, "--task", str(folder / "nope"), "--out", str(out), "--workers", workers]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_ingest_settings_left_unset_come_from_an_existing_cache():
    from types import SimpleNamespace

    from pipelines.configs import IngestConfig

    spec = SimpleNamespace(model_name="/models/m", layer=2, codec="int8", tokenizer=SimpleNamespace(max_length=96))
    got = IngestConfig().against(spec)
    assert (got.model, got.layer, got.codec, got.max_length) == ("/models/m", 2, "int8", 96)
    mine = IngestConfig(model="org/other", layer="4", codec="fp32").against(spec)  # given flags win; the model's own max
    assert (mine.model, mine.layer, mine.codec, mine.max_length) == ("org/other", "4", "fp32", None)
    new = IngestConfig().against(None)
    assert (new.layer, new.codec) == ("0.5", "fp16") and new.model
