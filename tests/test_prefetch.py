"""The cross-kernel L2 prefetch order (quick.kernels.prefetch, set up by the fast decode step): CPU checks of which
layer prefetches which weights. The kernel side (results unchanged with a prefetch) is in test_kernels_dec_gpu.py."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_causal_lm

from quick.checkpoint import set_compute_dtype
from quick.inference import StaticGenerator
from quick.kernels import prefetch
from quick.models import decoder
from quick.models.fuse import fuse_model
from quick.nn.linear import QuickLinear
from quick.quant.apply import quantize_model_rtn

transformers = pytest.importorskip("transformers")


def _quantized(layout: str, fused: bool):
    torch.manual_seed(0)
    model = tiny_causal_lm(transformers.LlamaConfig, num_attention_heads=4, num_key_value_heads=2, hidden_size=128)
    quantize_model_rtn(model, 64, layout, dtype=torch.float16, progress=False)
    set_compute_dtype(model, torch.float32)  # the tiny model runs in fp32 on CPU
    if fused:
        fuse_model(model)
    return model


def _decoder(model, **kw) -> decoder.FastDecoder:
    gen = StaticGenerator(model, 1, 16)
    with torch.inference_mode():
        gen.prefill(torch.randint(0, 200, (1, 4)))
    return decoder.FastDecoder(model, gen.cache, 16, backend=None, **kw)


def _expected_order(model, fused: bool) -> list[QuickLinear]:
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv = [a.qkv_proj.linear] if fused else [a.q_proj, a.k_proj, a.v_proj]
        gate_up = [m.gate_up_proj.linear] if fused else [m.gate_proj, m.up_proj]
        out += [*qkv, a.o_proj, *gate_up, m.down_proj]
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_fast_step_chains_the_linears_in_call_order(fused):
    model = _quantized("quick_sm90", fused)
    dec = _decoder(model)
    order = _expected_order(model, fused)
    assert all(isinstance(m, QuickLinear) for m in order)
    assert dec.prefetching == len(order) - 1
    for cur, nxt in zip(order, order[1:], strict=False):
        assert cur.l2_next is nxt.qweight
    assert order[-1].l2_next is None  # the last layer's down: the dense lm_head follows


def test_prefetch_off_and_other_layouts_clear_it():
    model = _quantized("quick_sm90", True)
    _decoder(model)
    dec = _decoder(model, l2_prefetch=False)
    assert dec.prefetching == 0
    assert all(m.l2_next is None for m in model.modules() if isinstance(m, QuickLinear))
    model = _quantized("quick", True)  # the mma.sync route takes no prefetch
    assert _decoder(model).prefetching == 0
    assert all(m.l2_next is None for m in model.modules() if isinstance(m, QuickLinear))


def test_the_link_follows_moves_and_stays_out_of_the_checkpoint():
    """The layer is linked, not its tensor: after ``.to()`` / ``.cuda()`` (simulated by ``_apply``) ``l2_next`` is
    the next layer's new ``qweight``, and ``state_dict`` has the same keys as before."""
    model = _quantized("quick_sm90", True)
    keys = set(model.state_dict())
    _decoder(model)
    assert set(model.state_dict()) == keys
    a = model.model.layers[0].self_attn
    model._apply(lambda t: t.clone())
    assert a.qkv_proj.linear.l2_next is a.o_proj.qweight
    prefetch.unchain(model)
    assert a.qkv_proj.linear.l2_next is None


def test_prefetch_bytes_caps_and_rounds():
    t = torch.zeros(1000, dtype=torch.int32)  # 4000 bytes
    assert prefetch.prefetch_bytes(None) == 0
    assert prefetch.prefetch_bytes(t, limit=1 << 20) == 4000
    assert prefetch.prefetch_bytes(t, limit=1000) == 992  # a multiple of 16
    assert prefetch.prefetch_bytes(t[1:], limit=1 << 20) == 0  # 4-byte offset: the bulk prefetch needs 16
