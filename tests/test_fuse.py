"""Fused q/k/v and gate/up projections (quick/models/fuse.py): same outputs as the unfused model, every layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quick.algorithms.rtn import quantize_model_rtn
from quick.formats.layouts import LAYOUTS, get_layout
from quick.formats.weights import QuantizedWeight
from quick.models import fuse
from quick.models.families import get_family
from quick.models.fuse import FusedProjection, FusedSlice, FuseError, fuse_groups, fuse_linears, fuse_model
from quick.nn.linear import QuickLinear
from quick.testing import random_quantized


def _tiny(model_type: str = "llama", vocab: int = 96):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"attention_bias": True} if model_type == "llama" else {}
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def _parts(layout: str) -> list[int]:
    nm = get_layout(layout).n_multiple
    return [2 * nm, nm, 3 * nm]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packed_concat_equals_repack(layout):
    """The premise of load-time fusion: concatenating packed tensors along N == packing the concatenation."""
    lay = get_layout(layout)
    k, g = 256, 64
    gen = torch.Generator().manual_seed(0)
    parts = [random_quantized(k, n, g, torch.float16, generator=gen) for n in _parts(layout)]
    whole = QuantizedWeight(
        q=torch.cat([p.q for p in parts], 1),
        scales=torch.cat([p.scales for p in parts], 1),
        zeros=torch.cat([p.zeros for p in parts], 1),
        group_size=g,
    )
    want = lay.pack(whole)
    packed = [lay.pack(p) for p in parts]
    for name, t in want.items():
        assert torch.equal(torch.cat([p[name] for p in packed], dim=-1), t), name


def _mods(layout: str, bias: bool, seed: int = 0) -> list[QuickLinear]:
    torch.manual_seed(seed)
    return [QuickLinear.from_linear(nn.Linear(256, n, bias=bias), 64, layout) for n in _parts(layout)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("generic", [False, True], ids=["concat", "repack"])
def test_fused_quicklinear_matches_members(layout, generic, monkeypatch):
    if generic:  # force the through-the-codes path that unknown layouts take
        monkeypatch.setattr(fuse, "CONCAT_SAFE_LAYOUTS", frozenset())
    mods = _mods(layout, bias=True)
    mods[1].bias = None  # a member without bias gets zeros in the fused bias
    fused = fuse_linears(mods)
    assert isinstance(fused, QuickLinear) and fused.out_features == sum(m.out_features for m in mods)
    assert torch.equal(fused.unpack().q, torch.cat([m.unpack().q for m in mods], 1))
    x = torch.randn(5, 256).half()
    want = torch.cat([m(x) for m in mods], dim=-1)
    got = fused(x)
    assert torch.isfinite(got).all()
    # Same dequantized weights; the fp32 matmul over the wider matrix may round differently in its last bit.
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3)


def test_fuse_rejects_mismatched_layers():
    torch.manual_seed(0)
    a = QuickLinear.from_linear(nn.Linear(128, 64), 64)
    with pytest.raises(FuseError, match="group_size"):
        fuse_linears([a, QuickLinear.from_linear(nn.Linear(128, 64), 32)])
    with pytest.raises(FuseError, match="layout_name"):
        fuse_linears([a, QuickLinear.from_linear(nn.Linear(128, 64), 64, layout="quick_sm90")])
    with pytest.raises(FuseError, match="all QuickLinear, all QuickLinearW4A8 or all nn.Linear"):
        fuse_linears([a, nn.Linear(128, 64)])
    with pytest.raises(FuseError, match="at least two"):
        fuse_linears([a])


def test_groups_come_from_the_family_data():
    groups = fuse_groups(get_family("llama"))
    assert [(g.fused, g.members) for g in groups] == [
        ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fused_dense_model_matches(model_type):
    model = _tiny(model_type)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_model(model) == 4  # 2 layers x (qkv, gate/up)
        got = model(ids).logits
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, FusedSlice) and isinstance(layer.self_attn.qkv_proj, FusedProjection)
    assert layer.self_attn.qkv_proj._parts is None  # no activation kept past the step
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32: only summation-order rounding
    assert fuse_model(model) == 0  # idempotent


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_quantized_model_matches(layout):
    model = _tiny("llama")
    quantize_model_rtn(model, group_size=64, layout=layout, dtype=torch.float16, progress=False)
    model.half()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = model(ids).logits.float()
        assert fuse_model(model) == 4
        got = model(ids).logits.float()
    assert not any(isinstance(m, nn.Linear) and "proj" in n for n, m in model.named_modules())
    assert torch.isfinite(got).all()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-3, rel  # fp16 activations between layers: one rounding of the projections may differ


def test_fusing_keeps_the_compute_dtype():
    """fp16 packed layers run in an fp32 model through cast hooks (set_compute_dtype, what CPU evaluation does);
    a fused layer made from them after that gets the same hooks (before: a dtype error at the first call)."""
    from quick.nn.dtypes import set_compute_dtype

    model = _tiny("llama")
    quantize_model_rtn(model, group_size=64, layout="quick", dtype=torch.float16, progress=False)
    set_compute_dtype(model, torch.float32)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_model(model) == 4
        got = model(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fused_slice_recomputes_for_a_new_input():
    torch.manual_seed(0)
    a, b = nn.Linear(32, 16), nn.Linear(32, 8)
    owner = FusedProjection(fuse_linears([a, b]), (16, 8), ("a", "b"))
    sa, sb = FusedSlice(owner, 0), FusedSlice(owner, 1)
    x1, x2 = torch.randn(3, 32), torch.randn(3, 32)
    with torch.no_grad():
        out_a1 = sa(x1)
        out_b2 = sb(x2)  # a different input before b took its part of x1: must not return x1's product
        torch.testing.assert_close(out_a1, a(x1))
        torch.testing.assert_close(out_b2, b(x2))
        torch.testing.assert_close(sa(x2), a(x2))
    assert owner._parts is None


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("generic", [False, True], ids=["concat", "repack"])
def test_split_gives_back_the_members(layout, generic, monkeypatch):
    """Unfusing (what saving a fused model does) returns each member's packed tensors and bias exactly."""
    if generic:
        monkeypatch.setattr(fuse, "CONCAT_SAFE_LAYOUTS", frozenset())
    mods = _mods(layout, bias=True)
    mods[1].bias = None
    owner = FusedProjection(
        fuse_linears(mods), tuple(m.out_features for m in mods), ("a", "b", "c"), (True, False, True)
    )
    for a, b in zip(fuse.split_linear(owner), mods, strict=True):
        assert (a.layout_name, a.out_features, a.bias is None) == (b.layout_name, b.out_features, b.bias is None)
        for name, t in b.packed().items():
            assert torch.equal(a.packed()[name], t), name
        if b.bias is not None:
            assert torch.equal(a.bias, b.bias)


