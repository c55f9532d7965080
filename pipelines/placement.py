"""Fit er's Ray work to the cluster it runs on: size the ingest actor pool from the nodes, refuse a request the
cluster can never run (instead of waiting forever), and refuse local paths that some node cannot see.

`Cluster.current()` reads the nodes from Ray once; everything else is pure and unit-tested without Ray.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from er_core.errors import ErError

# Local path prefixes that every node mounts at the same place (an NFS share, say), separated by ':'.
SHARED_PATHS_ENV = "ER_SHARED_PATHS"


@dataclass(frozen=True)
class Node:
    id: str
    host: str  # the node's IP: nodes on one host see the same local files
    cpus: float = 0.0
    gpus: float = 0.0


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    driver: str  # node id of this process
    local: bool = False  # a Ray of this machine only (er's own, or the caller's ray.init): size by real cores

    @classmethod
    def current(cls, local: bool) -> Cluster:
        import ray

        nodes = tuple(Node(n["NodeID"], n["NodeManagerAddress"], float(n["Resources"].get("CPU", 0)),
                           float(n["Resources"].get("GPU", 0))) for n in ray.nodes() if n.get("Alive"))
        return cls(nodes, ray.get_runtime_context().get_node_id(), local)

    @property
    def host(self) -> str:
        return next((n.host for n in self.nodes if n.id == self.driver), "")

    def total(self, kind: str) -> int:
        # Whole units per node: an actor takes one whole CPU or GPU, and never spans nodes.
        return sum(int(getattr(n, kind)) for n in self.nodes)

    def describe(self) -> str:
        return f"{len(self.nodes)} node(s), {self.total('cpus')} CPUs, {self.total('gpus')} GPUs"


@dataclass
class Pool:
    size: int
    num_gpus: float
    num_cpus: float
    threads: int


def plan_pool(cluster: Cluster, actors: int | None = None, threads: int | None = None, blocks: int | None = None) -> Pool:
    """One actor per GPU when the cluster has GPUs; else one single-threaded actor per CPU, less one CPU; never
    more than `blocks`, the most calls the corpus can make (an actor without one would only load the model).

    Ray Data's own tasks (reading remote sources, re-blocking rows into shards) need a whole CPU
    somewhere, so the pool always leaves one free: actors take whole CPUs and nodes have whole
    CPUs, so one free CPU in total is one free CPU on some node. A local Ray declares more logical
    CPUs than cores on purpose (so Train never starves Data), so there the pool is sized by cores.
    One thread per actor measured best on CPU (benchmarks/bench_ingest.py). A request that can
    never fit is an ErError at once, not an endless wait for resources.
    """
    cpus, gpus = cluster.total("cpus"), cluster.total("gpus")
    cores = min(cpus, os.cpu_count() or 1) if cluster.local else cpus
    if cpus < 1:
        raise ErError(f"the Ray cluster has no CPU ({cluster.describe()}): er ingest needs one for Ray Data to read "
                      "and re-block the corpus; add a node with CPUs")
    if gpus:
        size = actors or _fewest(gpus, blocks)
        if size > gpus:
            raise ErError(f"--actors {size} needs {size} GPUs (one per actor), but the Ray cluster has {gpus} "
                          f"({cluster.describe()}): ask for at most {gpus}, or leave --actors out")
        hosts = [n for n in cluster.nodes if n.gpus >= 1]
        # A CPU beside each GPU actor when every GPU node has one per GPU and one CPU stays free for reading.
        num_cpus = 1.0 if all(n.cpus >= int(n.gpus) for n in hosts) and cpus >= size + 1 else 0.0
        return Pool(size, 1, num_cpus, threads or _threads(cores, size, hosts, cluster.local))
    room = cpus - 1  # actors that fit with one CPU left for Ray Data's tasks
    if room < 1:
        raise ErError(f"the Ray cluster has {cpus} CPU ({cluster.describe()}): er ingest without GPUs needs at least "
                      "2, one for an actor and one to read with")
    if actors and actors > room:
        raise ErError(f"--actors {actors} needs {actors + 1} CPUs (one per actor and one to read with), but the Ray "
                      f"cluster has {cpus} ({cluster.describe()}): ask for at most {room}, or leave --actors out")
    size = actors or _fewest(max(1, min(cores, room)), blocks)
    return Pool(size, 0, 1.0, threads or _threads(cores, size, [n for n in cluster.nodes if n.cpus >= 1], cluster.local))


def _fewest(size: int, blocks: int | None) -> int:
    return size if blocks is None else max(1, min(size, blocks))


def _threads(cores: int, size: int, hosts: list[Node], local: bool) -> int:
    """Torch threads per actor: the cores of a node shared by the actors it gets (1 when the pool fills them)."""
    n = 1 if local else max(len(hosts), 1)
    return max(1, (cores // n) // math.ceil(size / n))


def check_shared(url: str, cluster: Cluster, what: str) -> None:
    """Refuse a local path that Ray workers use if some node cannot see it.

    Every node on the driver's host sees every local path (a laptop, or several nodes on one
    machine). A node on another host sees it only if it is under a mount listed in
    $ER_SHARED_PATHS; otherwise the path must be on object storage.
    """
    if "://" in url and not url.startswith("file://"):
        return
    path = os.path.abspath(url.removeprefix("file://"))
    others = sorted({n.host for n in cluster.nodes} - {cluster.host})
    shared = [os.path.abspath(p) for p in os.environ.get(SHARED_PATHS_ENV, "").split(":") if p]
    if not others or any(os.path.commonpath([path, p]) == p for p in shared):
        return
    raise ErError(f"the {what} {url} is a local path, but the Ray cluster has nodes on other hosts "
                  f"({', '.join(others)}) that cannot see it: put it on shared storage (s3://bucket/...), or, if "
                  f"every node mounts it at the same place, add that mount to ${SHARED_PATHS_ENV}")


def read_args(sources) -> dict:
    """Ray options of the tasks that read corpus sources. They reserve no CPU (the read pool's size bounds how many
    run at once): a CPU each kept actors of the pool pending on a 4-CPU head+worker cluster until a small run was
    over. Local files exist on the driver's host: read them on its node (a 0-CPU head is the usual layout).
    Remote sources read anywhere."""
    import ray

    if all("://" in s.url for s in sources):
        return {"num_cpus": 0}
    return {"num_cpus": 0, "label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}
