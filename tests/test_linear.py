"""QuickLinear on the reference path: the ground truth that every kernel is compared to."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quick.nn.linear import QuickLinear
from quick.packing.layouts import LAYOUTS, LayoutError
from quick.quant.apply import quantizable_linears, quantize_model_rtn
from quick.quant.primitives import quantize
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
