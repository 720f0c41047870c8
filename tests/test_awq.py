"""AWQ on tiny random Llama and Gemma3 models: families as data, exact scale folding, AWQ <= RTN, accuracy."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_causal_lm
from torch import nn

from quick.algorithms import awq, calibration
from quick.auto import quantize_model_rtn
from quick.models.families import FAMILIES, FamilyError, active_groups, decoder_layers, get_family
from quick.nn.dtypes import set_compute_dtype
from quick.nn.linear import QuickLinear, padded_in_features

transformers = pytest.importorskip("transformers")

GROUP = 32


def tiny_llama() -> nn.Module:
    # MHA: v_proj and o_proj have the same shape, so the v->o group is active
    return tiny_causal_lm(transformers.LlamaConfig, num_attention_heads=4, num_key_value_heads=4)


def tiny_gemma3() -> nn.Module:
    return tiny_causal_lm(
        transformers.Gemma3TextConfig,
        num_attention_heads=2,
        num_key_value_heads=1,  # GQA: no v->o group
        head_dim=64,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],  # each layer gets its own mask / rope
    )


def with_outliers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the norms a few large channels, as trained LLMs have: the situation AWQ is designed for.

    Also randomises the norm weights so that a fold that ignores Gemma's ``1 + weight`` cannot pass.
    """
    gen = torch.Generator().manual_seed(seed)
    family = get_family(model.config)
    with torch.no_grad():
        for layer in decoder_layers(model, family):
            for name, mod in layer.named_modules():
                if name.endswith("norm") and "self_attn" not in name:
                    w = mod.weight
                    base = 1.0 + 0.2 * torch.randn(w.shape, generator=gen)
                    base[torch.randperm(w.numel(), generator=gen)[:3]] *= 12.0
                    w.copy_(base - family.norm_offset)
            # make the weights a bit heavier-tailed than the init
            for mod in layer.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.mul_(1 + torch.rand(mod.weight.shape, generator=gen))
    return model


