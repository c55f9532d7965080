"""Batches reach the training device in order, made ahead of the step on a GPU."""

from __future__ import annotations

import pytest
import torch


def test_prefetched_batches_come_in_order_and_errors_reach_the_training_thread():
    from er_core.devices import prefetched

    cpu = torch.device("cpu")
    batches = [{"x": torch.full((2,), i)} for i in range(7)]
    for threaded in (False, True):
        assert [int(b["x"][0]) for b in prefetched(iter(batches), cpu, threaded=threaded)] == list(range(7))

    def failing():
        yield batches[0]
        raise ValueError("bad row")

    got = prefetched(failing(), cpu, threaded=True)
    assert int(next(got)["x"][0]) == 0
    with pytest.raises(ValueError, match="bad row"):
        next(got)
    early = prefetched(iter(batches), cpu, threaded=True)
    next(early)
    early.close()  # a run stopped mid-epoch leaves no thread behind
    import threading

    assert not any(t.name == "er-prefetch" and t.is_alive() for t in threading.enumerate())
