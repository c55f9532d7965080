"""Layer advice: which k to cache a corpus at, from short probes on one task.

The paper chooses k per task. `advise` trains one short probe per k (a train slice, a few epochs,
the dev split only: never test), each from a cache at that layer, and recommends the cheapest k
whose dev metric is within `tolerance` points of the best. Cheapest means the largest k: each
later task trains and predicts through L-k layers only (ingestion costs more at larger k, but once).

A cache holds one layer. The user's cache serves its own k (the task's missing examples are added
to it, as `er train --ingest-missing` does); every other k gets a probe cache of the task's slice
under `workdir/caches/k<k>`, built with the same model, codec and tokenizer settings. For the
chosen k the user then ingests the corpus once at that layer (`command` in the result).

Several tasks (`advise_tasks`) are probed one by one, the probe caches shared, and the advice is the shallowest k
any of them needs: one cache at that k serves them all (a task that would do as well deeper trains a few more layers
than it needs); the alternative, one cache per k, ingests the corpus once per distinct k. Token tasks (NER) often
need a shallower cut than classification (REPORT `fidelity-ncbi-disease`, accuracy vs k).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from .store import open_cache
from .errors import ErError
from .evaluate import evaluate
from .finetuning import cache_task, setup_data
from .metrics import primary_metric
from .models import load_encoder
from .recycle import Recycler, ingest_local
from .task_data import iter_batches
from .tasks import example_input, load_task
from .train import TrainConfig, build_model, fit, seed_everything


@dataclass
class AdviseConfig:
    layers: list[int] | None = field(default=None, metadata={"help": "k values to probe; default 0, L/4, L/2, 3L/4 and the cache's k"})
    method: str = field(default="reduced", metadata={"help": "reduced | lora: what later tasks will train"})
    budget: int = field(default=1000, metadata={"help": "train examples per probe"})
    dev: int = field(default=500, metadata={"help": "dev examples each probe is scored on"})
    epochs: int = field(default=2, metadata={"help": "epochs per probe"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: the method's, for the encoder's width)"})
    batch_size: int = 16
    seed: int = 0
    tolerance: float = field(default=1.0, metadata={"help": "points of dev metric a cheaper k may lose against the best"})

    def probe_config(self) -> TrainConfig:
        # exactly `epochs`, at every k alike: lora's min_steps would stretch a 2-epoch probe to 16 at the default budget
        return TrainConfig(method=self.method, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                           patience=self.epochs, min_steps=0)


def default_layers(num_layers: int, cache_layer: int) -> list[int]:
    return sorted({0, round(num_layers / 4), round(num_layers / 2), round(3 * num_layers / 4), cache_layer} - {num_layers})


def recommend(rows: list[dict], tolerance: float) -> dict:
    """The largest k whose dev metric is within `tolerance` points (x100) of the best probe's."""
    best = max(r["dev"] for r in rows)
    within = [r for r in rows if 100 * (best - r["dev"]) <= tolerance + 1e-9]
    return max(within, key=lambda r: r["layer"])


def advise(cache_url: str, task_dir: str, cfg: AdviseConfig, workdir: str, storage_options=None, log=print) -> dict:
    """Probe every k, and return {table, recommended, rule, command}; the probe caches stay in workdir/caches."""
    if cfg.method not in ("reduced", "lora"):
        raise ErError(f"advise probes the methods that train from a cache (reduced, lora), not {cfg.method!r}")
    spec = open_cache(cache_url, storage_options=storage_options).spec
    layers = sorted(set(cfg.layers)) if cfg.layers else default_layers(spec.num_layers, spec.layer)
    bad = [k for k in layers if not 0 <= k < spec.num_layers]
    if bad:
        raise ErError(f"layers {bad} out of range: the cache's model has {spec.num_layers} layers, so k is 0..{spec.num_layers - 1}")
    limit = {"train": cfg.budget, "dev": cfg.dev, "test": 0}
    task = load_task(task_dir, limit=limit, storage_options=storage_options)
    inputs = [example_input(e) for exs in task.splits.values() for e in exs]
    model = None
    rows = []
    for k in layers:
        t0 = time.perf_counter()
        if k == spec.layer:
            url = cache_url
            added = cache_task(cache_url, task_dir, storage_options, limit)
        else:
            url = f"{workdir.rstrip('/')}/caches/k{k}"
            model = model or load_encoder(spec.model_name, spec.model_revision)  # loaded once for every probe cache
            rec = Recycler.from_encoder(*model, spec.model_name, k, spec.codec, spec.tokenizer.max_length, spec.model_revision)
            stats = {}
            ingest_local(inputs, url, rec, storage_options, progress=False, stats=stats)
            added = stats.get("claimed", 0)
        ingest_seconds = time.perf_counter() - t0
        row = {"layer": k, "trained_layers": spec.num_layers - k, "cache": url, "ingested": added,
               "ingest_seconds": round(ingest_seconds, 2), **_probe(url, task_dir, cfg, limit, storage_options)}
        rows.append(row)
        log(f"k={k}: dev {row['metric']} {row['dev']:.4f}, probe {row['train_seconds']:.1f} s "
            f"({row['trained_layers']} of {spec.num_layers} layers trained)")
    pick = recommend(rows, cfg.tolerance)
    return {"cache": cache_url, "task": task.name, "model": spec.model_name, "num_layers": spec.num_layers,
            "config": asdict(cfg), "table": rows, "recommended": pick["layer"],
            "rule": f"the largest k (fewest layers to train per task) whose dev {pick['metric']} is within "
                    f"{cfg.tolerance} points of the best probe's",
            "command": f"er ingest CORPUS --cache NEW_CACHE --model {spec.model_name} --layer {pick['layer']} "
                       f"--codec {spec.codec}"}


