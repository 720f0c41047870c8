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


# ---- QA_ROPE: rotary + cache append + attention in one launch (quick::attn_decode_rope)


def _rope_inputs(b, h, kv, length, d, dtype, seed=0, fused=True):
    """q / k / v as the fast step gets them: views of one fused q/k/v product (strided rows) or separate tensors;
    cos / sin of one position in the model dtype; a cache to append to."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if fused:
        qkv = torch.randn(b, (h + 2 * kv) * d, device="cuda", generator=g).to(dtype)
        q, k, v = qkv.split((h * d, kv * d, kv * d), dim=-1)
    else:
        q, k, v = (torch.randn(b, n * d, device="cuda", generator=g).to(dtype) for n in (h, kv, kv))
    ang = torch.rand(b, d // 2, device="cuda", generator=g) * 6.0
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    keys = torch.randn(b, kv, length, d, device="cuda", generator=g).to(dtype)
    values = torch.randn(b, kv, length, d, device="cuda", generator=g).to(dtype)
    return q, k, v, cos, sin, keys, values


def _rope64(x, cos, sin, dtype):
    """Rotate-half in float64, rounded to the model dtype as the kernel (and the unfused path) store it."""
    half = x.shape[-1] // 2
    x, c, s = x.double(), cos.double()[:, None], sin.double()[:, None]
    return (x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s).to(dtype)


def _rope_case(b, h, kv, length, d, dtype, pos, splits=None, fused=True, mask=True, seed=0):
    q, k, v, cos, sin, keys, values = _rope_inputs(b, h, kv, length, d, dtype, seed, fused)
    before_k, before_v = keys.clone(), values.clone()
    m = _causal_mask(b, length, min(pos, length - 1), dtype, pad=min(pos, 3)) if mask else None
    out = poisoned((b, h * d), dtype, "cuda")
    at.decode_attention_rope(q, k, v, keys, values, torch.tensor([pos], device="cuda"), cos, sin, m, d**-0.5,
                             splits=splits, out=out)  # fmt: skip
    qr, kr = _rope64(q.view(b, h, d), cos, sin, dtype), _rope64(k.view(b, kv, d), cos, sin, dtype)
    want_k, want_v = before_k.clone(), before_v.clone()
    if pos < length:
        want_k[:, :, pos], want_v[:, :, pos] = kr, v.view(b, kv, d)
    # the cache: only row pos changed; v exactly, the rotated key within one rounding of the float64 rotation
    others = torch.ones(length, dtype=torch.bool, device="cuda")
    if pos < length:
        others[pos] = False
    assert torch.equal(keys[:, :, others], before_k[:, :, others])
    assert torch.equal(values, want_v)
    if pos < length:
        assert rel_error(keys[:, :, pos], kr) < REL_BOUND[dtype]
    ref = _reference(qr, want_k, want_v, min(pos, length - 1), m, d**-0.5)
    _check(out.view(b, h, d), ref, dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", at.HEAD_DIMS)
@pytest.mark.parametrize("h,kv", [(8, 8), (9, 3), (8, 2), (16, 2)])
@pytest.mark.parametrize("b,length,pos", [(1, 256, 200), (3, 37, 36), (2, 1000, 0), (5, 300, 129)])
def test_rope_against_float64(b, length, pos, h, kv, d, dtype):
    _rope_case(b, h, kv, length, d, dtype, pos, seed=b * 1000 + length + d + h)


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("fused", [True, False])
def test_rope_forced_splits_row_owner(splits, fused):
    """Whichever split holds ``pos`` writes the row and reads it from registers; no mask (every position in)."""
    _rope_case(2, 32, 8, 513, 128, torch.float16, 400, splits=splits, fused=fused, mask=False)


def test_rope_pos_past_the_cache_writes_nothing():
    """``pos >= L``: attention over the whole cache, no write (the unfused path would fail on the index instead)."""
    _rope_case(2, 8, 4, 64, 64, torch.bfloat16, 64, splits=3, mask=False)


def test_rope_matches_the_unfused_step():
    """The op against the fast step's unfused path (rotary, two index copies, the plain kernel) on the same inputs."""
    from quick.models.decoder import attend

    b, h, kv, length, d, dtype = 4, 32, 8, 300, 128, torch.float16
    q, k, v, cos, sin, keys, values = _rope_inputs(b, h, kv, length, d, dtype, seed=7)
    keys2, values2 = keys.clone(), values.clone()
    pos = torch.tensor([150], device="cuda")
    m = _causal_mask(b, length, 150, dtype)
    fused = torch.ops.quick.attn_decode_rope(q, k, v, keys, values, pos, cos, sin, m, d**-0.5)
    plain = attend(q, k, v, keys2, values2, pos, cos, sin, m, None, None, 0.0, d**-0.5, kernel=True)
    assert rel_error(fused, plain) < REL_BOUND[dtype]
    assert torch.equal(values, values2)
    assert rel_error(keys, keys2) < 1e-3 and torch.equal(keys[:, :, :150], keys2[:, :, :150])


