"""Shared fixtures: tiny saved models with a tokenizer, the real data folder; the S3 server, the session's local Ray
and local multi-node Ray clusters come from plugins."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


def pytest_sessionstart(session):
    """The same suite however it is launched: a shell script's background job (`cmd &`, nohup) starts with SIGINT
    ignored, which every er subprocess and Ray process would inherit, so the Ctrl-C tests could not interrupt them."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session):
    if _SPECS:
        shutil.rmtree(_SPECS, ignore_errors=True)


pytest_plugins = ["tests.conftest_s3", "tests.conftest_ray", "tests.conftest_cluster"]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The specs er's drivers remember (er_core.model_specs) go to a folder of this run, not the user's ~/.cache;
# the suite's subprocesses inherit it, as a user's commands share theirs. Under pytest-xdist each worker gets its own
# (a worker inherits the controller's): a test plants a wrong spec on purpose, which must not reach the other worker.
_OWN = "ER_SPECS" not in os.environ or "PYTEST_XDIST_WORKER" in os.environ
_SPECS = tempfile.mkdtemp(prefix="er-specs-") if _OWN else None
os.environ["ER_SPECS"] = _SPECS or os.environ["ER_SPECS"]

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"

# A word-level vocabulary small enough for the tiny configs (vocab 100) yet covering test sentences.
WORDS = (
    "the a of and to in is was with for on by that as at from this be are it an or not protein gene disease "
    "cell cells patients drug inhibitor binds activates cancer mutation results study method we show "
    "background result effect level expression human receptor treatment increased reduced"
).split()


def save_tiny(name: str, folder: Path, seed: int = 0, **config) -> Path:
    """A tiny random model of family `name` (`config`: fields to change) plus a WordPiece tokenizer, as an HF folder."""
    from transformers import BertTokenizerFast

    from tests.tiny_models import VOCAB, make_tiny

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,()-")
    vocab = (specials + WORDS + letters + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"])[:VOCAB]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=48)
    model = make_tiny(name, seed=seed, **config)
    if model.config.pad_token_id is None or model.config.pad_token_id != tok.pad_token_id:
        model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return str(save_tiny("bert", tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real task data not found at {DATA}")
    return DATA


@pytest.fixture
def tiny_task(tmp_path) -> Path:
    """A small classification task folder in the JSONL format."""
    import json
    import random

    rnd = random.Random(0)
    folder = tmp_path / "tiny-task"
    folder.mkdir()
    for split, n in (("train", 48), ("dev", 16), ("test", 16)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = ["inhibitor", "activates"][i % 2]
                words = [rnd.choice(WORDS) for _ in range(rnd.randint(3, 12))]
                words.insert(rnd.randint(0, len(words)), label)  # the label word makes the task learnable
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return folder


def write_tiny_task(folder: Path, sizes=(("train", 256), ("dev", 48), ("test", 48)), seed: int = 0) -> Path:
    """A learnable two-class JSONL task: the label word is in the text, and only there."""
    import json
    import random

    rnd = random.Random(seed)
    labels = ["inhibitor", "activates"]
    fillers = [w for w in WORDS if w not in labels]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = labels[i % 2]
                words = [rnd.choice(fillers) for _ in range(rnd.randint(3, 10))]
                words.insert(rnd.randint(0, len(words)), label)
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_cache(tiny_bert, tmp_path_factory):
    """(cache url, task folder, recycler): the tiny task ingested at k=2, fp32; shared by the whole session.

    256 train examples: enough for the tiny model to reach ~0.85 test accuracy in 3 epochs, so runs can be compared.
    """
    from er_core import Recycler, ingest_local, load_task
    from er_core.tasks import example_input

    folder = write_tiny_task(tmp_path_factory.mktemp("tiny-cache-task") / "tiny")
    rec = Recycler.load(tiny_bert, layer=2, codec="fp32")
    task = load_task(folder)
    url = str(tmp_path_factory.mktemp("tiny-cache") / "c")
    ingest_local((example_input(e) for exs in task.splits.values() for e in exs), url, rec, progress=False)
    return url, folder, rec