def advise_tasks(cache_url: str, task_dirs: list[str], cfg: AdviseConfig, workdir: str, storage_options=None,
                 log=print) -> dict:
    """`advise` for each task, then the shallowest k they need and what one cache per k would cost instead."""
    each = [advise(cache_url, t, cfg, workdir, storage_options, log) for t in task_dirs]
    if len(each) == 1:
        return each[0]
    first = each[0]
    k = min(a["recommended"] for a in each)
    ks = sorted({a["recommended"] for a in each})
    return {**{f: first[f] for f in ("cache", "model", "num_layers", "config")}, "tasks": each, "recommended": k,
            "per_task": {a["task"]: a["recommended"] for a in each},
            "rule": f"the shallowest k any task needs: one cache at k={k} serves all {len(each)} tasks, each training "
                    f"{first['num_layers'] - k} of {first['num_layers']} layers" + (
                        f"; one cache per k ({', '.join(map(str, ks))}) would ingest the corpus {len(ks)} times, so that "
                        f"each task trains only its own L-k layers" if len(ks) > 1 else ""),
            "command": first["command"].replace(f"--layer {first['recommended']}", f"--layer {k}")}


def _probe(url: str, task_dir: str, cfg: AdviseConfig, limit: dict, storage_options) -> dict:
    """One short training from the cache at `url`, scored on dev: {metric, dev, train_seconds, examples/s}."""
    tc = cfg.probe_config()
    seed_everything(tc.seed)
    p = setup_data(url, task_dir, tc, storage_options, limit, splits=("train", "dev"))
    tc = tc.for_encoder(p.spec.hidden_size)
    kind = p.task.kind
    model = build_model(p.encoder, p.spec.layer, kind, len(p.task.labels) or 2, tc)
    train, dev = p.data["train"], p.data["dev"]
    steps = -(-len(train.items) // tc.batch_size)

    def batches(epoch):
        return (b for _, b in iter_batches(train, tc.batch_size, "cache", p.pad_id, shuffle=True, seed=tc.seed, epoch=epoch))

    def dev_metrics():
        return evaluate(model, dev, "cache", p.labels, pad_id=p.pad_id)

    metric = primary_metric(kind)
    result = fit(model, kind, tc, batches, steps, dev_metrics, metric)
    return {"metric": metric, "dev": result.best_metric, "best_epoch": result.best_epoch,
            "train_seconds": round(result.train_seconds, 2), "train_examples_per_second": round(result.examples_per_second, 2)}


def format_advice(advice: dict) -> str:
    if "tasks" in advice:
        per = ", ".join(f"{t} k={k}" for t, k in advice["per_task"].items())
        return "\n\n".join([*(f"== {a['task']}\n{format_advice(a)}" for a in advice["tasks"]),
                             f"per task: {per}\nrecommended k={advice['recommended']}: {advice['rule']}.\n"
                             f"cache a corpus there with: {advice['command']}"])
    head = ["k", "layers trained", f"dev {advice['table'][0]['metric']}", "probe s", "ex/s", "ingest s", ""]
    body = [[r["layer"], r["trained_layers"], f"{r['dev']:.4f}", f"{r['train_seconds']:.1f}",
             f"{r['train_examples_per_second']:.1f}", f"{r['ingest_seconds']:.1f}",
             "<- recommended" if r["layer"] == advice["recommended"] else ""] for r in advice["table"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    return "\n".join(lines + [f"recommended k={advice['recommended']}: {advice['rule']}.",
                              f"cache a corpus there with: {advice['command']}"])


def write_advice(advice: dict, path) -> None:
    from pathlib import Path

    Path(path).write_text(json.dumps(advice, indent=1))
