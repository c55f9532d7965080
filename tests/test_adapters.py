"""The adapter and schedule settings of TrainConfig: which Linears LoRA wraps, rsLoRA/DoRA, the head's own rate,
and training measured in steps."""

from __future__ import annotations

import pytest
import torch

from er_core import TrainConfig
from er_core.errors import ErError
from er_core.families import family_by_type
from er_core.train import build_model, fit, make_optimizer

from .tiny_models import TINY_CONFIGS, make_tiny

FAMILY_OF = {"electra-proj": "electra", "deberta-v3": "deberta-v2"}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_all_modules_wrap_every_linear_of_the_upper_layers_and_nothing_else(name):
    encoder = make_tiny(name)
    cfg = TrainConfig(method="lora", lora_modules="all", lora_r=2, lora_alpha=4)
    model = build_model(encoder, 2, "classification", 3, cfg)
    upper = model.base_model.model.upper
    wrapped = [n for n, m in upper.named_modules() if hasattr(m, "lora_A")]
    plain = [n for n, m in upper.named_modules()  # a wrapped Linear lives on as the LoRA layer's base_layer
             if type(m) is torch.nn.Linear and not n.endswith(".base_layer") and ".lora_" not in n]
    assert wrapped and not plain, f"{name}: Linears left without LoRA: {sorted(plain)}"
    assert not any(".lora_A." in n for n, _ in model.named_parameters() if ".head." in n)  # the head trains whole
    attention = build_model(make_tiny(name), 2, "classification", 3, TrainConfig(method="lora", lora_r=2, lora_modules="attention"))
    fewer = {n for n, _ in attention.named_parameters() if ".lora_A." in n}
    assert 0 < len(fewer) < len([n for n, _ in model.named_parameters() if ".lora_A." in n])
    assert family_by_type(encoder.config.model_type).linear_targets


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_lora_variants_reach_peft(variant):
    model = build_model(make_tiny("bert"), 2, "classification", 3, TrainConfig(method="lora", lora_variant=variant))
    conf = model.peft_config["default"]
    assert conf.use_rslora == (variant == "rslora") and conf.use_dora == (variant == "dora")
    assert any("magnitude" in n for n, _ in model.named_parameters()) == (variant == "dora")


@pytest.mark.parametrize("method", ["reduced", "lora"])
def test_the_head_gets_its_own_rate_and_nothing_else_does(method):
    model = build_model(make_tiny("bert"), 2, "classification", 3, TrainConfig(method=method, lr=1e-4, head_lr=5e-3))
    opt, _ = make_optimizer(model, TrainConfig(method=method, lr=1e-4, head_lr=5e-3), 10)
    by_lr = {}
    for g in opt.param_groups:
        by_lr.setdefault(g["initial_lr"], set()).update(id(p) for p in g["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    head = {names[i] for i in by_lr[5e-3]}
    assert head and all(".head." in f".{n}" for n in head)
    assert {n for n, p in model.named_parameters() if p.requires_grad and ".head." in f".{n}"} == head
    # the head's default rate is settled by the encoder's width, as lr is: lora's on a wide one has its own (at lr it
    # stalled MPNet NER at all-O); every other head trains at lr
    for hidden, want in ((384, {1e-4}), (768, {1e-4, 1e-2} if method == "lora" else {1e-4})):
        default = make_optimizer(model, TrainConfig(method=method, lr=1e-4).for_encoder(hidden), 10)[0]
        assert {g["initial_lr"] for g in default.param_groups} == want, hidden
    same = make_optimizer(model, TrainConfig(method=method, lr=1e-4, head_lr=1e-4), 10)[0]
    assert {g["initial_lr"] for g in same.param_groups} == {1e-4}


def test_min_steps_adds_epochs_to_small_tasks_only_and_early_stopping_still_ends():
    cfg = TrainConfig(epochs=4, min_steps=100)
    assert cfg.max_epochs(10) == 10 and cfg.max_epochs(50) == 4 and cfg.max_epochs(33) == 4
    model = torch.nn.Linear(2, 2)
    runs = []

    def batches(epoch):
        runs.append(epoch)
        return []

    dev = iter([0.5, 0.6, 0.6, 0.6, 0.9, 0.9])
    r = fit(model, "classification", TrainConfig(epochs=1, min_steps=30, patience=2, lr=1e-3), batches, 5,
            lambda: {"micro_f1": next(dev)}, "micro_f1")
    assert runs == [0, 1, 2, 3] and r.best_epoch == 2  # 6 epochs allowed by min_steps, patience ended it after 4


def test_per_method_defaults_fill_only_what_is_left_out():
    assert TrainConfig(method="lora", lora_r=32).lora_r == 32
    d = TrainConfig(method="lora")
    assert None not in (d.min_steps, d.lora_r, d.lora_alpha, d.lora_modules)
    assert d.lr is None and d.for_encoder(384).lr == 1e-3 and TrainConfig(lr=2e-4).for_encoder(768).lr == 2e-4  # lr: by width
    assert TrainConfig(method="reduced").for_encoder(768).lr < TrainConfig(method="reduced").for_encoder(384).lr
    assert d.head_lr is None and d.for_encoder(768).head_lr == 1e-2  # the head's rate: by width too
    assert TrainConfig(method="lora", head_lr=3e-3).for_encoder(768).head_lr == 3e-3
    with pytest.raises(ErError, match="lora_modules 'ffn' must be one of"):
        TrainConfig(method="lora", lora_modules="ffn")
    with pytest.raises(ErError, match="min_steps"):
        TrainConfig(min_steps=-1)
