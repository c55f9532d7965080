"""pytest plugin: local multi-node Ray clusters started with `ray start`, as the session-scoped `ray_cluster` fixture.

Each node is `ray start --block` in its own process group, with its own --num-cpus, free ports and short temp
dir, and token auth off. A layout's cluster is shared by every test that asks for it and stopped by process id
and group when the session ends or another layout is asked for (one cluster at a time), never with `ray stop`,
which would end every Ray on the host. Tests drive it from subprocesses only (`er ... --address`), since this
process may hold the session's in-process Ray (`ray_session`).

    @pytest.mark.parametrize("ray_cluster", [ZERO_CPU_HEAD], indirect=True, ids=str)   # without it: CPU_HEAD
    def test_x(ray_cluster):
        proc = subprocess.Popen(["er", "ingest", ..., "--address", ray_cluster.address], env=ray_cluster.env)
        proc.wait()
        ray_cluster.actor_nodes(proc.pid, "TokenizeEmbedWrite")   # names of the nodes ("head", "w1") its actors ran on
        ray_cluster.nodes(), ray_cluster.stop_node("w1", kill=True), ray_cluster.dashboard_url  # also there

Every test using the fixture is marked `cluster`, so `-m cluster` selects them and `-m "not cluster"` skips them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port

RAY = str(Path(sys.executable).with_name("ray"))
LABEL = "er-node"  # each node's name, as a Ray node label


@dataclass(frozen=True)
class Layout:
    """CPUs of the head and of each worker node; the dashboard (the Jobs API, with ray[default]) on the head if asked."""

    head_cpus: int = 2
    workers: tuple[int, ...] = (2,)
    dashboard: bool = False

    def __str__(self) -> str:
        return f"head{self.head_cpus}-" + "-".join(f"w{c}" for c in self.workers) + ("-dashboard" if self.dashboard else "")


CPU_HEAD = Layout(head_cpus=2, workers=(2,))  # head with CPUs + 1 worker node
ZERO_CPU_HEAD = Layout(head_cpus=0, workers=(2,))  # the usual production layout: nothing runs on the head


def _node_ports() -> list[str]:
    # Nodes on one host must not share a listening port; Ray's defaults (agent 52365, ...) would collide.
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port")
    return [f"--{n}={free_port()}" for n in names]


_BIND_FAILED = ("Address already in use", "Failed to bind")


class _PortTaken(RuntimeError):
    pass


class LocalCluster:
    """A head and worker nodes on this host. `address`, `env` (for subprocesses), `dashboard_url` (or None)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        # Short: Ray puts unix sockets under each node's temp dir (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="er-c", dir="/tmp"))
        self.address = f"127.0.0.1:{free_port()}"
        self.dashboard_url: str | None = None
        self.env = {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.procs: dict[str, subprocess.Popen] = {}
        self._state = None

    # ------------------------------------------------------------ start and stop

    def start(self, attempts: int = 3) -> LocalCluster:
        for attempt in range(attempts):
            try:
                return self._start_once()
            except _PortTaken:
                # Something else bound one of our ports between the pick and Ray's bind: pick all again.
                if attempt == attempts - 1:
                    raise
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = Path(tempfile.mkdtemp(prefix="er-c", dir="/tmp"))
                self.address = f"127.0.0.1:{free_port()}"
                self.env["RAY_ADDRESS"] = self.address
                self._state = None
        return self

    def _start_once(self) -> LocalCluster:
        # With grpcio (ray[default]) the head serves Ray Client on 10001 unless told otherwise: a free port instead,
        # so that two heads on this host never fight over it.
        head = ["--head", f"--port={self.address.rsplit(':', 1)[1]}", f"--include-dashboard={str(self.layout.dashboard).lower()}",
                f"--ray-client-server-port={free_port()}"]
        if self.layout.dashboard:
            port = free_port()
            head += ["--dashboard-host=127.0.0.1", f"--dashboard-port={port}"]
            self.dashboard_url = f"http://127.0.0.1:{port}"
        try:
            self._start_node("head", self.layout.head_cpus, head)
            self._wait_nodes(1)
            for i, cpus in enumerate(self.layout.workers, 1):
                self._start_node(f"w{i}", cpus, [f"--address={self.address}"])
            self._wait_nodes(1 + len(self.layout.workers))
        except BaseException:
            self.stop(keep_logs=True)  # the error points at them
            raise
        return self

    def _start_node(self, name: str, cpus: int, extra: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        # No 30 s drain on SIGTERM: these nodes serve nothing that needs it, and teardown stays quick. A killed node is
        # marked dead after 5 missed checks a second apart (Ray's default: 3 s apart), so the lost-node tests wait less.
        env = {**self.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_health_check_period_ms": "1000"}
        env.pop("RAY_ADDRESS")
        cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={self.root / name}", f"--num-cpus={cpus}",
               "--num-gpus=0", "--object-store-memory=150000000", f"--labels={LABEL}={name}", *_node_ports(), *extra]
        # A process group per node (pgid = its pid), so every daemon it spawns can be found and stopped.
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def _wait_nodes(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    log = self.log(name)
                    err = _PortTaken if any(m in log for m in _BIND_FAILED) else RuntimeError
                    raise err(f"Ray node {name} exited ({p.returncode}):\n{log[-2000:]}")
            try:
                if len([n for n in self.nodes() if n["alive"]]) >= count:
                    return
            except Exception:  # noqa: BLE001 - the GCS is not up yet
                self._state = None
            time.sleep(0.5)
        raise RuntimeError(f"{count} Ray nodes did not come up in {timeout:.0f} s; logs in {self.root}")

    def stop_node(self, name: str, kill: bool = False) -> None:
        """Stop one node: SIGTERM to its `ray start` (which ends its daemons), or SIGKILL to its whole group (`kill`,
        as a lost machine); whatever of the group is left after 20 s is killed. The shared cluster stays without it."""
        import psutil

        p = self.procs.pop(name, None)
        if p is None:
            return
        try:  # Ray's worker processes get groups of their own: find them as descendants, before anything exits
            family = psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if p.poll() is None and not kill:
            p.terminate()  # the leader only: it stops raylet, GCS and agents in order
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # anything of this node still up; our group, nobody else's
        except ProcessLookupError:
            pass
        for child in family:
            try:
                child.kill()  # psutil checks it is still the process we saw, not a reused pid
            except psutil.NoSuchProcess:
                pass
        p.wait()

    def stop(self, keep_logs: bool = False) -> None:
        """Stop every node and remove the temp dir (but the nodes' logs, with keep_logs)."""
        for name in sorted(self.procs, key=lambda n: n == "head"):  # workers first, then the head
            self.stop_node(name)
        for path in ([p for p in self.root.iterdir() if p.is_dir()] if keep_logs and self.root.exists() else [self.root]):
            shutil.rmtree(path, ignore_errors=True)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    # ------------------------------------------------------------ what Ray knows (read from the GCS, no driver)

    def _gcs(self):
        if self._state is None:
            from ray._private.state import GlobalState
            from ray._raylet import GcsClientOptions

            state = GlobalState()
            state._initialize_global_state(GcsClientOptions.create(
                self.address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
            self._state = state
        return self._state

    def nodes(self) -> list[dict]:
        """Every node Ray has seen: name, id, alive, CPUs."""
        return [{"name": n["Labels"].get(LABEL), "id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0)}
                for n in self._gcs().node_table()]

    def actor_nodes(self, driver_pid: int, class_name: str = "") -> list[str]:
        """Names of the nodes that the actors (whose class name contains `class_name`) of one driver process ran on."""
        state = self._gcs()
        jobs = {j["JobID"] for j in state.job_table() if j["DriverPid"] == driver_pid}
        names = {n["id"]: n["name"] for n in self.nodes()}
        return sorted(names.get(a["Address"]["NodeID"], a["Address"]["NodeID"]) for a in state.actor_table(None).values()
                      if a["JobID"] in jobs and class_name in a["ActorClassName"])


@pytest.fixture(scope="session")
def ray_cluster(request):
    """A local multi-node Ray cluster of the requested Layout (indirect parametrization; default CPU_HEAD)."""
    cluster = LocalCluster(getattr(request, "param", CPU_HEAD)).start()
    yield cluster
    cluster.stop()


def pytest_collection_modifyitems(items):
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
