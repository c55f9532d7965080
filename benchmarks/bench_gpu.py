"""er on one device, each stage against its ceiling, side by side in one run.

    python -m benchmarks.bench_gpu --task TASK_DIR --tokenizer TOKENIZER_DIR --out DIR [--shape base] [--tiny]

The encoder is built from a config with random weights (speed does not depend on them; the GPU
machine is offline), BERT-base shape by default, cut at k = L/2; the texts are the task's.

- ceiling: the lower k layers in plain PyTorch at the same lengths (length-sorted batches, bf16 on a
  GPU), states packed to fp16 on the device and copied to the host;
- `er ingest` of two corpus sizes: steady rate (the slope) and fixed cost (the intercept);
- `er train` `reduced` and `full`: training loop (first batch to last), steps/s, fixed cost
  (command start to first batch); and a plain-PyTorch loop of the same upper model and batch shapes;
- `er predict` of two corpus sizes with each model: cache hits (`reduced`) against `full`.

Each `er` step is a separate command as a user runs it (its own local Ray, which sees the GPU);
`nvidia-smi` samples the GPU every 0.5 s. `--tiny` runs a tiny shape on small corpora on CPU (the
test suite): its figures check the fields, not the speed. Writes DIR/gpu.json and DIR/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # BERT shapes: (layers, hidden, heads, intermediate)
    "tiny": (2, 64, 2, 128),
    "minilm": (6, 384, 12, 1536),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
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


def _texts(task: Path, n: int) -> list[str]:
    """n distinct texts from the task's train split (repeated with a counter when it has fewer)."""
    base = [json.loads(line)["text"] for line in (task / "train.jsonl").read_text().splitlines() if line.strip()]
    return [t if i < len(base) else f"{t} ({i // len(base)})" for i, t in ((i, base[i % len(base)]) for i in range(n))]


