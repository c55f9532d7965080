"""One training loop for all three methods, plain torch so Ray Train workers can run it as is.

- `full`:    the whole encoder + head, from token ids (the baseline; no cache).
- `reduced`: upper layers k..L-1 + head, fine-tuned from cached layer-k states.
- `lora`:    peft LoRA on the upper layers only + head, from cached layer-k states.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from . import devices
from .errors import ErError
from .train_config import TrainConfig
from .evaluate import call
from .heads import HEADS, FullModel, RecycledModel, make_head
from .families import family_by_type
from .split import split_encoder

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(encoder, layer: int, kind: str, num_labels: int, cfg: TrainConfig) -> torch.nn.Module:
    """The trainable model for a method; for `full` the encoder is trained whole."""
    if kind not in HEADS:
        raise ErError(f"unknown task kind {kind!r}; expected one of {sorted(HEADS)}")
    torch.manual_seed(cfg.seed)
    head = make_head(kind, encoder.config.hidden_size, num_labels)
    if cfg.method == "full":
        return FullModel(encoder, head)
    _, upper = split_encoder(encoder, layer)
    for name, p in upper.named_parameters():
        if name in upper.shared_with_lower:
            p.requires_grad_(False)  # DeBERTa's relative embeddings also feed the cached lower part
    model = RecycledModel(upper, head)
    if cfg.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, adapter_config(encoder.config.model_type, cfg))
    return model


# Fields of a saved adapter_config.json that describe where it was saved, not how to build it.
_SAVED_ONLY = ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "task_type")


def read_peft_config(path: str) -> dict:
    """A peft config from a JSON or YAML file, or a folder holding peft's own adapter_config.json."""
    import json
    import os

    import yaml

    file = os.path.join(path, "adapter_config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            d = yaml.safe_load(f)  # JSON is YAML
    except OSError as e:
        raise ErError(f"--peft-config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ErError(f"--peft-config {path}: not JSON or YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict) or "peft_type" not in d:
        raise ErError(f"--peft-config {path}: expected a mapping with peft_type (LORA, IA3, LOHA, ...), got {json.dumps(d)[:80]}")
    return d


def adapter_config(model_type: str, cfg: TrainConfig):
    """The peft config of the adapters on the upper layers: cfg.peft_config (any tuner), else LoRA from cfg.lora_*.

    Target modules a config leaves out come from the family table (IA³: keys, values and the FFN, with its
    feedforward modules); the head is always trained whole (modules_to_save)."""
    from peft import LoraConfig, get_peft_config

    fam = family_by_type(model_type)
    if cfg.peft_config is None:
        targets = fam.linear_targets if cfg.lora_modules == "all" else fam.lora_targets
        return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(targets), modules_to_save=["head"],
                          use_rslora=cfg.lora_variant == "rslora", use_dora=cfg.lora_variant == "dora")
    d = {k: v for k, v in cfg.peft_config.items() if k not in _SAVED_ONLY}
    d["peft_type"] = str(d["peft_type"]).upper()
    if not d.get("target_modules"):
        ia3 = d["peft_type"] == "IA3"
        d["target_modules"] = list(fam.ia3_targets if ia3 else fam.lora_targets)
        if ia3 and not d.get("feedforward_modules"):
            d["feedforward_modules"] = list(fam.ffn_targets)
    d["modules_to_save"] = sorted({*(d.get("modules_to_save") or ()), "head"})
    try:
        return get_peft_config(d)
    except (TypeError, ValueError) as e:
        raise ErError(f"peft config ({d['peft_type']}): {e}") from None


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    """AdamW (no decay on biases and norms) with transformers' linear warm-up then linear decay."""
    from transformers import get_linear_schedule_with_warmup

    if cfg.lr is None:
        raise ErError("TrainConfig.lr is not settled: train with cfg.for_encoder(hidden_size), which picks the default")
    groups: dict[tuple, list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:  # the head may have its own rate (peft names its trained copy ...head.modules_to_save...)
            lr = cfg.head_lr if cfg.head_lr is not None and _in_head(n) else cfg.lr
            groups.setdefault((lr, 0.0 if p.ndim < 2 else cfg.weight_decay), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()], lr=cfg.lr)
    return opt, get_linear_schedule_with_warmup(opt, max(1, int(total_steps * cfg.warmup_ratio)), total_steps)


def _in_head(name: str) -> bool:
    parts = name.split(".")
    return "head" in parts and "upper" not in parts[: parts.index("head")]


def loss_step(model, batch: dict, kind: str) -> torch.Tensor:
    """The loss of a batch already on the model's device (fit moves it there: devices.prefetched)."""
    return HEADS[kind].loss(call(model, batch), batch)


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_metric: float
    train_seconds: float
    train_examples: int
    resumes: list[dict] = field(default_factory=list)  # one entry per restart from a checkpoint
    first_step_at: float | None = None  # wall clock (unix) of this attempt's first training step

    @property
    def examples_per_second(self) -> float:
        return self.train_examples / self.train_seconds if self.train_seconds else 0.0


