"""Ports for test servers, and a cluster start that loses a port to another process and starts again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import conftest_cluster as cc
from tests.ports import free_ports, port_range


def test_ports_are_free_distinct_outside_the_ephemeral_range_and_never_given_twice():
    low, high = port_range()
    first, last = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[:2])
    assert high <= first or low > last  # no outgoing connection can take one
    assert low >= 20000  # nor a Ray worker (ray start binds 10002-19999)
    a, b = free_ports(20), free_ports(20)
    assert len(set(a + b)) == 40 and all(low <= p < high for p in a + b)


@pytest.mark.parametrize("log, error", [("E1205 add_port.cc:83] Failed to add port ... Address already in use", cc._PortTaken),
                                        ("some other failure", RuntimeError)])
def test_a_node_that_exits_on_a_taken_port_is_told_apart(log, error):
    cluster = cc.LocalCluster(cc.CPU_HEAD)
    try:
        (cluster.root / "head.log").write_text(log)
        cluster.procs["head"] = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        cluster.procs["head"].wait()
        with pytest.raises(RuntimeError) as got:
            cluster._wait_nodes(1, timeout=5)
        assert type(got.value) is error and "exited (1)" in str(got.value)
    finally:
        cluster.stop()
    assert not cluster.root.exists()


def test_a_start_that_lost_a_port_starts_again_on_new_ports(monkeypatch):
    cluster, tries = cc.LocalCluster(cc.CPU_HEAD), []

    def start_once(self):
        tries.append((self.address, self.root))
        if len(tries) == 1:
            raise cc._PortTaken("Ray node head exited (1)")
        return self

    monkeypatch.setattr(cc.LocalCluster, "_start_once", start_once)
    try:
        assert cluster.start() is cluster and len(tries) == 2
        (addr1, root1), (addr2, root2) = tries
        assert addr1 != addr2 and cluster.env["RAY_ADDRESS"] == addr2 and not root1.exists() and root2.exists()
    finally:
        cluster.stop()
