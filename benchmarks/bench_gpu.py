"""er on a GPU machine, end to end: where each step runs and what it costs, with the GPU sampled throughout.

    python -m benchmarks.bench_gpu --task TASK_DIR --tokenizer TOKENIZER_DIR --out DIR [--shape base] [--limit N]

Steps, each a separate `er` command as a user runs it (each starts its own local Ray, which sees
the GPU): ingest the task (the pool takes one GPU actor), train `reduced` and `full` with
`--gpus-per-worker 1`, `reduced` again with `--precision bf16`, and predict over the task with
the reduced model (its actor takes a GPU). The model is built from a config with random weights
(the GPU machine is offline; speed does not depend on the weights), with the given tokenizer.
`nvidia-smi` samples utilization and memory every 0.5 s, so each step's GPU use is measured,
not assumed. Writes DIR/gpu.json and DIR/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # BERT shapes: (layers, hidden, heads, intermediate)
    "minilm": (6, 384, 12, 1536),
    "base": (12, 768, 12, 3072),
}


def make_model(shape: str, tokenizer: Path, dest: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    layers, hidden, heads, inter = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _sampler(path: Path):
    if not shutil.which("nvidia-smi"):
        return None
    return subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                             "-lms", "500"], stdout=open(path, "w"), stderr=subprocess.DEVNULL)


def _gpu_use(samples: Path, t0: float, t1: float) -> dict:
    """Mean and peak utilization (%) and peak memory (MiB) between two unix times."""
    if not samples.exists():
        return {}
    import datetime

    util, mem = [], []
    for line in samples.read_text().splitlines():
        try:
            ts, u, m = (x.strip() for x in line.split(","))
            t = datetime.datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        if t0 <= t <= t1:
            util.append(float(u))
            mem.append(float(m))
    if not util:
        return {}
    return {"gpu_util_mean": round(sum(util) / len(util), 1), "gpu_util_max": max(util), "gpu_mem_max_mib": max(mem),
            "samples": len(util)}


def _er(name: str, args: list[str], out: Path, samples: Path, timeout: int) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        rc, log = p.returncode, p.stdout + "\n---- stderr ----\n" + p.stderr
    except subprocess.TimeoutExpired as e:  # keep the other steps' figures
        rc, log = "timeout", f"{e.stdout or ''}\n---- stderr ----\n{e.stderr or ''}"
    t1 = time.time()
    (out / f"{name}.log").write_text(log if isinstance(log, str) else log.decode(errors="replace"))
    row = {"step": name, "rc": rc, "wall_s": round(t1 - t0, 1), **_gpu_use(samples, t0, t1)}
    print(json.dumps(row), flush=True)
    return row


def run(task: Path, tokenizer: Path, out: Path, shape: str = "base", limit: int | None = None, epochs: int = 2,
        timeout: int = 240) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    task_name = task.name
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"er-gpu-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    model = make_model(shape, tokenizer, work / "model")
    if limit:  # the first `limit` lines of each split, so every step sees the same examples
        (work / "task").mkdir()
        for f in task.glob("*.jsonl"):
            (work / "task" / f.name).write_text("".join(f.read_text().splitlines(keepends=True)[:limit]))
        task = work / "task"
    k = SHAPES[shape][0] // 2
    samples = out / "nvidia-smi.csv"
    sampler = _sampler(samples)
    cache, gpus = str(work / "cache"), ["--gpus-per-worker", "1"] if torch.cuda.is_available() else []
    train = ["train", "--cache", cache, "--task", str(task), "--workers", "1", "--epochs", str(epochs), "--batch-size", "32",
             *gpus]
    steps = []
    try:
        steps.append(_er("ingest", ["ingest", str(task), "--cache", cache, "--model", str(model), "--layer", str(k)],
                         out, samples, timeout))
        for name, extra in (("train_reduced", ["--method", "reduced"]), ("train_full", ["--method", "full"]),
                            ("train_reduced_bf16", ["--method", "reduced", "--precision", "bf16"])):
            row = _er(name, [*train, "--out", str(work / name), *extra], out, samples, timeout)
            m = work / name / "metrics.json"
            if m.exists():
                met = json.loads(m.read_text())
                row.update({k2: met.get(k2) for k2 in ("device", "train_seconds", "train_examples_per_second")},
                           test=met.get("test"))
            steps.append(row)
        steps.append(_er("predict", ["predict", "--cache", cache, "--model-dir", str(work / "train_reduced"), "--corpus",
                                     str(task), "--out", str(work / "preds.jsonl")], out, samples, timeout))
    finally:
        if sampler:
            sampler.terminate()
        shutil.rmtree(work, ignore_errors=True)
    by = {s["step"]: s for s in steps}
    res = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "shape": shape, "k": k,
           "task": task_name, "limit": limit, "epochs": epochs, "steps": steps}
    if "train_seconds" in by.get("train_full", {}) and by.get("train_reduced", {}).get("train_seconds"):
        res["train_loop_ratio"] = round(by["train_full"]["train_seconds"] / by["train_reduced"]["train_seconds"], 2)
        res["end_to_end_ratio"] = round(by["train_full"]["wall_s"] / by["train_reduced"]["wall_s"], 2)
    (out / "gpu.json").write_text(json.dumps(res, indent=1))
    (out / "gpu.md").write_text(markdown(res))
    return res


def markdown(res: dict) -> str:
    lines = [f"GPU: {res['gpu']}; model: random-weight BERT `{res['shape']}` cut at k={res['k']}; task {res['task']}"
             f" (limit {res['limit']}), {res['epochs']} epochs.", "",
             "| step | exit | wall s | device | train s | GPU util mean / max % | GPU mem max MiB |", "|---|---|---|---|---|---|---|"]
    for s in res["steps"]:
        lines.append(f"| {s['step']} | {s['rc']} | {s['wall_s']} | {s.get('device', '')} | {s.get('train_seconds', '')} | "
                     f"{s.get('gpu_util_mean', '')} / {s.get('gpu_util_max', '')} | {s.get('gpu_mem_max_mib', '')} |")
    if "train_loop_ratio" in res:
        lines += ["", f"full / reduced: training loop x{res['train_loop_ratio']}, end to end x{res['end_to_end_ratio']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", type=Path, required=True, help="a classification task folder")
    ap.add_argument("--tokenizer", type=Path, required=True, help="a folder with tokenizer files (e.g. the bundled MiniLM's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="base")
    ap.add_argument("--limit", type=int, help="examples per split")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per step")
    a = ap.parse_args()
    print(markdown(run(a.task, a.tokenizer, a.out, a.shape, a.limit, a.epochs, a.timeout)))


if __name__ == "__main__":
    main()