def test_rope_graph_replay_at_moving_positions():
    """One captured launch appends at each replay's ``pos`` and attends over everything written so far."""
    b, h, kv, length, d, dtype = 1, 32, 32, 64, 128, torch.bfloat16
    q, k, v, cos, sin, keys, values = _rope_inputs(b, h, kv, length, d, dtype, seed=3)
    pos = torch.tensor([0], device="cuda")
    mask = torch.zeros(b, 1, 1, length, dtype=dtype, device="cuda")
    fn = lambda: torch.ops.quick.attn_decode_rope(q, k, v, keys, values, pos, cos, sin, mask, d**-0.5)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    kr = _rope64(k.view(b, kv, d), cos, sin, dtype)
    for p in (3, 4, 40, 63):
        pos.fill_(p)
        mask.zero_()
        mask[..., p + 1 :] = torch.finfo(dtype).min
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(keys[:, :, p], kr) < REL_BOUND[dtype] and torch.equal(values[:, :, p], v.view(b, kv, d))
        qr = _rope64(q.view(b, h, d), cos, sin, dtype)
        _check(out.view(b, h, d), _reference(qr, keys, values, p, mask, d**-0.5), dtype)


def test_rope_bad_input_is_a_clear_error():
    q, k, v, cos, sin, keys, values = _rope_inputs(2, 8, 4, 16, 64, torch.float16)
    p = torch.tensor([3], device="cuda")
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")[1:].view(q.shape)  # 2 bytes off
    with pytest.raises(at.AttnError, match="aligned"):
        at.decode_attention_rope(shifted, k, v, keys, values, p, cos, sin, None, 0.1)
    with pytest.raises(at.AttnError, match="cos"):
        at.decode_attention_rope(q, k, v, keys, values, p, cos[:, :32], sin, None, 0.1)


def test_rope_pdl_is_bitwise_the_plain_launch():
    """The QA_PDL variant after a kernel that writes its q/k/v (a torch kernel, then the same under graph capture):
    bitwise the plain QA_ROPE launch, caches included."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    b, h, kv, length, d, dtype = 2, 32, 8, 300, 128, torch.float16
    q, k, v, cos, sin, keys, values = _rope_inputs(b, h, kv, length, d, dtype, seed=11)
    src = torch.randn_like(q.contiguous())
    pos = torch.tensor([200], device="cuda")
    outs = []
    for pdl in (False, True):
        kc, vc = keys.clone(), values.clone()
        q2 = q.clone()
        torch.cuda.synchronize()
        q2.copy_(src)  # written by the kernel just before the launch
        o = at.decode_attention_rope(q2, k, v, kc, vc, pos, cos, sin, None, d**-0.5, pdl=pdl)
        outs.append((o, kc, vc))
    assert all(torch.equal(u, w) for u, w in zip(outs[0], outs[1], strict=True))
    kc, vc, q2 = keys.clone(), values.clone(), q.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q2.copy_(src)
        o = at.decode_attention_rope(q2, k, v, kc, vc, pos, cos, sin, None, d**-0.5, pdl=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o, outs[0][0]) and torch.equal(kc, outs[0][1])
