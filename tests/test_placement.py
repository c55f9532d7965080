"""Fitting er's Ray work to the cluster (no Ray): a request the nodes can never run is refused in one line, and a
local path is used only where every node sees it. Pool sizing itself: tests/test_ingest.py."""

from __future__ import annotations

import pytest

from er_core import ErError
from pipelines.placement import SHARED_PATHS_ENV, Cluster, Node, check_shared, plan_pool


def _cluster(*nodes: tuple[str, float, float]) -> Cluster:
    """(host, CPUs, GPUs) per node; the driver on the first (the head)."""
    return Cluster(tuple(Node(f"n{i}", h, c, g) for i, (h, c, g) in enumerate(nodes)), "n0")


ONE_HOST = _cluster(("10.0.0.1", 2, 0), ("10.0.0.1", 2, 0))
TWO_HOSTS = _cluster(("10.0.0.1", 0, 0), ("10.0.0.2", 4, 0))


@pytest.mark.parametrize("cluster, actors, says", [
    (ONE_HOST, 4, r"--actors 4 needs 5 CPUs \(one per actor and one to read with\), but the Ray cluster has 4 .*at most 3"),
    (_cluster(("h", 0, 0), ("h", 8, 2)), 3, r"--actors 3 needs 3 GPUs \(one per actor\), but the Ray cluster has 2"),
    (_cluster(("h", 0, 0), ("h", 1, 0)), None, r"has 1 CPU .*needs at least 2"),
    (_cluster(("h", 0, 0), ("h", 0, 2)), None, r"has no CPU"),
])
def test_a_request_that_can_never_fit_is_refused(cluster, actors, says):
    with pytest.raises(ErError, match=says):
        plan_pool(cluster, actors)


def test_the_largest_request_that_fits_is_accepted():
    assert plan_pool(ONE_HOST, actors=3).size == 3
    assert plan_pool(_cluster(("h", 0, 0), ("h", 8, 2)), actors=2).size == 2


def test_local_paths_are_used_only_where_every_node_sees_them(monkeypatch, tmp_path):
    monkeypatch.delenv(SHARED_PATHS_ENV, raising=False)
    for url in ("s3://bucket/cache", "gs://bucket/cache"):
        check_shared(url, TWO_HOSTS, "cache")  # object storage: every node reaches it
    check_shared(str(tmp_path / "cache"), ONE_HOST, "cache")  # every node on the driver's host
    check_shared("relative/cache", _cluster(("10.0.0.1", 8, 0)), "cache")  # a laptop
    for url in (str(tmp_path / "cache"), f"file://{tmp_path}/cache"):
        with pytest.raises(ErError, match=r"the cache .* is a local path, but the Ray cluster has nodes on other hosts "
                                          r"\(10\.0\.0\.2\).*s3://.*ER_SHARED_PATHS"):
            check_shared(url, TWO_HOSTS, "cache")

    monkeypatch.setenv(SHARED_PATHS_ENV, f"/nowhere:{tmp_path}")  # a mount every node has
    check_shared(str(tmp_path / "cache"), TWO_HOSTS, "cache")
    with pytest.raises(ErError, match="local path"):
        check_shared(f"{tmp_path}-other/cache", TWO_HOSTS, "cache")  # a prefix of the name is not the mount
