"""Join a Ray cluster, or start a local one sized so Train workers never starve Ray Data."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local default; clusters configure their own auth
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Logical CPUs > cores on purpose: a Train worker reserves its CPUs for the whole run, and
    # Ray Data tasks feeding it must still be schedulable (or the run hangs forever).
    cpus = num_cpus or max(8, 2 * (os.cpu_count() or 1))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)


def absolute(url: str) -> str:
    """Workers run in other folders: hand them absolute local paths (URLs with a scheme pass through)."""
    return url if "://" in url else os.path.abspath(url)
