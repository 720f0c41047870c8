"""CPU-side checks of the decode attention launcher (``quick/kernels/attention.py``): input validation with clear
errors, the split heuristic, the fake implementation, and the fast decode step's choice of SDPA off the GPU."""

from __future__ import annotations

import pytest
import torch

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
    # best in window 6 at batch 1, 16, 64, 256
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
    assert len(at.VARIANTS) == len(at.HEAD_DIMS) * len(at.GROUPS) * 2


def test_fake_impl_gives_the_output_shape():
    q, k, v, p = (t.to("meta") for t in _t())
    out = torch.ops.quick.attn_decode(q, k, v, p, None, 0.1)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"
