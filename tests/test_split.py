"""The split is exact: upper(lower(x)) == the unsplit model, for every family in the tiny table."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, GPT2Config

from er_core.errors import ErError, UnsupportedModelError
from er_core.families import family_for, get_path, lora_target_modules, num_layers, supported_model_types
from er_core.split import lower_fingerprint, resolve_layer, split_encoder
from tests.tiny_models import LAYERS, TINY_CONFIGS, attn_implementations, make_tiny, padded_batch

NAMES = list(TINY_CONFIGS)
CUTS = sorted({0, 1, LAYERS // 2, LAYERS})
CASES = [(n, impl) for n in NAMES for impl in attn_implementations(n)]


def _masked_max_diff(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


@pytest.mark.parametrize("k", CUTS)
@pytest.mark.parametrize("name,impl", CASES)
def test_split_matches_unsplit_model(name, impl, k):
    model = make_tiny(name, attn_implementation=impl)
    ids, mask = padded_batch(model.config)
    lower, upper = split_encoder(model, k)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        mid = lower(ids, mask)
        got = upper(mid, mask)
    assert mid.shape == want.shape == got.shape
    assert _masked_max_diff(got, want, mask) <= 1e-5
    assert not torch.isnan(got).any() and not torch.isnan(mid).any()


@pytest.mark.parametrize("name", NAMES)
def test_padding_mask_matters(name):
    # Guards the test above: if the mask changed nothing, matching outputs would prove little.
    model = make_tiny(name)
    ids, mask = padded_batch(model.config)
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).last_hidden_state
        unmasked = model(input_ids=ids, attention_mask=torch.ones_like(mask)).last_hidden_state
    assert _masked_max_diff(masked, unmasked, mask) > 1e-2


def test_token_type_ids_reach_the_embeddings():
    model = make_tiny("bert")
    ids, mask = padded_batch(model.config)
    types = torch.ones_like(ids)
    lower, upper = split_encoder(model, 2)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = upper(lower(ids, mask, token_type_ids=types), mask)
        default = lower(ids, mask)
        zeros = lower(ids, mask, token_type_ids=torch.zeros_like(ids))
    assert _masked_max_diff(got, want, mask) <= 1e-5
    assert torch.equal(default, zeros)


def test_unsupported_model_names_type_and_supported_ones():
    gpt2 = AutoModel.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64))
    listing = ", ".join(supported_model_types())
    with pytest.raises(UnsupportedModelError, match=f"'gpt2'.*{listing}"):
        split_encoder(gpt2, 1)
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        lora_target_modules("gpt2")


def test_table_covers_required_families():
    assert {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2"} <= set(supported_model_types())
    assert lora_target_modules("bert") == ["query", "value"]
    assert lora_target_modules("distilbert") == ["q_lin", "v_lin"]
    assert lora_target_modules("deberta-v2") == ["query_proj", "value_proj"]
    assert all(num_layers(TINY_CONFIGS[n]()) == LAYERS for n in NAMES)


@pytest.mark.parametrize("k", [-1, LAYERS + 1])
def test_k_out_of_range_names_valid_range(k):
    with pytest.raises(ErError, match=rf"layer {k} is out of range.*0\.\.{LAYERS}"):
        split_encoder(make_tiny("bert"), k)


@pytest.mark.parametrize(
    "k,want",
    [(0, 0), (3, 3), (LAYERS, LAYERS), (0.5, 2), (0.25, 1), (1.0, 4), ("3", 3), ("0.5", 2), (" 1 ", 1), ("1.0", 4)],
)
def test_resolve_layer(k, want):
    assert resolve_layer(k, LAYERS) == want


@pytest.mark.parametrize("k", ["abc", "", 1.5, 0.0, -0.5, float("nan"), 5, -1, "7", True, None])
def test_resolve_layer_rejects(k):
    with pytest.raises(ErError, match=f"layer.*{re.escape(repr(k))}"):
        resolve_layer(k, LAYERS)


@pytest.mark.parametrize("name", NAMES)
def test_fingerprint_follows_lower_weights_and_k(name):
    fp = {k: lower_fingerprint(split_encoder(make_tiny(name, seed=0), k)[0]) for k in CUTS}
    assert len(set(fp.values())) == len(CUTS)
    assert lower_fingerprint(split_encoder(make_tiny(name, seed=0), 2)[0]) == fp[2]
    assert lower_fingerprint(split_encoder(make_tiny(name, seed=1), 2)[0]) != fp[2]
    assert len(fp[2]) == 64 and int(fp[2], 16) >= 0


def test_fingerprint_at_k0_covers_embeddings_only():
    model = make_tiny("bert")
    lower, upper = split_encoder(model, 0)
    before = lower_fingerprint(lower)
    assert all(n.startswith("embeddings.") for n in lower.state_dict())
    with torch.no_grad():
        upper.layers[0].attention.self.query.weight.add_(1.0)
    assert lower_fingerprint(lower) == before
    with torch.no_grad():
        lower.embeddings.word_embeddings.weight[5, 0] += 1.0
    assert lower_fingerprint(lower) != before


def test_fingerprint_stable_across_processes():
    code = (
        "from tests.tiny_models import make_tiny; from er_core.split import split_encoder, lower_fingerprint; "
        "print(lower_fingerprint(split_encoder(make_tiny('bert'), 2)[0]))"
    )
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=str(here.parent), PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == lower_fingerprint(split_encoder(make_tiny("bert"), 2)[0])


def _ptrs(module):
    return {p.data_ptr() for p in module.parameters()}


@pytest.mark.parametrize("k", CUTS)
@pytest.mark.parametrize("name", NAMES)
def test_parts_share_parameters_with_model(name, k):
    model = make_tiny(name)
    lower, upper = split_encoder(model, k)
    assert _ptrs(lower) | _ptrs(upper) <= _ptrs(model)
    layers = get_path(model, family_for(model.config).layers)
    assert list(lower.layers) + list(upper.layers) == list(layers)  # the same objects, in order
    # Lower and upper overlap only in what the upper declares (DeBERTa's relative-position table).
    shared = {p.data_ptr() for n, p in upper.named_parameters() if n in upper.shared_with_lower}
    assert _ptrs(lower) & _ptrs(upper) == shared
    allowed = ("layers.", "shared.", "after_layer0.", "final.")
    assert all(n.startswith(allowed) for n, _ in upper.named_parameters())
    if k == LAYERS:  # nothing but the family's norm after the last layer (ModernBERT)
        assert all(n.startswith("final.") for n, _ in upper.named_parameters())


def test_deberta_conv_goes_with_layer0():
    model = make_tiny("deberta-v2")
    assert model.encoder.conv is not None
    lower0, upper0 = split_encoder(model, 0)
    lower1, upper1 = split_encoder(model, 1)
    assert upper0.after_layer0 is model.encoder.conv and lower0.after_layer0 is None
    assert lower1.after_layer0 is model.encoder.conv and upper1.after_layer0 is None
    assert set(upper1.shared_with_lower) == {
        "shared.rel_embeddings.weight", "shared.LayerNorm.weight", "shared.LayerNorm.bias"}


def test_electra_projection_is_in_lower():
    model = make_tiny("electra-proj")
    lower, upper = split_encoder(model, 0)
    assert lower.embeddings_project is model.embeddings_project
    assert any(n.startswith("embeddings_project.") for n in lower.state_dict())


def _loss(out, mask):
    # A fixed projection: a sum of squares would be constant after the final LayerNorm.
    weights = torch.linspace(-1, 1, out.shape[-1])
    return (out @ weights)[mask.bool()].pow(2).mean()


@pytest.mark.parametrize("name", NAMES)
def test_gradient_flows_through_upper(name):
    model = make_tiny(name)
    ids, mask = padded_batch(model.config)
    lower, upper = split_encoder(model, 1)
    with torch.no_grad():
        mid = lower(ids, mask)
    mid.requires_grad_(True)
    _loss(upper(mid, mask), mask).backward()
    assert mid.grad is not None and mid.grad.abs().sum() > 0
    for n, p in upper.layers.named_parameters():
        assert p.grad is not None, n
    in_both = {id(p) for n, p in upper.named_parameters() if n in upper.shared_with_lower}
    assert all(p.grad is None for p in lower.parameters() if id(p) not in in_both)


@pytest.mark.parametrize("name", NAMES)
def test_peft_lora_on_upper(name):
    model = make_tiny(name)
    ids, mask = padded_batch(model.config)
    lower, upper = split_encoder(model, LAYERS // 2)
    with torch.no_grad():
        mid = lower(ids, mask)
        before = upper(mid, mask)
    targets = lora_target_modules(model.config.model_type)
    peft_upper = get_peft_model(upper, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = [n for n, p in peft_upper.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {t for t in targets if any(f".{t}.lora_" in n for n in trainable)} == set(targets)
    assert torch.allclose(peft_upper(mid, mask), before, atol=1e-6)  # LoRA B starts at zero

    opt = torch.optim.SGD([p for p in peft_upper.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        _loss(peft_upper(mid, mask), mask).backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(peft_upper(mid, mask), before, atol=1e-4)
        assert torch.equal(lower(ids, mask), mid)  # training the upper leaves the lower alone


def test_splitting_a_bert_model_loads_no_other_familys_modelling_code():
    """Workers pay only for their model's family: the table names DeBERTa's and MPNet's code, imported on use."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from transformers import BertConfig, BertModel\n"
            "from er_core.split import split_encoder\n"
            "m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))\n"
            "lower, upper = split_encoder(m, 1)\n"
            "h = lower(torch.tensor([[101, 7, 102]]), torch.ones(1, 3, dtype=torch.long))\n"
            "upper(h, torch.ones(1, 3, dtype=torch.long))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[2:3] in (['deberta_v2'], ['mpnet'], ['deberta'])))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip() == "[]"
