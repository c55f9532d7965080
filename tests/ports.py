"""Free TCP ports for the servers tests start (Ray nodes, SeaweedFS, er serve).

The kernel's own pick (bind to port 0) comes from the ephemeral range, which every outgoing connection on the
host also draws from: between our pick and the server's bind, a Ray worker's connection can take the port (CI saw
this). So ports come from between Ray's worker ports (10002-19999, which `ray start` binds itself) and the
ephemeral range, where only explicit binds go, each handed out once per process; above the ephemeral range where
the gap is too small.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_given: set[int] = set()


RAY_WORKER_PORTS_END = 20000  # ray start's --max-worker-port is 19999


def port_range() -> tuple[int, int]:
    """[low, high) to pick from: below the ephemeral range and above Ray's worker ports, or above the ephemeral range."""
    try:
        first, last = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        first, last = 32768, 60999  # Linux's default
    if first - RAY_WORKER_PORTS_END >= 1000:
        return max(RAY_WORKER_PORTS_END, first - 12000), first
    return last + 1, 65536


def _bindable(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):  # servers bind the node's address or loopback; both must be free
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free now, outside the ephemeral range, never given out before in this process."""
    low, high = port_range()
    out: list[int] = []
    for _ in range(50 * n + 200):
        port = random.randrange(low, high)
        if port not in _given and _bindable(port):
            _given.add(port)
            out.append(port)
            if len(out) == n:
                return out
    raise RuntimeError(f"found only {len(out)} of {n} free ports in {low}..{high - 1}")


def free_port() -> int:
    return free_ports(1)[0]
