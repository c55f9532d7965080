"""What `er train` prints in a plain terminal: er's own lines and bars, nothing of Ray's unless --verbose."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from er_core import Recycler, ingest_local, load_task
from er_core.tasks import example_input, task_folders

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
# Every line er train may print besides its epoch lines: the read phase, the summary header and table, the output,
# and the warning of a run that learned nothing (40 examples for 2 epochs may not).
ER_LINES = ("reading ", "read in ", "task ", "  split ", "  dev ", "  test ", "wrote ", "warning: ")
BAR = re.compile(r"^epoch \d+/\d+:\s+\d+%\|")  # a tqdm frame of er's per-epoch bar
EPOCH = re.compile(rf"^epoch \d+/{EPOCHS}  train loss \d+\.\d+  dev micro_f1 \d\.\d+  \d+ s")


def _slice(src: Path, dst: Path, n: int = 40) -> Path:
    """The first n examples of each split, dev and test only of labels the train slice has (as a task needs)."""
    dst.mkdir()
    files = sorted((f for f in src.iterdir() if f.suffix == ".jsonl"), key=lambda f: "train" not in f.name)
    seen = set()
    for f in files:
        rows = [json.loads(ln) for ln in f.read_text().splitlines()]
        rows = rows[:n] if "train" in f.name else [r for r in rows if r["label"] in seen][:n]
        seen |= {r["label"] for r in rows}
        dst.joinpath(f.name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def test_er_train_prints_its_own_progress_and_no_ray_lines(data_dir, tmp_path):
    task = _slice(task_folders(data_dir, "classification")[0], tmp_path / "task")
    cache = str(tmp_path / "cache")
    t = load_task(task)
    ingest_local([example_input(e) for exs in t.splits.values() for e in exs], cache, Recycler.load("bundled", layer=3),
                 progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    env.pop("ER_DEBUG", None)
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--cache", cache, "--task", str(task),
                          "--out", str(tmp_path / "out"), "--epochs", str(EPOCHS)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [ln for ln in re.split(r"[\r\n]", run.stdout + run.stderr) if ln.strip()]
    bars = [ln for ln in lines if BAR.match(ln)]
    epochs = [ln for ln in lines if EPOCH.match(ln)]
    other = [ln for ln in lines if not BAR.match(ln) and not EPOCH.match(ln)]
    assert bars, "no progress bar: a long phase lost its feedback"
    assert 1 <= len(epochs) <= EPOCHS, epochs
    assert [ln for ln in other if not ln.startswith(ER_LINES)] == [], "lines er did not write (Ray's, a worker's)"
    assert any(ln.startswith("  test ") for ln in other), "no final table"


def test_er_local_ray_starting_many_workers_at_once_prints_no_raylet_warning(ray_tmp):
    """A sweep's trials (fractional CPUs, ~8 workers each) start many workers at once, more than the cores: on purpose,
    since er's local Ray has more logical CPUs than cores. The raylet must not warn about it on the console."""
    script = ("import time, ray\nfrom pipelines.ray_env import ensure_ray\nensure_ray()\n"
              "f = ray.remote(num_cpus=0.25)(lambda: time.sleep(3) or 1)\n"  # fractional CPUs: 24 workers at once
              "assert ray.get([f.remote() for _ in range(24)]) == [1] * 24\ntime.sleep(1)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(raylet)" not in run.stdout + run.stderr, run.stdout[-3000:]  # Ray prints it to stdout


def test_bars_redraw_live_in_a_terminal_and_sparsely_in_a_log_file():
    import io
    import time

    from pipelines.bars import bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        with bar(total=40, file=stream, desc="ingest") as b:
            for _ in range(40):  # 0.6 s of updates
                b.update(1)
                time.sleep(0.015)
    frames = {name: [f for f in s.getvalue().split("\r") if f.strip()] for name, s in (("log", log), ("tty", terminal))}
    assert len(frames["log"]) == 2 and "0/40" in frames["log"][0] and "40/40" in frames["log"][-1], frames["log"]
    assert len(frames["tty"]) >= 4, frames["tty"]
