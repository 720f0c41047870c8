"""Device correctness of the decode attention kernel (``csrc/quick_attn.cu``) against a float64 reference of
``softmax(q k^T * scale + mask) v`` over cache positions ``0..pos``: fresh random inputs per case, NaN-poisoned
outputs, relative Frobenius bounds that fail on any indexing error, grouped-query heads, every head dim, forced
split counts, padded (masked) positions, CUDA-graph replay at moving positions, bitwise determinism. Skipped
without an sm_80+ GPU and nvcc."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, require_sm80_and_nvcc

from quick.testing import REL_BOUND, poisoned, rel_error

pytestmark = pytest.mark.gpu

require_sm80_and_nvcc()

from quick.kernels import attention as at  # noqa: E402


def _inputs(b, h, kv, length, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, d, device="cuda", generator=g).to(dtype)
    keys = torch.randn(b, kv, length, d, device="cuda", generator=g).to(dtype)
    values = torch.randn(b, kv, length, d, device="cuda", generator=g).to(dtype)
    return q, keys, values


def _reference(q, keys, values, pos, mask, scale):
    """float64, positions 0..pos only, head h on kv head h // (H / KV)."""
    b, h, d = q.shape
    kv, n = keys.shape[1], pos + 1
    k = keys[:, :, :n].double().repeat_interleave(h // kv, dim=1)
    v = values[:, :, :n].double().repeat_interleave(h // kv, dim=1)
    s = torch.einsum("bhd,bhtd->bht", q.double(), k) * scale
    if mask is not None:
        s = s + mask.reshape(b, -1)[:, None, :n].double()
    return torch.einsum("bht,bhtd->bhd", torch.softmax(s, dim=-1), v)


def _check(out, ref, dtype):
    assert torch.isfinite(out).all(), "NaN/inf in output (unwritten poisoned element)"
    err = rel_error(out, ref)
    assert err < REL_BOUND[dtype], f"relative error {err:.3e} over bound {REL_BOUND[dtype]}"


def _causal_mask(b, length, pos, dtype, pad=0):
    """The fast step's additive mask [B, 1, 1, L] (finfo.min after ``pos``), with ``pad`` leading positions of every
    other sequence masked too (left padding)."""
    m = torch.zeros(b, 1, 1, length, dtype=dtype, device="cuda")
    m[..., pos + 1 :] = torch.finfo(dtype).min
    if pad:
        m[1::2, ..., :pad] = torch.finfo(dtype).min
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", at.HEAD_DIMS)
@pytest.mark.parametrize("h,kv", [(8, 8), (8, 4), (9, 3), (8, 2), (14, 2), (16, 2)])
@pytest.mark.parametrize("b,length,pos", [(1, 256, 200), (3, 37, 36), (2, 1000, 0), (5, 300, 129)])
def test_against_float64(b, length, pos, h, kv, d, dtype):
    q, keys, values = _inputs(b, h, kv, length, d, dtype, seed=b * 1000 + length + d)
    scale = d**-0.5
    mask = _causal_mask(b, length, pos, dtype, pad=min(pos, 3))
    out = poisoned(q.shape, dtype, "cuda")
    p = torch.tensor([pos], device="cuda")
    at.decode_attention(q, keys, values, p, mask, scale, out=out)
    _check(out, _reference(q, keys, values, pos, mask, scale), dtype)


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16])
def test_forced_splits_and_no_mask(splits):
    q, keys, values = _inputs(2, 32, 8, 513, 128, torch.float16)
    p = torch.tensor([400], device="cuda")
    out = at.decode_attention(q, keys, values, p, None, 0.1, splits=splits)
    _check(out, _reference(q, keys, values, 400, None, 0.1), torch.float16)


def test_large_batch_and_sdpa_agree():
    """Batch 64 (one split per sequence and head), the decoder's usage: the same as SDPA with the causal mask."""
    b, h, kv, length, d = 64, 32, 8, 256, 128
    q, keys, values = _inputs(b, h, kv, length, d, torch.bfloat16)
    mask = _causal_mask(b, length, 177, torch.bfloat16)
    out = at.decode_attention(q, keys, values, torch.tensor([177], device="cuda"), mask, d**-0.5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.view(b, kv, h // kv, d).float(), keys.float(), values.float(), attn_mask=mask.float(), scale=d**-0.5
    ).reshape(b, h, d)
    _check(out, _reference(q, keys, values, 177, mask, d**-0.5), torch.bfloat16)
    assert rel_error(out, sdpa) < REL_BOUND[torch.bfloat16]


def test_graph_replay_at_moving_positions_and_determinism():
    """One captured launch serves every step: ``pos`` is read on the device. Split partials are summed in a fixed
    order, so repeated runs are bitwise equal."""
    b, h, kv, length, d = 1, 32, 32, 256, 128
    q, keys, values = _inputs(b, h, kv, length, d, torch.float16)
    pos = torch.tensor([5], device="cuda")
    mask = torch.zeros(b, 1, 1, length, dtype=torch.float16, device="cuda")
    fn = lambda: torch.ops.quick.attn_decode(q, keys, values, pos, mask, d**-0.5)  # noqa: E731
    first = fn()
    assert all(torch.equal(first, fn()) for _ in range(3))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for p in (0, 17, 128, 255):
        pos.fill_(p)
        mask.zero_()
        mask[..., p + 1 :] = torch.finfo(torch.float16).min
        graph.replay()
        torch.cuda.synchronize()
        _check(out, _reference(q, keys, values, p, mask, d**-0.5), torch.float16)


def test_fully_masked_chunks_and_large_scores():
    """Splits whose positions are all masked contribute nothing; large logits do not overflow (running max)."""
    q, keys, values = _inputs(1, 8, 8, 256, 64, torch.float16)
    q = q * 30
    mask = _causal_mask(1, 256, 255, torch.float16)
    mask[..., :200] = -math.inf
    out = at.decode_attention(q, keys, values, torch.tensor([255], device="cuda"), mask, 0.125, splits=8)
    _check(out, _reference(q, keys, values, 255, mask, 0.125), torch.float16)


def test_bad_input_is_a_clear_error():
    q, keys, values = _inputs(1, 8, 8, 16, 64, torch.float16)
    p = torch.tensor([3], device="cuda")
    with pytest.raises(at.AttnError, match="splits"):
        at.decode_attention(q, keys, values, p, None, 0.1, splits=17)
    with pytest.raises(at.AttnError, match="one device"):
        at.decode_attention(q, keys, values, p.cpu(), None, 0.1)
    with pytest.raises(at.AttnError, match="contiguous"):
        at.decode_attention(q, keys.transpose(2, 3).contiguous().transpose(2, 3), values, p, None, 0.1)