def test_dense_split_and_unfuse_model():
    model = _tiny("qwen2")  # q/k/v with biases, MLP without
    want = {n: p.clone() for n, p in model.named_parameters()}
    fuse_model(model)
    assert fuse.unfuse_model(model) == 4
    got = dict(model.named_parameters())
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], p) for n, p in want.items())


def test_fused_w4a16_model_saves_and_reloads(tmp_path):
    """A fused model is saved under the checkpoint's own linear names (and stays fused); the reloaded model fused
    again gives the same logits."""
    from quick.checkpoint import load_quantized, save_quantized
    from quick.nn.dtypes import round_dense_, set_compute_dtype

    model = _tiny("llama")
    quantize_model_rtn(model, group_size=64, layout="quick", dtype=torch.float16, progress=False)
    set_compute_dtype(model, torch.float32)
    round_dense_(model, torch.float16)  # what the checkpoint stores of the dense parts
    ids = torch.randint(0, 96, (2, 9))
    assert fuse_model(model) == 4
    with torch.no_grad():
        want = model(ids).logits
    save_quantized(model, tmp_path / "q")
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, FusedProjection)
    loaded = load_quantized(tmp_path / "q", dtype=torch.float32, layout="quick")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuickLinear)
    assert fuse_model(loaded) == 4
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
