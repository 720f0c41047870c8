"""QuickLinear on the reference path: the ground truth that every kernel is compared to."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quick.algorithms.rtn import quantize_model_rtn
from quick.formats.layouts import LAYOUTS, LayoutError
from quick.formats.weights import quantize
from quick.models.linears import quantizable_linears
from quick.nn.linear import QuickLinear
from quick.testing import REL_BOUND, reference_matmul, rel_error


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_reference_forward_matches_fp64(layout, dtype, m):
    torch.manual_seed(m)
    lin = nn.Linear(256, 192, bias=True)
    mod = QuickLinear.from_linear(lin, 64, layout=layout, dtype=dtype)
    x = torch.randn(m, 256).to(dtype)
    qw = quantize(lin.weight.data, 64, dtype=dtype)
    ref = reference_matmul(x, qw, lin.bias.data.to(dtype))
    out = mod(x)
    assert out.dtype == dtype and out.shape == (m, 192)
    assert rel_error(out, ref) < REL_BOUND[dtype]


def test_all_layouts_agree_and_batch_dims():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    x = torch.randn(2, 3, 128, dtype=torch.float16)
    outs = [QuickLinear.from_linear(lin, 32, layout=name)(x) for name in sorted(LAYOUTS)]
    assert outs[0].shape == (2, 3, 64)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_state_dict_round_trip():
    torch.manual_seed(0)
    mod = QuickLinear.from_linear(nn.Linear(128, 64, bias=True), 32)
    fresh = QuickLinear(128, 64, bias=True, group_size=32)
    fresh.load_state_dict(mod.state_dict())
    x = torch.randn(4, 128, dtype=torch.float16)
    assert torch.equal(fresh(x), mod(x))
    assert set(mod.state_dict()) == {"qweight", "scales", "zeros", "bias"}


def test_input_errors():
    mod = QuickLinear(128, 64, group_size=32)
    with pytest.raises(ValueError, match="in_features"):
        mod(torch.randn(2, 100, dtype=torch.float16))
    with pytest.raises(TypeError, match="dtype"):
        mod(torch.randn(2, 128))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        QuickLinear(128, 64, dtype=torch.float32)
    with pytest.raises(LayoutError):
        QuickLinear(128, 60, group_size=32)
    mod.backend = "bogus"
    with pytest.raises(ValueError, match="backend"):
        mod(torch.randn(2, 128, dtype=torch.float16))


def test_quantize_model_rtn_skips_lm_head():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 64))
    model.add_module("lm_head", nn.Linear(64, 128))
    names = [n for n, _ in quantizable_linears(model)]
    assert names == ["proj"]
    quantize_model_rtn(model, group_size=32, dtype=torch.float16, progress=False)
    assert isinstance(model.proj, QuickLinear) and isinstance(model.lm_head, nn.Linear)


@pytest.mark.parametrize("layout", ["quick", "quick_sm90"])
def test_k_not_multiple_of_group_is_padded(layout):
    """SmolLM2's K = 576 at g128: stored zero-padded to whole groups, equal to a ragged last group."""
    torch.manual_seed(3)
    lin = nn.Linear(576, 128, bias=False)
    mod = QuickLinear.from_linear(lin, 128, layout=layout)
    assert mod.in_features == 640 and mod.logical_in_features == 576
    x = torch.randn(3, 576, dtype=torch.float16)
    padded_w = torch.nn.functional.pad(lin.weight.data, (0, 64))
    ref = reference_matmul(torch.nn.functional.pad(x, (0, 64)), quantize(padded_w, 128))
    assert rel_error(mod(x), ref) < REL_BOUND[torch.float16]
    # the ragged last group holds 64 real columns: their codes must span the range (not all zero)
    assert mod.unpack().q[512:576].max() > 0
    assert mod.dequantized_weight().shape == (128, 576)


def test_reference_cache_follows_buffer_updates():
    torch.manual_seed(4)
    a = QuickLinear.from_linear(nn.Linear(128, 64), 32)
    b = QuickLinear.from_linear(nn.Linear(128, 64), 32)
    x = torch.randn(2, 128, dtype=torch.float16)
    out_a = a(x)
    a.load_state_dict(b.state_dict())  # in-place copy: same storage, new version
    assert torch.equal(a(x), b(x)) and not torch.equal(out_a, b(x))


@pytest.mark.parametrize("cast", ["bfloat16", "float", "half"])
def test_model_dtype_casts_keep_the_packed_scales(cast):
    """A fresh fp16 layer under ``model.bfloat16()`` / ``.float()`` / ``.half()``: its packed tensors keep their
    dtypes (the layer's, which its kernels are built for) and it computes in the model's new dtype through casts,
    with the output of the fp16 layer up to the rounding of the new activation dtype."""
    torch.manual_seed(0)
    layer = QuickLinear.from_linear(torch.nn.Linear(256, 128), 128, dtype=torch.float16)
    before = {n: b.dtype for n, b in layer.named_buffers()}
    x = torch.randn(3, 256)
    want = layer(x.half()).float()
    model = getattr(torch.nn.Sequential(layer), cast)()
    new = {"bfloat16": torch.bfloat16, "float": torch.float32, "half": torch.float16}[cast]
    assert {n: b.dtype for n, b in layer.named_buffers()} == before and layer.dtype == torch.float16
    got = model(x.to(new))
    assert got.dtype == new
    tol = {torch.bfloat16: 2e-2, torch.float32: 1e-6, torch.float16: 0.0}[new]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to"])
def test_model_dtype_casts_move_the_compute_dtype(cast):
    """A layer computing in fp32 around fp16 scales follows ``model.half()`` / ``.bfloat16()`` / ``.to(dtype)``:
    its output then has the new dtype (not the old compute dtype), as every other layer of the model does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(QuickLinear.from_linear(torch.nn.Linear(256, 128), 128, dtype=torch.float16))
    model[0].set_compute_dtype(torch.float32)
    assert model[0](torch.randn(2, 256)).dtype == torch.float32
    want = torch.bfloat16 if cast == "bfloat16" else torch.float16
    model = model.to(want) if cast == "to" else getattr(model, cast)()
    assert model[0].compute_dtype == want
    assert model[0](torch.randn(2, 256, dtype=want)).dtype == want
    model.to("cpu")  # a device move keeps the compute dtype
    assert model[0].compute_dtype == want