def tiny_phi3(kv_heads: int = 4) -> nn.Module:
    # q|k|v and gate|up are single linears; MHA by default, so o_proj's scales fold into the v rows of qkv_proj
    return tiny_causal_lm(
        transformers.Phi3Config,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_gemma2() -> nn.Module:  # the Gemma 3 layer without q/k norms, soft-capped logits, alternating windows
    return tiny_causal_lm(transformers.Gemma2Config, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                          sliding_window=16, pad_token_id=0, bos_token_id=2, eos_token_id=1)  # fmt: skip


def tiny_gemma() -> nn.Module:  # Gemma 1: llama layers, 1 + weight norms, GeGLU
    return tiny_causal_lm(transformers.GemmaConfig, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                          pad_token_id=0, bos_token_id=2, eos_token_id=1)  # fmt: skip


def tiny_granite() -> nn.Module:  # llama layers with multipliers: residual branches scaled, logits divided
    return tiny_causal_lm(transformers.GraniteConfig, num_attention_heads=4, num_key_value_heads=4,
                          embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.1,
                          logits_scaling=4.0)  # fmt: skip


def tiny_qwen3_5() -> nn.Module:  # a Gated DeltaNet (linear attention) layer, then a gated full-attention one
    return tiny_causal_lm(transformers.Qwen3_5TextConfig, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                          layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                          linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)  # fmt: skip


def tiny_seed_oss() -> nn.Module:  # llama layers with q/k/v biases
    return tiny_causal_lm(transformers.SeedOssConfig, num_attention_heads=4, num_key_value_heads=4, head_dim=16)


def tiny_smollm3() -> nn.Module:  # llama layers, the second without rotary
    return tiny_causal_lm(transformers.SmolLM3Config, num_attention_heads=4, num_key_value_heads=4,
                          no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


MODELS = {
    "llama": tiny_llama,
    "seed_oss": tiny_seed_oss,
    "smollm3": tiny_smollm3,
    "qwen3_5": tiny_qwen3_5,
    "gemma3_text": tiny_gemma3,
    "phi3": tiny_phi3,
    "gemma": tiny_gemma,
    "gemma2": tiny_gemma2,
    "granite": tiny_granite,
}


def calib(n: int = 16, seqlen: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize(
    "model_type",
    ["llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text", "gemma", "gemma2", "granite", "qwen3_5"],
)
def test_families_cover_model_types(model_type):
    fam = get_family(model_type)
    assert model_type in fam.model_types
    first = fam.groups[0]
    assert first.prev == "input_layernorm"
    assert first.linears == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert first.inspect == "self_attn" and first.inspect_kwargs
    by_linears = {g.linears: g for g in fam.groups}
    assert by_linears[("self_attn.o_proj",)].prev == "self_attn.v_proj"
    assert by_linears[("self_attn.o_proj",)].same_shape == ("self_attn.v_proj", "self_attn.o_proj")
    assert by_linears[("mlp.down_proj",)].prev == "mlp.up_proj"
    mlp = by_linears[("mlp.gate_proj", "mlp.up_proj")]
    if model_type.startswith(("gemma3", "gemma2")):  # sandwich norms: the MLP reads pre_feedforward_layernorm
        assert mlp.prev == "pre_feedforward_layernorm" and fam.norm_offset == 1.0 and fam.requires_bos
    else:
        assert mlp.prev == "post_attention_layernorm"
        assert fam.norm_offset == (1.0 if model_type in ("gemma", "qwen3_5") else 0.0)  # 1 + weight norms
    assert any(s in "self_attn.q_proj" for s in fam.no_clip) and any(s in "self_attn.k_proj" for s in fam.no_clip)


def test_gemma3_multimodal_keeps_vision_dense():
    fam = get_family("gemma3")
    assert fam.layers_path == "model.language_model.layers"
    assert "vision_tower" in fam.modules_to_not_convert


def test_unknown_family_error_names_type_and_fix():
    with pytest.raises(FamilyError, match="falcon") as e:
        get_family("falcon")
    assert "families.py" in str(e.value) and "ModelFamily" in str(e.value)


def test_families_unique_model_types():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))


def test_v_to_o_group_follows_shapes():
    llama, gemma = tiny_llama(), tiny_gemma3()

    def names(m):
        fam = get_family(m.config)
        return [g.linears for g in active_groups(decoder_layers(m, fam)[0], fam)]

    assert ("self_attn.o_proj",) in names(llama)  # MHA: shapes equal
    assert ("self_attn.o_proj",) not in names(gemma)  # 1 KV head: v_proj [64, 64] vs o_proj [64, 128]
    assert ("self_attn.o_proj",) in names(tiny_phi3())  # q|k|v in equal parts: the v rows are o_proj's input
    assert ("self_attn.o_proj",) not in names(tiny_phi3(kv_heads=2))  # GQA: the tail rows are not v alone
    assert ("mlp.down_proj",) in names(tiny_phi3(kv_heads=2))  # gate|up: always two equal parts


# ------------------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("kind", list(MODELS))
def test_scale_folding_is_exact(kind):
    """Folding arbitrary scales into every group must leave the float model's function unchanged."""
    torch.manual_seed(0)
    model = with_outliers(MODELS[kind]())
    family = get_family(model.config)
    ids = calib(4, 48)
    with torch.no_grad():
        ref = model(ids).logits
    folded = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    n_groups = 0
    for layer in decoder_layers(folded, family):
        for g in active_groups(layer, family):
            k = layer.get_submodule(g.linears[0]).in_features
            awq.fold_scale(layer, g, torch.exp(torch.randn(k, generator=gen)), family.norm_offset)
            n_groups += 1
    # Qwen3.5: the linear-attention layer's input, MLP in and down; the attention layer's four
    want = {"llama": 8, "gemma3_text": 6, "phi3": 8, "gemma": 8, "gemma2": 8, "granite": 8, "qwen3_5": 7}
    want |= {"seed_oss": 8, "smollm3": 8}
    assert n_groups == want[kind]
    with torch.no_grad():
        out = folded(ids).logits
    # the weights did change ...
    l0, f0 = decoder_layers(model, family)[0], decoder_layers(folded, family)[0]
    first = active_groups(l0, family)[0].linears[0]
    assert not torch.allclose(l0.get_submodule(first).weight, f0.get_submodule(first).weight)
    # ... the function did not
    assert rel(out, ref) < 1e-4


def test_gemma_fold_uses_one_plus_weight():
    """For Gemma the effective norm multiplier (1 + w) must be divided by s, not w."""
    model = with_outliers(tiny_gemma3())
    family = get_family(model.config)
    layer = decoder_layers(model, family)[0]
    g = family.groups[0]
    before = layer.input_layernorm.weight.detach().clone()
    s = torch.full((64,), 2.0)
    awq.fold_scale(layer, g, s, family.norm_offset)
    torch.testing.assert_close(1 + layer.input_layernorm.weight, (1 + before) / 2)


# --------------------------------------------------------------------------------------- AWQ vs RTN


def _layer_out(layer: nn.Module, inputs: calibration.LayerInputs, index: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [awq._layer_output(layer(x, **kw)) for x, kw in zip(inputs.hidden, inputs.kwargs[index], strict=True)]
        )


def _pack_layer(layer: nn.Module, family) -> nn.Module:
    for n, lin in awq.layer_linears(layer, family).items():
        parent, _, child = n.rpartition(".")
        setattr(layer.get_submodule(parent), child, QuickLinear.from_linear(lin, GROUP, "quick", True, torch.float16))
    return set_compute_dtype(layer, torch.float32)


@pytest.mark.parametrize("kind", list(MODELS))
def test_awq_loss_not_worse_than_rtn_on_captured_inputs(kind):
    torch.manual_seed(0)
    model = with_outliers(MODELS[kind]())
    family = get_family(model.config)
    inputs = calibration.capture_layer_inputs(model, calib(), family, batch_size=8, device="cpu")
    assert len(inputs.hidden) == 2 and inputs.hidden[0].shape == (8, 64, 64)
    if kind == "gemma3_text":  # sliding and global layers get different masks
        m0, m1 = inputs.kwargs[0][0]["attention_mask"], inputs.kwargs[1][0]["attention_mask"]
        assert m0 is not None and (m1 is None or not torch.equal(m0, m1))
    layer = decoder_layers(model, family)[0]
    ref = _layer_out(layer, inputs, 0)

    rtn = _pack_layer(copy.deepcopy(layer), family)
    settings = awq.AwqSettings(group_size=GROUP, scale_dtype=torch.float16)
    searched = copy.deepcopy(layer)
    outputs, report = awq.awq_layer(searched, family, inputs.hidden, inputs.kwargs[0], settings, torch.device("cpu"))
    torch.testing.assert_close(torch.cat(outputs), ref)  # the next layer gets the float outputs
    for name, r in report.groups.items():
        assert r["loss"] <= r["rtn_loss"], name
    awq_q = _pack_layer(searched, family)

    mse_rtn = float((_layer_out(rtn, inputs, 0) - ref).pow(2).mean())
    mse_awq = float((_layer_out(awq_q, inputs, 0) - ref).pow(2).mean())
    assert mse_awq <= mse_rtn
    assert mse_awq < 0.9 * mse_rtn, (mse_awq, mse_rtn)  # with outlier channels AWQ must clearly help


@pytest.mark.parametrize("kind", list(MODELS))
def test_awq_model_close_to_float(kind):
    torch.manual_seed(0)
    model = with_outliers(MODELS[kind]())
    ids = calib(2, 40, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    skip = get_family(model.config).modules_to_not_convert
    rtn = quantize_model_rtn(copy.deepcopy(model), GROUP, scale_dtype=torch.float16, skip=skip)
    reports: list[awq.LayerReport] = []
    q = awq.quantize_model_awq(copy.deepcopy(model), calib(), GROUP, progress=False, reports=reports)
    packed = [m for m in q.modules() if isinstance(m, QuickLinear)]
    # Phi-3: fused q|k|v and gate|up; Qwen3.5's linear attention: q|k|v, z and out packed, its b and a 16-bit
    assert len(packed) == {"phi3": 8, "qwen3_5": 13}.get(kind, 14) and all(m.dtype == torch.float16 for m in packed)
    assert len(reports) == 2
    with torch.no_grad():
        out_awq, out_rtn = q(ids).logits, rtn(ids).logits
    assert torch.isfinite(out_awq).all()
    err_awq, err_rtn = rel(out_awq, ref), rel(out_rtn, ref)
    # Measured ~0.12 (Llama) and ~0.36 (Gemma3, whose post-branch norms rescale each branch's relative
    # error to full size); a broken fold or a wrong layer input gives errors of order 1.
    # Gemma 1 0.07, Gemma 2 0.16, Granite 0.03 (its residual multiplier shrinks every branch's error), Qwen3.5 0.24
    # (RTN 0.33), Seed-OSS 0.10, SmolLM3 0.14.
    bound = {"llama": 0.2, "gemma3_text": 0.45, "phi3": 0.2, "gemma": 0.12, "gemma2": 0.25, "granite": 0.06}
    bound |= {"qwen3_5": 0.35, "seed_oss": 0.2, "smollm3": 0.2}
    assert err_awq < bound[kind], err_awq
    assert err_awq < err_rtn, (err_awq, err_rtn)


def test_search_samples_subset_and_quantize_false():
    model = with_outliers(tiny_llama())
    ids = calib(2, 40, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    out = awq.quantize_model_awq(
        copy.deepcopy(model), calib(), GROUP, search_samples=8, clip=False, quantize_weights=False, progress=False
    )
    assert not any(isinstance(m, QuickLinear) for m in out.modules())
    with torch.no_grad():  # scaled (not clipped, not quantized): still the same function, up to fp16 rounding
        assert rel(out(ids).logits, ref) < 1e-2


@pytest.mark.parametrize(("k", "group_size"), [(128, 32), (96, 64), (576, 128)])  # ragged: 96/64, 576/128
def test_clip_search_never_worse_than_no_clip(k, group_size):
    torch.manual_seed(0)
    w = torch.randn(64, k) * (1 + 3 * (torch.rand(64, k) > 0.98))
    x = torch.randn(512, k) * (1 + 5 * (torch.rand(k) > 0.9))
    stats = awq.InputStats.empty(k, group_size, False, torch.device("cpu"))
    stats.add(x, search=True)
    max_val = awq.search_clip(w, stats.blocks, group_size, True, torch.float16)
    assert max_val.shape == (64, -(-k // group_size), 1)
    lin = nn.Linear(k, 64, bias=False)
    lin.weight.data = w.clone()
    awq.apply_clip(lin, max_val, group_size)
    # each group's bound is applied to exactly that group's columns
    bound = max_val.expand(-1, -1, group_size).reshape(64, -1)[:, :k]
    assert torch.equal(lin.weight.data, torch.maximum(torch.minimum(w, bound), -bound))
    amax = torch.stack([w[:, i : i + group_size].abs().amax(1) for i in range(0, k, group_size)], 1)
    assert (max_val[:, :, 0] <= amax).all() and (max_val[:, :, 0] >= 0.55 * amax * (1 - 1e-6)).all()
    err = lambda v: float((x @ (awq.fake_quant(v, group_size, True, torch.float16) - w).t()).pow(2).sum())  # noqa: E731
    assert err(lin.weight.data) <= err(w)
    # clipping alone moves the float weights only a little (a misaligned bound would move them a lot)
    assert float((x @ (lin.weight.data - w).t()).pow(2).sum()) < err(w)


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("k", "group_size"), [(128, 32), (256, 128), (96, 64), (576, 128), (64, -1)])
def test_fast_fake_quant_is_bit_identical_to_primitives(k, group_size, dtype, zero_point):
    torch.manual_seed(k)
    w = torch.randn(48, k) * torch.rand(1, k) * 3
    fast = awq.fake_quant(w, group_size, zero_point, dtype)
    ref = awq.reference_fake_quant(w, group_size, zero_point, dtype)
    assert torch.equal(fast, ref)


@pytest.mark.parametrize(
    ("layout", "k", "group_size"), [("quick", 576, 128), ("quick_sm90", 96, 32), ("quick_sm90", 80, -1)]
)
def test_fake_quant_matches_packed_layer(layout, k, group_size):
    """The search's fake quantization equals what QuickLinear.from_linear stores, padding included."""
    torch.manual_seed(k)
    lin = nn.Linear(k, 64, bias=False)
    lin.weight.data *= 1 + 5 * (torch.rand(k) > 0.9)
    packed = QuickLinear.from_linear(lin, group_size, layout, True, torch.float16)
    kp = padded_in_features(k, group_size, layout)
    fq = awq.fake_quant(lin.weight.data, group_size, True, torch.float16, kp)
    assert torch.equal(fq, packed.dequantized_weight(torch.float32))
    assert torch.equal(fq, awq.reference_fake_quant(lin.weight.data, group_size, True, torch.float16, kp))


def test_gram_blocks_and_rescale():
    """Block Gram of a ragged input and its update under x -> x / s equal a direct recomputation."""
    torch.manual_seed(0)
    x = torch.randn(300, 96)
    st = awq.InputStats.empty(96, 64, True, torch.device("cpu"))
    st.add(x[:200], search=True)
    st.add(x[200:], search=False)
    assert st.tokens == 300 and st.gram_tokens == 200 and st.blocks.shape == (2, 64, 64)
    s = torch.rand(96) + 0.5
    st.rescale(s)
    xs = torch.nn.functional.pad(x / s, (0, 32)).double()
    full = xs.t() @ xs
    tol = {"rtol": 1e-4, "atol": 1e-3}  # fp32 products accumulated in fp64
    torch.testing.assert_close(st.blocks[1], full[64:, 64:], **tol)
    torch.testing.assert_close(st.blocks[0], full[:64, :64], **tol)
    torch.testing.assert_close(st.gram, (xs[:200, :96].t() @ xs[:200, :96]), **tol)
    torch.testing.assert_close(st.mean_abs, (x / s).abs().mean(0), **tol)


def test_ragged_group_fake_quant_matches_packed_layer():
    """K=96 with groups of 64: the last group is ragged; search and packing must agree exactly."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 64, bias=True)
    packed = QuickLinear.from_linear(lin, 64, "quick", True, torch.float16)
    x = torch.randn(5, 96)
    ref = x @ awq.fake_quant(lin.weight.data, 64, True, torch.float16).t() + lin.bias.data.half().float()
    out = packed(x.half()).float()
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)


def test_unknown_family_awq_error():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(FamilyError, match="gpt2"):
        awq.quantize_model_awq(model, calib(2, 16), GROUP, progress=False)


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "granite", "qwen3_5"])
def test_w4a8_on_the_families(kind):
    """W4A8 (QQQ's smoothing through the same scale groups, and round-to-nearest) on the families described as data:
    every packed layer W4A8, QQQ closer to the float model than RTN (measured 0.04-0.38 against 0.06-0.56; a fold
    into the wrong op gives errors of order 1)."""
    from quick.algorithms.qqq import quantize_model_qqq
    from quick.algorithms.rtn import quantize_model_rtn_w4a8
    from quick.nn.linear_w4a8 import QuickLinearW4A8

    torch.manual_seed(0)
    model = with_outliers(MODELS[kind]())
    fam = get_family(model.config)
    ids = calib(2, 24, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    q = quantize_model_qqq(copy.deepcopy(model), calib(4, 32), group_size=-1, progress=False)
    rtn = quantize_model_rtn_w4a8(copy.deepcopy(model), skip=fam.modules_to_not_convert, progress=False)
    packed = [n for n, m in q.named_modules() if isinstance(m, QuickLinearW4A8)]
    assert len(packed) == (13 if kind == "qwen3_5" else 14)
    assert not any(isinstance(m, nn.Linear) and not n.endswith(("in_proj_b", "in_proj_a")) for n, m in
                   q.model.layers.named_modules())  # fmt: skip
    with torch.no_grad():
        err_q, err_rtn = rel(q(ids).logits, ref), rel(rtn(ids).logits, ref)
    assert err_q < 0.5 and err_q < err_rtn, (err_q, err_rtn)
