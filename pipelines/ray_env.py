"""Join a Ray cluster, or start a local one sized so Train workers never starve Ray Data and gone when er exits.

Credentials never travel through Ray: a local Ray that er starts inherits the driver's environment
(the AWS variables with it), and the nodes of an existing cluster use their own AWS chain. Only
non-secret settings are forwarded to an existing cluster's workers (`worker_env`), since Ray writes
runtime envs in plain text into its logs. Token auth is left as the cluster and RAY_AUTH_MODE say;
only a local Ray that er starts itself defaults to RAY_AUTH_MODE=disabled.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time

from pipelines import ray_sessions

# Non-secret settings that workers on other nodes need and may not share with the driver.
FORWARDED = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")
_local: dict = {}  # the local Ray this process started: its session dir and record
_console = {"verbose": False}
# Warnings Ray itself repeats while nothing is wrong, muted at their logger in every Ray worker process.
# PlacementGroupCleaner asks the state API every second whether Train's controller lives; without a dashboard
# (er starts a local Ray without one: about 2 s less start-up) each ask fails with this warning.
HARMLESS = {"ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR}


def set_verbose(verbose: bool) -> None:
    """verbose: Ray's own logs and its workers' output on this console too (otherwise only in Ray's log files)."""
    _console["verbose"] = verbose


def mute_harmless() -> None:
    """A worker_process_setup_hook: Ray runs it in each worker process it starts."""
    for name, level in HARMLESS.items():
        logging.getLogger(name).setLevel(level)


def _quiet_driver() -> None:
    """Ray Data's INFO lines and progress bars stay in its log file; er draws its own progress."""
    import ray.data
    from ray._private.log import PlainRayHandler
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # spent here: Ray Data would warn that its bars are off
    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, PlainRayHandler):  # the console handler; the file handler keeps every level
            h.setLevel(logging.WARNING)


def _init_args() -> dict:
    verbose = _console["verbose"]
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if not _console["verbose"]:
        _quiet_driver()
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, **_init_args())
        return
    _start_local(num_cpus)


def _start_local(num_cpus: int | None) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # inherited by the Ray processes it starts, nowhere else
    # Train's PreemptionWatcher (one more process per run) watches for nodes being drained: one machine never is.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    root = ray_sessions.ray_temp_root()
    ray_sessions.reap(root)
    rec = ray_sessions.record(root)
    # Logical CPUs > cores on purpose: a Train worker reserves its CPUs for the whole run, and
    # Ray Data tasks feeding it must still be schedulable (or the run hangs forever). num_cpus: at least that many.
    cpus = max(num_cpus or 0, 8, 2 * (os.cpu_count() or 1))
    # address="local": start one even if RAY_ADDRESS is set (ray.init would read it otherwise).
    # The raylet expects to start at most one worker per core at once and warns on the console beyond a few times
    # that; with more logical CPUs than cores, a sweep's trials start more, on purpose: expect one per logical CPU.
    # And it would start one idle worker per logical CPU for the first driver: workers start when work asks for
    # them instead (a tiny er ingest: 1.5 s and 2.7 CPU-s less on 2 cores).
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _temp_dir=root, **_init_args(),
             _system_config={"worker_maximum_startup_concurrency": cpus, "prestart_worker_first_driver": False},
             runtime_env={"worker_process_setup_hook": "pipelines.ray_env.mute_harmless"})
    session = ray._private.worker._global_node.get_session_dir_path()
    ray_sessions.record(root, session)
    _local.update(session_dir=session, record=rec)
    atexit.register(_shutdown)  # registered after Ray's own hook, so it runs first
    ray_sessions.exit_on_sigterm()  # ray.init installed its own handler (exit status 15)


def _shutdown() -> None:
    import ray

    ray.shutdown()
    ray_sessions.finish(_local["session_dir"], _local["record"])


@contextlib.contextmanager
def streamed(iterable):
    """Iterate a Ray Data iterable in the driver; on leaving (an interrupt too), close it and wait for its threads.

    Closing only asks Ray Data's iteration threads to stop (they look every 0.1 s). One still unwinding while Ray
    shuts down calls into Ray's core worker, which then ends the whole process with status 1: an interrupted
    `er ingest` exited 1 instead of 143 in about one run of ten.
    """
    before = set(threading.enumerate())
    it = iter(iterable)
    try:
        yield it
    finally:
        it.close()
        deadline = time.monotonic() + 10  # bounded: a thread stuck in a Ray call is a daemon, left behind
        for t in set(threading.enumerate()) - before:
            if t.name == "iter_threaded":  # Ray Data's; its "Prefetcher" thread stays parked for good, never joined
                t.join(timeout=max(0.0, deadline - time.monotonic()))


def worker_env() -> dict | None:
    """`runtime_env` for Ray tasks and actors: non-secret settings for a cluster er joined; None when nothing to carry."""
    if _local:
        return None  # a local Ray inherits the whole environment
    env = {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
    return {"env_vars": env} if env else None


def absolute(url: str) -> str:
    """Workers run in other folders: hand them absolute local paths (URLs with a scheme pass through)."""
    return url if "://" in url else os.path.abspath(url)