def _corpus(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def ceiling(model_dir: Path, texts: list[str], k: int, device: str, token_budget: int = 65536) -> dict:
    """The lower k layers in plain PyTorch: length-sorted batches under a token budget, fp16 on the device, one copy."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from er_core.split import split_encoder

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = AutoModel.from_pretrained(model_dir).eval().to(device)
    lower, _ = split_encoder(enc, k)
    ids = sorted((tok(t, truncation=True, max_length=512)["input_ids"] for t in texts), key=len)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches, cur = [], []
    for x in ids:
        if cur and (len(cur) + 1) * len(x) > token_budget:
            batches.append(cur)
            cur = []
        cur.append(x)
    batches.append(cur)

    def run_all():
        for b in batches:
            T = max(map(len, b))
            inp = torch.zeros(len(b), T, dtype=torch.long)
            mask = torch.zeros(len(b), T, dtype=torch.long)
            for r, x in enumerate(b):
                inp[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
            with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                h = lower(inp.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            h.to(torch.float16).cpu()

    run_all()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_all()
    secs = time.perf_counter() - t0
    return {"examples_per_s": round(len(ids) / secs, 1), "tokens": sum(map(len, ids)), "seconds": round(secs, 3)}


def plain_loop(model_dir: Path, k: int, device: str, batch: int, lengths: list[int], steps: int) -> dict:
    """A plain-PyTorch training loop of the same upper model and head, on random states of the task's lengths."""
    import torch
    from transformers import AutoModel

    from er_core.heads import RecycledModel, make_head
    from er_core.split import split_encoder

    enc = AutoModel.from_pretrained(model_dir)
    _, upper = split_encoder(enc, k)
    H = enc.config.hidden_size
    model = RecycledModel(upper, make_head("classification", H, 2)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    order = sorted(lengths)
    shapes = [order[i: i + batch] for i in range(0, len(order), batch)][:steps] or [[8] * batch]
    data = [(torch.randn(len(b), max(b), H, generator=gen), torch.ones(len(b), max(b), dtype=torch.long),
             torch.zeros(len(b), dtype=torch.long)) for b in shapes]

    def step(h, m, y):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(hidden_states=h.to(device, non_blocking=True), attention_mask=m.to(device, non_blocking=True))
        loss = torch.nn.functional.cross_entropy(logits.float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(*data[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for d in data:
        step(*d)
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return {"steps_per_s": round(len(data) / secs, 2), "steps": len(data)}


def _slope(n1: int, w1: float, n2: int, w2: float) -> dict:
    """Wall = fixed + n / rate, from two sizes."""
    rate = (n2 - n1) / (w2 - w1) if w2 > w1 else None
    return {"steady_per_s": round(rate, 1) if rate else None, "fixed_s": round(w1 - n1 / rate, 1) if rate else None}


def run(task: Path, tokenizer: Path, out: Path, shape: str = "base", tiny: bool = False, sizes=(10000, 30000),
        epochs: int = 2, timeout: int = 300) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    if tiny:
        shape, sizes, epochs, timeout = "tiny", (48, 144), 1, 300
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="er-gpu-"))
    model = make_model(shape, tokenizer, work / "model")
    k = SHAPES[shape][0] // 2
    samples = out / "nvidia-smi.csv"
    sampler = _sampler(samples)
    gpu = ["--gpus-per-worker", "1", "--precision", "bf16"] if device == "cuda" else []
    limit = ["--limit", str(sizes[0])] if tiny else []
    texts = _texts(task, sizes[1])
    corpora = [_corpus(work / f"corpus-{n}.jsonl", texts[:n]) for n in sizes]
    res = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "shape": shape, "k": k,
           "layers": SHAPES[shape][0], "task": task.name, "sizes": list(sizes), "epochs": epochs,
           "when": time.strftime("%Y-%m-%d %H:%M"), "steps": []}
    try:
        res["ceiling"] = ceiling(work / "model", texts[: sizes[0]], k, device)
        walls = []
        for n, corpus in zip(sizes, corpora):
            cache = str(work / f"cache-{n}")
            row = _er(f"ingest_{n}", ["ingest", corpus, "--cache", cache, "--model", str(model), "--layer", str(k)],
                      out, samples, timeout)
            res["steps"].append(row)
            walls.append(row["wall_s"])
        res["ingest"] = _slope(sizes[0], walls[0], sizes[1], walls[1])
        cache = str(work / f"cache-{sizes[1]}")
        ingest_task = _er("ingest_task", ["ingest", str(task), "--cache", cache, "--model", str(model), "--layer", str(k)],
                          out, samples, timeout)
        res["steps"].append(ingest_task)
        res["train"] = {}
        for method in ("reduced", "full"):
            t0 = time.time()
            row = _er(f"train_{method}", ["train", "--cache", cache, "--task", str(task), "--workers", "1", "--epochs",
                                          str(epochs), "--batch-size", "32", "--method", method, "--out",
                                          str(work / method), *gpu, *limit], out, samples, timeout)
            res["steps"].append(row)
            m = work / method / "metrics.json"
            if m.exists():
                met = json.loads(m.read_text())
                res["train"][method] = {"device": met.get("device"), "loop_s": met["train_seconds"],
                                        "examples_per_s": met["train_examples_per_second"],
                                        "fixed_s": round(met["first_step_at"] - t0, 1) if met.get("first_step_at") else None,
                                        "wall_s": row["wall_s"]}
        if "reduced" in res["train"] and "full" in res["train"]:
            r, f = res["train"]["reduced"], res["train"]["full"]
            res["train"]["loop_ratio"] = round(f["loop_s"] / r["loop_s"], 2)
            lengths = [len(t.split()) + 2 for t in texts[: sizes[0]]]
            res["train"]["plain_loop"] = plain_loop(work / "model", k, device, 32, lengths, 50 if not tiny else 3)
            res["train"]["reduced"]["steps_per_s"] = round(r["examples_per_s"] / 32, 2)
        res["predict"] = {}
        for method in ("reduced", "full"):
            if method not in res["train"]:
                continue
            walls = []
            for n, corpus in zip(sizes, corpora):
                row = _er(f"predict_{method}_{n}", ["predict", "--cache", cache, "--model-dir", str(work / method), "--corpus",
                                                    corpus, "--out", str(work / f"preds-{method}-{n}.jsonl")],
                          out, samples, timeout)
                res["steps"].append(row)
                walls.append(row["wall_s"])
            res["predict"][method] = _slope(sizes[0], walls[0], sizes[1], walls[1])
    finally:
        if sampler:
            sampler.terminate()
        shutil.rmtree(work, ignore_errors=True)
    ing, pr = res.get("ingest", {}), res.get("predict", {})
    if ing.get("steady_per_s") and res["ceiling"]["examples_per_s"]:
        res["ingest"]["share_of_ceiling"] = round(ing["steady_per_s"] / res["ceiling"]["examples_per_s"], 3)
    if pr:  # None when a larger corpus was not slower: noise above the work (tiny runs on CPU)
        ok = pr.get("reduced", {}).get("steady_per_s") and pr.get("full", {}).get("steady_per_s")
        res["predict"]["hit_ratio"] = round(pr["reduced"]["steady_per_s"] / pr["full"]["steady_per_s"], 2) if ok else None
    (out / "gpu.json").write_text(json.dumps(res, indent=1))
    (out / "gpu.md").write_text(markdown(res))
    return res


def markdown(res: dict) -> str:
    c, ing, tr, pr = res.get("ceiling", {}), res.get("ingest", {}), res.get("train", {}), res.get("predict", {})
    ideal = res["layers"] / (res["layers"] - res["k"])
    lines = [f"Device: {res['device']}; random-weight BERT `{res['shape']}` ({res['layers']} layers) cut at k={res['k']}; "
             f"texts of {res['task']}; corpora of {res['sizes'][0]:,} and {res['sizes'][1]:,} texts; measured {res['when']}.", "",
             "| stage | rate | against |", "|---|---|---|",
             f"| ceiling: lower {res['k']} layers, plain PyTorch | {c.get('examples_per_s')} examples/s | 100% |",
             f"| `er ingest`, steady (slope) | {ing.get('steady_per_s')} examples/s | {ing.get('share_of_ceiling', '-')} of the "
             f"ceiling (goal >= 0.5) |",
             f"| `er ingest`, fixed cost | {ing.get('fixed_s')} s | goal <= 15 s |"]
    if "loop_ratio" in tr:
        r, f = tr["reduced"], tr["full"]
        lines += [f"| `er train` reduced / full, training loop | {r['loop_s']} s / {f['loop_s']} s | x{tr['loop_ratio']} "
                  f"(ideal x{ideal:.2f}, goal >= x1.7) |",
                  f"| `er train` reduced, steps/s | {r['steps_per_s']} | plain PyTorch {tr['plain_loop']['steps_per_s']} "
                  f"(goal >= 90%) |",
                  f"| `er train` fixed cost (start to first batch), reduced / full | {r['fixed_s']} s / {f['fixed_s']} s | "
                  f"goal: within 10% |"]
    if "hit_ratio" in pr and pr["hit_ratio"] is None:
        lines += ["| `er predict` steady, cache hits / full | not measurable: a larger corpus was not slower | |"]
    elif "hit_ratio" in pr:
        lines += [f"| `er predict` steady, cache hits / full | {pr['reduced']['steady_per_s']} / {pr['full']['steady_per_s']} "
                  f"examples/s | x{pr['hit_ratio']} (ideal x{ideal:.2f}, goal >= x1.7) |",
                  f"| `er predict` fixed cost, hits / full | {pr['reduced']['fixed_s']} s / {pr['full']['fixed_s']} s | |"]
    lines += ["", "| step | exit | wall s | GPU util mean / max % | GPU mem max MiB |", "|---|---|---|---|---|"]
    for s in res["steps"]:
        lines.append(f"| {s['step']} | {s['rc']} | {s['wall_s']} | {s.get('gpu_util_mean', '')} / {s.get('gpu_util_max', '')} | "
                     f"{s.get('gpu_mem_max_mib', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", type=Path, required=True, help="a classification task folder (train/dev/test .jsonl)")
    ap.add_argument("--tokenizer", type=Path, required=True, help="a folder with tokenizer files (e.g. the bundled MiniLM's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="base")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape and small corpora, on CPU: checks the fields, not the speed")
    ap.add_argument("--sizes", type=int, nargs=2, default=(10000, 30000), help="the two corpus sizes (texts)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per step")
    a = ap.parse_args()
    print(markdown(run(a.task, a.tokenizer, a.out, a.shape, a.tiny, tuple(a.sizes), a.epochs, a.timeout)))


if __name__ == "__main__":
    main()
