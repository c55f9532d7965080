"""Training and inference throughput of recycling vs the full model, side by side on the same batches.

Bundled MiniLM (L=6) cut at k=L/2 on real task texts. For each batch, in turn: `full` (whole
model + head, forward/backward/step from token ids), `reduced` and `lora` (upper layers + head
from cached fp16 states, decoding included); and for inference, the full model vs the upper part
on cache hits. The ideal ratio is the share of layer compute skipped: L / (L - k).

    python -m benchmarks.bench_train [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from er_core import Recycler, TrainConfig, ingest_local, load_task, open_cache
from er_core.store.codecs import get_codec
from er_core.evaluate import forward
from er_core.heads import HEADS, FullModel, RecycledModel, make_head
from er_core.split import split_encoder
from er_core.task_data import grouped_order, join_cache, label_map
from er_core.tasks import example_input, task_folders
from er_core.train import adapter_config, make_optimizer
from peft import get_peft_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"


def _batches(data, rows_needed, bs, pad_id):
    from er_core.task_data import collate

    out = []
    for order in grouped_order(data.lengths(), bs, shuffle=True, seed=0)[:rows_needed]:
        its = [data.items[i] for i in order]
        ids, tg = [it.input_ids for it in its], [it.target for it in its]
        enc = [(data.rows._hidden[data.rows.index[it.key]], data.rows._scale[data.rows.index[it.key]], len(it.input_ids)) for it in its]
        out.append((collate("classification", ids, tg, None, pad_id), enc, ids, tg))
    return out


def _decode(rows, enc):
    return [get_codec(rows.codec).decode(h, s, (n, rows.hidden_size)) for h, s, n in enc]


def classification_tasks(data_dir: Path) -> list[str]:
    """The task folders of `data_dir` holding JSONL classification data, by name (no task is named in code)."""
    return [p.name for p in task_folders(data_dir, "classification")]


def run(data_dir: Path = DATA, quick: bool = False, task: str | None = None, layer: int = 3, batch_size: int = 32) -> dict:
    torch.manual_seed(0)
    task = task or classification_tasks(data_dir)[0]
    n_batches = 4 if quick else 12
    rec = Recycler.load("bundled", layer=layer, codec="fp16", max_length=128)
    L = rec.spec.num_layers
    limit = {"train": n_batches * batch_size, "dev": 1, "test": 1}
    t = load_task(data_dir / task, limit=limit)
    tmp = tempfile.mkdtemp(prefix="er-bench-")
    ingest_local((example_input(e) for e in t.splits["train"]), tmp, rec, progress=False)
    reader = open_cache(tmp)
    data = join_cache(t, "train", rec.tokenizer, rec.spec.tokenizer, label_map(t), reader=reader)
    batches = _batches(data, n_batches, batch_size, rec.pad_id)
    C = len(t.labels)
    loss_fn = HEADS["classification"].loss

    def models():
        enc = copy.deepcopy(rec.encoder).train()
        full = FullModel(enc, make_head("classification", 384, C))
        e2 = copy.deepcopy(rec.encoder).train()
        _, up = split_encoder(e2, layer)
        reduced = RecycledModel(up, make_head("classification", 384, C))
        e3 = copy.deepcopy(rec.encoder).train()
        _, up3 = split_encoder(e3, layer)
        lora = get_peft_model(RecycledModel(up3, make_head("classification", 384, C)), adapter_config("bert", TrainConfig(method="lora")))
        return {"full": full, "reduced": reduced, "lora": lora}

    ms = models()
    opts = {k: make_optimizer(m, TrainConfig(method=k).for_encoder(384), 1000)[0] for k, m in ms.items()}
    train_time = {k: 0.0 for k in ms}
    seen = 0

    def step(name, b):
        batch, enc, ids, tg = b
        m, opt = ms[name], opts[name]
        if name != "full":
            from er_core.task_data import collate

            batch = collate("classification", ids, tg, _decode(data.rows, enc), rec.pad_id)
        loss = loss_fn(forward(m, batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for b in batches[:1]:  # warm-up
        for name in ms:
            step(name, b)
    for b in batches:
        seen += len(b[2])
        for name in ms:  # interleaved, so machine noise hits all methods alike
            t0 = time.perf_counter()
            step(name, b)
            train_time[name] += time.perf_counter() - t0

    # inference: full model from ids vs upper part from cached states (hits)
    infer = {"full": 0.0, "cache_hit": 0.0}
    full_eval = FullModel(copy.deepcopy(rec.encoder).eval(), make_head("classification", 384, C)).eval()
    _, up = split_encoder(copy.deepcopy(rec.encoder), layer)
    hit_eval = RecycledModel(up, make_head("classification", 384, C)).eval()
    with torch.inference_mode():
        for b in batches[:1] + batches:
            batch, enc, ids, tg = b
            t0 = time.perf_counter()
            forward(full_eval, batch)
            t1 = time.perf_counter()
            from er_core.task_data import collate

            forward(hit_eval, collate("classification", ids, None, _decode(data.rows, enc), rec.pad_id))
            t2 = time.perf_counter()
            if b is not batches[0] or len(batches) == 1:
                infer["full"] += t1 - t0
                infer["cache_hit"] += t2 - t1
    n_inf = sum(len(b[2]) for b in batches[1:]) if len(batches) > 1 else len(batches[0][2])
    ideal = L / (L - layer)
    eps = {k: seen / v for k, v in train_time.items()}
    ieps = {k: n_inf / v for k, v in infer.items()}
    res = {
        "model": "all-MiniLM-L6-v2 (bundled)", "task": task, "layers": L, "k": layer, "batch_size": batch_size,
        "train_examples": seen, "ideal_ratio": round(ideal, 3),
        "train_examples_per_s": {k: round(v, 1) for k, v in eps.items()},
        "train_ratio": {k: round(eps[k] / eps["full"], 3) for k in ("reduced", "lora")},
        "infer_examples_per_s": {k: round(v, 1) for k, v in ieps.items()},
        "infer_ratio": round(ieps["cache_hit"] / ieps["full"], 3),
        "threads": torch.get_num_threads(),
    }
    res["train_ratio_of_ideal"] = {k: round(v / ideal, 3) for k, v in res["train_ratio"].items()}
    res["infer_ratio_of_ideal"] = round(res["infer_ratio"] / ideal, 3)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return res


def plot(res: dict, folder: Path) -> list[str]:
    """speed_vs_ideal.png: measured speed-ups of training and inference beside the ideal L/(L-k)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = ["train reduced", "train lora", "inference (cache hit)"]
    got = [res["train_ratio"]["reduced"], res["train_ratio"]["lora"], res["infer_ratio"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, got, color="tab:blue", label="measured, vs full")
    ax.axhline(res["ideal_ratio"], color="tab:red", linestyle="--", label=f"ideal L/(L-k) = {res['ideal_ratio']:.2f}")
    ax.set_ylabel("speed-up over the full model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(folder) / "speed_vs_ideal.png", dpi=100)
    return ["speed_vs_ideal.png"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    print(json.dumps(run(quick=ap.parse_args().quick), indent=1))
