"""Quantization primitives: AWQ's formulas on hand examples, bounds, symmetric mode, errors."""

from __future__ import annotations

import pytest
import torch

from quick.formats.weights import QuantizationError, dequantize, fake_quantize, quantize


def test_asymmetric_hand_example():
    """One group of 32 weights from -1 to 2: scale = 3/15 = 0.2, zero = round(1/0.2) = 5."""
    w = torch.linspace(-1.0, 2.0, 32).reshape(1, 32)
    qw = quantize(w, group_size=32, dtype=torch.float16)
    assert qw.scales.shape == (1, 1) and qw.zeros.shape == (1, 1)
    assert abs(qw.scales.item() - 0.2) < 1e-3
    assert qw.zeros.item() == 5
    assert qw.q[0, 0] == 0 and qw.q[-1, 0] == 15  # min and max map to the ends of the code range


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_error_within_half_step(dtype, group_size):
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    qw = quantize(w, group_size, dtype=dtype)
    deq = qw.dequantize(torch.float64).t()
    g = 256 if group_size == -1 else group_size
    step = qw.scales.double().repeat_interleave(g, 0).t()
    # Round-to-nearest: every weight within half a step, plus the rounding of the scale to `dtype`
    # (relative eps), which moves the grid by up to 16 codes x eps at the far end of the range.
    eps = torch.finfo(dtype).eps
    assert ((deq - w.double()).abs() <= step * (0.5 + 16 * eps) + 1e-6).all()
    assert qw.q.max() <= 15 and qw.scales.dtype == dtype


def test_symmetric_zero_is_eight():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    qw = quantize(w, 32, zero_point=False)
    assert (qw.zeros == 8).all()
    assert ((qw.dequantize().t() - w).abs() <= qw.scales.float().repeat_interleave(32, 0).t() * 0.51 + 1e-6).all()


def test_fake_quantize_matches_dequantize():
    torch.manual_seed(2)
    w = torch.randn(16, 128, dtype=torch.float16)
    qw = quantize(w, 64)
    assert torch.equal(fake_quantize(w, 64), qw.dequantize(torch.float32).t().half())
    assert fake_quantize(w, 64).shape == w.shape


def test_dequantize_fp64():
    q = torch.tensor([[3], [15]], dtype=torch.uint8)
    scale, zero = torch.tensor([[0.5]], dtype=torch.float16), torch.tensor([[1]], dtype=torch.uint8)
    out = dequantize(q, scale, zero, -1, torch.float64)
    assert out.dtype == torch.float64 and out.flatten().tolist() == [1.0, 7.0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"group_size": 48}, "unsupported group size"),
        ({"group_size": 128, "bits": 3}, "4-bit"),
        ({"group_size": 128, "dtype": torch.float32}, "float16 or bfloat16"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(QuantizationError, match=match):
        quantize(torch.randn(4, 256), **kwargs)


def test_bad_weights():
    with pytest.raises(QuantizationError, match="multiple of the group"):
        quantize(torch.randn(4, 96), 64)
    with pytest.raises(QuantizationError, match="NaN"):
        w = torch.randn(4, 64)
        w[0, 0] = float("nan")
        quantize(w, 32)
    with pytest.raises(QuantizationError, match="2-D"):
        quantize(torch.randn(64), 32)
    with pytest.raises(QuantizationError, match="floating"):
        quantize(torch.ones(4, 64, dtype=torch.int32), 32)
