"""`er` submitted through Ray's Jobs API (`ray job submit`) to a local multi-node cluster with its dashboard on
(tests/conftest_cluster.py: head + 1 worker node), with inputs and outputs on the tests' S3 server.

The jobs run as a user's would: `ray job submit --runtime-env cluster/runtime-env.local.yaml` (the repo uploaded as
the working dir) with the venv's python as entrypoint, since the nodes run from this venv. Credentials: the nodes
are started after the S3 fixture, so each node has the AWS_* variables in its own environment, as real nodes get
theirs from an instance role, IRSA or a Secret; nothing secret goes through Ray (no runtime_env env_vars).
One cluster and one S3 layout for the whole module; the tests run in file order and build on each other.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_tiny_task
from tests.conftest_cluster import RAY, Layout

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = Layout(head_cpus=2, workers=(2,), dashboard=True)
EXAMPLES = 128  # 96 + 16 + 16, all distinct
ER = [sys.executable, "-m", "pipelines.cli"]  # on the nodes: this venv's python, the submitted code on its path
INGEST_ARGS = ["--layer", "2", "--codec", "fp32", "--shard-rows", "16"]

pytestmark = pytest.mark.parametrize("ray_cluster", [DASHBOARD], indirect=True, ids=str)


@pytest.fixture(scope="module")
def jobs(s3, ray_cluster, tiny_bert, tmp_path_factory):
    """(cluster, Jobs API client, s3fs filesystem, s3:// base): the tiny task uploaded to S3."""
    from ray.job_submission import JobSubmissionClient

    from er_core.store.storage import url_to_fs

    # s3 is set up first (argument order), so the nodes started after it carry the credentials in their environment.
    assert ray_cluster.env.get("AWS_ENDPOINT_URL") == os.environ["AWS_ENDPOINT_URL"], "the cluster started before S3"
    assert ray_cluster.dashboard_url, "the layout has the dashboard on"
    task = write_tiny_task(tmp_path_factory.mktemp("jobs") / "task", sizes=(("train", 96), ("dev", 16), ("test", 16)))
    fs, _ = url_to_fs(f"s3://{s3.bucket}")
    base = f"{s3.bucket}/jobs-{uuid.uuid4().hex[:8]}"
    fs.put(str(task) + "/", f"{base}/task/", recursive=True)
    return ray_cluster, JobSubmissionClient(ray_cluster.dashboard_url), fs, f"s3://{base}"


def _submit(cluster, sid: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit --no-wait` from the repo root, as a user would; the entrypoint is er's argv."""
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", sid, "--no-wait",
           "--runtime-env", "cluster/runtime-env.local.yaml", "--", *ER, *argv]
    return subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=120)


def _wait(client, sid: str, timeout: float = 300) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(sid)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value
        time.sleep(1)
    client.stop_job(sid)
    pytest.fail(f"job {sid} still {status.value} after {timeout:.0f} s:\n{client.get_job_logs(sid)[-3000:]}")


def _run_job(jobs, sid: str, argv: list[str]) -> str:
    cluster, client, _, _ = jobs
    sub = _submit(cluster, sid, argv)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    assert f"Job '{sid}' submitted successfully" in sub.stdout + sub.stderr
    status = _wait(client, sid)
    logs = client.get_job_logs(sid)
    assert status == "SUCCEEDED", logs[-4000:]
    return logs


def _er_local(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ER, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""})


def test_submitted_ingest_succeeds_and_its_s3_cache_verifies(jobs, tiny_bert):
    cluster, client, fs, base = jobs
    logs = _run_job(jobs, "er-test-ingest", ["ingest", f"{base}/task", "--cache", f"{base}/cache", "--model", tiny_bert,
                                             *INGEST_ARGS])
    assert f"examples written  {EXAMPLES}" in logs
    info = client.get_job_info("er-test-ingest")
    assert info.entrypoint.endswith(shlex.join(["--cache", f"{base}/cache", "--model", tiny_bert, *INGEST_ARGS]))
    verify = _er_local("cache", "verify", f"{base}/cache")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_ray_state_api_shows_the_jobs_actors_on_both_nodes(jobs):
    from ray.util.state import list_actors, list_workers

    cluster, client, _, _ = jobs
    job_id = client.get_job_info("er-test-ingest").job_id
    actors = list_actors(address=cluster.dashboard_url, filters=[("job_id", "=", job_id)], limit=1000, detail=True,
                         raise_on_missing_output=False)
    # Each actor's worker process: an actor still loading the model when the run ended has no node_id of its own.
    workers = list_workers(address=cluster.dashboard_url, limit=10_000, detail=True, raise_on_missing_output=False)
    node_of = {w.pid: w.node_id for w in workers}
    names = {n["id"]: n["name"] for n in cluster.nodes()}
    embed = [(a.pid, a.node_id, names.get(node_of.get(a.pid))) for a in actors if "TokenizeEmbedWrite" in a.class_name]
    assert len(node_of) == len(workers)  # pids are this host's: one node each, none reused
    assert {name for _, _, name in embed} == {"head", "w1"}, (embed, sorted(node_of.items()))
    assert all(node is None or names.get(node) == name for _, node, name in embed), embed  # the two views agree


def test_submitted_sweep_reads_its_tasks_and_writes_its_results_on_s3(jobs):
    _, _, fs, base = jobs
    path = base.removeprefix("s3://")
    # Relative paths are taken from the sweep file's own URL.
    sweep = {"cache": "../cache", "output": "../sweep-out", "tasks": ["../task"], "methods": ["reduced"],
             "defaults": {"epochs": 1}, "resources": {"cpus_per_worker": 0.5}}
    fs.pipe_file(f"{path}/sweeps/sweep.yaml", yaml.safe_dump(sweep).encode())
    _run_job(jobs, "er-test-sweep", ["sweep", f"{base}/sweeps/sweep.yaml"])
    fs.invalidate_cache()
    rows = json.loads(fs.cat_file(f"{path}/sweep-out/results.json"))
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["out_dir"].startswith(f"{base}/sweep-out/")
    assert fs.exists(f"{path}/sweep-out/results.csv")
    assert fs.exists(f"{rows[0]['out_dir'].removeprefix('s3://')}/metrics.json")


def test_scheduled_ingest_twice_submits_once_and_adds_nothing_the_second_time(jobs, tiny_bert, tmp_path):
    cluster, client, fs, base = jobs
    cache = f"{base}/cron-cache"
    env = {**cluster.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_API_SERVER_ADDRESS": cluster.dashboard_url, "CORPUS": f"{base}/task", "CACHE": cache,
           "ER": shlex.join(ER), "ER_INGEST_LOCK": str(tmp_path / "lock")}
    env.pop("ER_SUBMISSION_ID", None)
    day = datetime.now(timezone.utc).strftime("%Y%m%d")

    def run():
        return subprocess.run(["bash", str(ROOT / "cluster" / "scheduled-ingest.sh"), "--model", tiny_bert, *INGEST_ARGS],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    first = run()
    assert first.returncode == 0, first.stdout + first.stderr
    sid = f"er-ingest-{day}"
    assert f"Ray job {sid}: SUCCEEDED" in first.stdout
    assert f"examples written  {EXAMPLES}" in first.stdout  # the job's logs, followed
    manifest = sorted(fs.ls(f"{cache.removeprefix('s3://')}/_log", detail=False, refresh=True))

    second = run()
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{sid} was submitted before: following it, not submitting it again" in second.stdout
    assert f"Ray job {sid}: SUCCEEDED" in second.stdout
    assert [j.submission_id for j in client.list_jobs()].count(sid) == 1  # one job, however often it ran
    fs.invalidate_cache()
    # the cache is as the first run left it: no version added
    assert sorted(fs.ls(f"{cache.removeprefix('s3://')}/_log", detail=False, refresh=True)) == manifest
    verify = _er_local("cache", "verify", cache)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_losing_the_worker_node_mid_ingest_then_rerunning_gives_a_clean_runs_keys(jobs, tiny_bert, tmp_path):
    """Last in this module: it takes the worker node away (SIGKILL to its whole process group, as a lost machine)."""
    from er_core import Recycler, open_cache
    from er_core.keys import example_key

    cluster, client, fs, base = jobs
    texts = [f"lost node example {i} " + " ".join(str(i * j % 97) for j in range(12)) for i in range(3000)]
    path = base.removeprefix("s3://")
    fs.pipe_file(f"{path}/big/corpus.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    cache = f"{base}/lost-node-cache"
    argv = ["ingest", f"{base}/big", "--cache", cache, "--model", tiny_bert, *INGEST_ARGS]
    sub = _submit(cluster, "er-test-lost-node", argv)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    deadline = time.monotonic() + 180
    while not fs.exists(f"{cache.removeprefix('s3://')}/_log/00000000000000000001.json"):  # mid-run: a first commit is out
        assert time.monotonic() < deadline, client.get_job_logs("er-test-lost-node")[-3000:]
        assert client.get_job_status("er-test-lost-node").value in ("PENDING", "RUNNING"), \
            "the ingest ended before the node could be lost:\n" + client.get_job_logs("er-test-lost-node")[-3000:]
        time.sleep(0.5)
        fs.invalidate_cache()
    cluster.stop_node("w1", kill=True)
    first = _wait(client, "er-test-lost-node", timeout=400)  # Ray may finish it on the head, or it fails: either way it ends
    # Rerun once Ray has noticed the loss (missed heartbeats, ~30 s), as a user rerunning after the failure would:
    # the first run may end on the head sooner, and a rerun started before would see the node die under it.
    deadline = time.monotonic() + 120
    while any(n["alive"] for n in cluster.nodes() if n["name"] == "w1"):
        assert time.monotonic() < deadline, "Ray never marked the killed node dead"
        time.sleep(1)
    logs = _run_job(jobs, "er-test-lost-node-rerun", argv)
    assert "examples written" in logs, logs[-3000:]
    verify = _er_local("cache", "verify", cache)
    assert verify.returncode == 0, f"(first run: {first})\n" + verify.stdout + verify.stderr

    reader = open_cache(cache)
    assert not reader.spec.diff(Recycler.load(tiny_bert, 2, "fp32").spec)  # the spec the run planned with is the model's
    got = list(reader.keys())
    want = {example_key({"text": t}, reader.spec.tokenizer) for t in texts}  # the keys a plain loop gives them
    assert len(got) == len(set(got)) == len(texts)  # nothing lost, nothing twice
    assert set(got) == want
