"""The newer families end to end on tiny random weights: ingest -> train (reduced, lora) -> predict, hits equal misses."""

from __future__ import annotations

import pytest

from er_core import Recycler, TrainConfig, finetune, ingest_local, load_task, open_cache
from er_core.predict import MultiTaskPredictor
from er_core.tasks import example_input
from tests.conftest import save_tiny, write_tiny_task


@pytest.mark.parametrize("method", ["reduced", "lora"])
@pytest.mark.parametrize("name", ["mpnet", "modernbert"])
def test_family_ingests_trains_and_predicts(name, method, tmp_path):
    folder = write_tiny_task(tmp_path / "task", sizes=(("train", 64), ("dev", 16), ("test", 16)))
    rec = Recycler.load(str(save_tiny(name, tmp_path / "m")), layer=2, codec="fp32")
    task = load_task(folder)
    url = str(tmp_path / "c")
    ingest_local([example_input(e) for exs in task.splits.values() for e in exs], url, rec, progress=False)
    out = tmp_path / "out"
    m = finetune(url, str(folder), str(out), TrainConfig(method=method, epochs=2, lr=1e-3, batch_size=8, seed=0),
                 progress=False, log=lambda r: None)
    assert set(m["test"]) >= {"micro_f1", "macro_f1"}
    reader = open_cache(url)
    pred = MultiTaskPredictor([str(out)], reader.spec)
    exs = task.splits["test"]
    rows = reader.load([rec.key(example_input(e)) for e in exs])
    hits = pred.predict(exs, [rows.hidden(rows.index[rec.key(example_input(e))]) for e in exs])
    assert hits == pred.predict(exs, [None] * len(exs))  # misses run the lower part: the same answers
