"""CPU-side checks of the decode attention launcher (``quick/kernels/attention.py``): input validation with clear
errors, the split heuristic, the fake implementation, and the fast decode step's choice of SDPA off the GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import check_fusion_switch

from quick.kernels import attention as at


def _t(b=2, h=8, kv=2, length=16, d=64, dtype=torch.float16, device="cpu"):
    q = torch.zeros(b, h, d, dtype=dtype, device=device)
    keys = torch.zeros(b, kv, length, d, dtype=dtype, device=device)
    return q, keys, keys.clone(), torch.zeros(1, dtype=torch.int64, device=device)


def test_validation_names_the_problem():
    q, k, v, p = _t()
    assert at.validate(q, k, v, p, None) == (2, 8, 2, 16, 64)
    cases = [
        ((q[0], k, v, p, None), "q must be"),
        ((q, k, v[:, :1], p, None), "values"),
        ((q, k[:1], v[:1], p, None), "do not match"),
        ((q.float(), k, v, p, None), "dtype"),
        ((q[:, :5], k, v, p, None), "no kernel for 5 query heads"),
        ((*_t(d=96)[:3], p, None), "dim 96"),
        ((q, k, v, p.int(), None), "int64"),
        ((q, k, v, torch.zeros(2, dtype=torch.int64), None), "one int64"),
        ((q, k, v, p, torch.zeros(2, 15)), "mask must be"),
        ((q, k, v, p, torch.zeros(2, 16, dtype=torch.bool)), "additive"),
        ((q, k.transpose(2, 3).contiguous().transpose(2, 3), v, p, None), "contiguous"),
        ((*(t[:1].expand(65536, *t.shape[1:]) for t in (q, k, v)), p, None), "at most 65535"),
    ]
    for args, msg in cases:
        with pytest.raises(at.AttnError, match=msg):
            at.validate(*args)


def test_cpu_tensors_are_refused():
    with pytest.raises(at.AttnError, match="CUDA"):
        at.decode_attention(*_t(), None, 0.1)


def test_split_heuristic():
    # Llama-2-7B on the H200 (32 kv heads, 256 positions of dim 128: 8 loop steps of 32): the split counts measured
    # best at batch 1, 16, 64, 256 (docs/kernels.md)
    assert [at.choose_splits(b, 32, 256, 128, 132) for b in (1, 16, 64, 256)] == [8, 4, 1, 1]
    # 4 query heads per kv head: 16 positions per step (unroll 2)
    assert [at.choose_splits(b, 8, 256, 128, 132, groups=4) for b in (1, 64, 256)] == [16, 4, 1]
    assert at.choose_splits(1, 8, 20, 128, 132) == 1  # 20 positions: one loop step
    assert at.choose_splits(1, 1, 100000, 64, 132) == at.MAX_SPLITS
    assert at.choose_splits(1, 8, 1, 256, 132) == 1
    assert at.positions_per_step(64) == 64 and at.positions_per_step(256, groups=8) == 8


def test_supports_and_variants():
    assert at.supports(32, 8, 128, torch.bfloat16) and not at.supports(32, 8, 80, torch.float16)
    assert not at.supports(12, 8, 128, torch.float16) and not at.supports(48, 3, 128, torch.float16)
    assert len(at.VARIANTS) == len(at.HEAD_DIMS) * len(at.GROUPS) * 2 * 3  # plain, QA_ROPE, QA_ROPE + QA_PDL
    assert sum(d.get("QA_ROPE", 0) for _s, _k, d in at.VARIANTS) == 2 * len(at.VARIANTS) // 3
    assert all(d.get("QA_ROPE") for _s, _k, d in at.VARIANTS if d.get("QA_PDL"))


def test_fake_impl_gives_the_output_shape():
    q, k, v, p = (t.to("meta") for t in _t())
    out = torch.ops.quick.attn_decode(q, k, v, p, None, 0.1)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"


# ---- quick::attn_decode_rope: rotary + cache append + attention (its CPU path is the torch reference)


def _rope_t(b=2, h=8, kv=2, length=16, d=64, dtype=torch.bfloat16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, (h + 2 * kv) * d, generator=g).to(dtype)
    q, k, v = qkv.split((h * d, kv * d, kv * d), dim=-1)
    ang = torch.rand(b, d // 2, generator=g) * 6
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    keys = torch.randn(b, kv, length, d, generator=g).to(dtype)
    values = torch.randn(b, kv, length, d, generator=g).to(dtype)
    return tuple(t.to(device) for t in (q, k, v, keys, values, cos, sin))


def test_rope_validation_names_the_problem():
    q, k, v, keys, values, cos, sin = _rope_t(dtype=torch.float16)
    p = torch.zeros(1, dtype=torch.int64)
    assert at.validate_rope(q, k, v, keys, values, p, cos, sin, None) == (2, 8, 2, 16, 64)
    cases = [
        ((q.view(2, 8, 64), k, v, keys, values, p, cos, sin), "2-D"),
        ((q[:, :100], k, v, keys, values, p, cos, sin), "whole number of heads"),
        ((q, k[:, :64], v, keys, values, p, cos, sin), "k must be"),
        ((q, k, v.float(), keys, values, p, cos, sin), "v must be torch.float16"),
        ((q, k, v, keys, values, p, cos[:, :32], sin), "full rotary"),
        ((q, k, v, keys, values, p, cos, sin.t().contiguous().t()), "dense"),
        ((q, k, v, keys.float(), values, p, cos, sin), "dtype"),
        ((q, k, v, keys, values, p.int(), cos, sin), "int64"),
    ]
    for args, msg in cases:
        with pytest.raises(at.AttnError, match=msg):
            at.validate_rope(*args, None)


@pytest.mark.parametrize("pos", [0, 9, 15, 16])
def test_rope_reference_matches_the_unfused_step(pos):
    """The op's CPU path (the reference the kernel is held to) against the fast step's unfused ``attend``."""
    from quick.models.decoder import attend

    q, k, v, keys, values, cos, sin = _rope_t(seed=pos)
    keys2, values2 = keys.clone(), values.clone()
    p = torch.tensor([pos])
    mask = torch.zeros(2, 1, 1, 16, dtype=torch.bfloat16)
    mask[..., pos + 1 :] = torch.finfo(torch.bfloat16).min
    out = torch.ops.quick.attn_decode_rope(q, k, v, keys, values, p, cos, sin, mask, 0.125)
    if pos < 16:
        want = attend(q, k, v, keys2, values2, p, cos, sin, mask, None, None, 0.0, 0.125)
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)  # bf16 SDPA over 16 vs pos + 1 positions
        torch.testing.assert_close(keys, keys2, rtol=0, atol=0)
        torch.testing.assert_close(values, values2, rtol=0, atol=0)
        assert not torch.equal(keys[:, :, pos], _rope_t(seed=pos)[3][:, :, pos])  # the row was written
    else:  # past the cache: nothing written, every position attended
        assert torch.equal(keys, keys2) and torch.equal(values, values2)
        assert out.shape == (2, 8 * 64) and torch.isfinite(out).all()


def test_rope_op_schema_and_fake():
    """torch.library's own checks of the mutating op (schema, fake tensor, autograd registration), and the fake's
    shape on meta tensors."""
    q, k, v, keys, values, cos, sin = _rope_t()
    p = torch.tensor([5])
    torch.library.opcheck(
        torch.ops.quick.attn_decode_rope.default,
        (q, k, v, keys, values, p, cos, sin, None, 0.125),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    meta = [t.to("meta") for t in (q, k, v, keys, values, p, cos, sin)]
    out = torch.ops.quick.attn_decode_rope(*meta, None, 0.125)
    assert out.shape == (2, 8 * 64) and out.device.type == "meta"


def test_rope_fusion_switch(monkeypatch):
    check_fusion_switch(monkeypatch, "rope", at.rope_fusion_enabled)
