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


def test_bad_training_options_are_refused(tmp_path, capsys):
    assert main(["train", "--cache", str(tmp_path), "--task", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--epochs", "0", "--workers", "0"]) == 2
    assert "epochs" in capsys.readouterr().err


def test_no_exported_name_of_er_core_is_also_one_of_its_modules():
    """`from er_core import X` must give the function, not a module of the same name that another import loaded
    first (the package exports its names lazily, and loading a submodule sets the package attribute)."""
    from pathlib import Path

    import er_core

    modules = {p.stem for p in Path(er_core.__file__).parent.glob("*.py")}
    assert not modules & set(er_core._EXPORTS), modules & set(er_core._EXPORTS)