STATE_FILE = "train_state.pt"


def epoch_score(row: dict, primary: str) -> float:
    """What ranks epochs (and Tune trials): the dev primary metric, or minus the train loss without a dev set."""
    return row.get(f"dev_{primary}", -row["train_loss"])


def save_state(folder, state: dict) -> None:
    """Write a training state (see `fit`) into `folder`, atomically."""
    import os

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), STATE_FILE)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_state(folder) -> dict | None:
    """The training state saved in `folder`, or None if it holds none."""
    import os

    path = os.path.join(str(folder), STATE_FILE)
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def _set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def fit(
    model,
    kind: str,
    cfg: TrainConfig,
    train_batches: Callable[[int], Iterable[dict]],
    steps_per_epoch: int,
    evaluate_dev: Callable[[], dict] | None,
    primary: str,
    log: Callable[[dict], None] = lambda m: None,
    progress: bool = False,
    resume: dict | None = None,
    on_epoch: Callable[[dict, Callable[[], dict]], None] | None = None,
    on_step: Callable[[int, int, int, float], None] | None = None,
) -> FitResult:
    """Train with early stopping on dev[primary]; the best epoch's weights are restored at the end.

    After each epoch `on_epoch(row, state)` gets the epoch's row and a function building the full
    training state (weights, optimizer, scheduler, RNG, early-stopping state, history); passing
    such a state back as `resume` continues the run after that epoch, exactly where it stopped.
    `on_step(epoch, step, steps_per_epoch, mean loss so far)` after every optimizer step: a progress display.
    """
    core = getattr(model, "module", model)  # DDP wraps the model; states hold the plain names
    epochs = cfg.max_epochs(steps_per_epoch)
    opt, sched = make_optimizer(model, cfg, steps_per_epoch * epochs)
    trainable = {n for n, p in core.named_parameters() if p.requires_grad}
    history, best, best_epoch, best_state, stale = [], -math.inf, -1, None, 0
    seconds, seen, start, resumes = 0.0, 0, 0, []
    if resume is not None:
        core.load_state_dict(resume["model"], strict=False)
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        _set_rng_state(resume["rng"])
        start, history, seconds, seen = resume["epoch"], list(resume["history"]), resume["seconds"], resume["seen"]
        best, best_epoch, best_state, stale = resume["best_metric"], resume["best_epoch"], resume["best_state"], resume["stale"]
        resumes = list(resume["resumes"]) + [{"after_epoch": start, "time": time.time()}]
    attempt = len(resumes) + 1

    def state() -> dict:
        return {"epoch": epoch + 1, "model": {k: v.detach().cpu() for k, v in core.state_dict().items() if k in trainable},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(),
                "history": history, "seconds": seconds, "seen": seen, "best_metric": best, "best_epoch": best_epoch,
                "best_state": best_state, "stale": stale, "stopped": stopped, "resumes": resumes}

    stopped = resume is not None and resume.get("stopped", False)
    device, first_step = devices.model_device(model), None
    for epoch in range(start, epochs):
        if stopped:
            break
        model.train()
        t0, total, n = time.perf_counter(), 0.0, 0
        batches = devices.prefetched(train_batches(epoch), device)  # on a GPU, the next batches are made meanwhile
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for batch in batches:
            if first_step is None:
                first_step = time.time()
            with devices.autocast(cfg.precision, device):
                loss = loss_step(model, batch, kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach())
            n += 1
            seen += int(batch["attention_mask"].shape[0])
            if on_step is not None:
                on_step(epoch + 1, n, steps_per_epoch, total / n)
        seconds += time.perf_counter() - t0
        # ended_at: wall clock (unix) of the epoch's last step, so IO and logs can be split by epoch
        row = {"epoch": epoch + 1, "train_loss": total / max(n, 1), "attempt": attempt, "ended_at": time.time()}
        if evaluate_dev is not None:
            row.update({f"dev_{k}": v for k, v in evaluate_dev().items()})
        history.append(row)
        log(row)
        metric = epoch_score(row, primary)
        if metric > best:
            best, best_epoch, stale = metric, epoch + 1, 0
            # Only trainable tensors change, so only they are kept (not a second copy of the encoder).
            best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items() if k in trainable}
        else:
            stale += 1
            stopped = stale >= cfg.patience
        if on_epoch is not None:
            on_epoch(row, state)
    if best_state is not None:
        core.load_state_dict(best_state, strict=False)
    return FitResult(history, best_epoch, best, seconds, seen, resumes, first_step)
