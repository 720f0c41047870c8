"""Helpers shared by the test modules (and a few device scripts): GPU / nvcc skips, the M list of the kernel
tests, the W4A16 output check, error reports, tiny transformers configs, random W4A8 weights and the layout
round-trip checks.

Test modules import it as ``helpers`` (pytest puts ``tests/`` on ``sys.path`` for them); scripts add ``tests/`` to
``sys.path`` first.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch

from quick.formats.w4a8 import W4A8Weight

DTYPES = [torch.float16, torch.bfloat16]
# Every M the kernel tests cover (decode sizes, tile edges, prefill sizes).
M_ALL = [1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 64, 100, 128, 255, 256, 1000, 4096]


def check_output(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """A W4A16 kernel's output against the float64 reference: every element written and finite (the tests poison
    outputs with NaN first), relative Frobenius error under ``quick.testing.REL_BOUND``."""
    from quick.testing import REL_BOUND, rel_error

    assert torch.isfinite(out).all(), "NaN/inf in output (unwritten poisoned element or overflow)"
    err = rel_error(out, ref)
    assert err < REL_BOUND[dtype], f"relative error {err:.3e} over bound {REL_BOUND[dtype]}"


# ------------------------------------------------------------------------------------------- environment


def have_nvcc() -> bool:
    """Whether nvcc is found (the kernels are compiled at first use)."""
    from quick.kernels import jit

    try:
        jit.find_nvcc()
    except jit.KernelUnavailable:
        return False
    return True


def require_sm80_and_nvcc() -> None:
    """Skip the calling test module unless a CUDA GPU of compute capability 8.0 or newer and nvcc are present."""
    import pytest

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs a CUDA GPU of compute capability 8.0 or newer", allow_module_level=True)
    if not have_nvcc():
        pytest.skip("nvcc not found: the kernels are compiled at first use", allow_module_level=True)


def require_sm90(module: str, what: str) -> None:
    """Skip the calling test module unless the GPU is an sm_90 (Hopper) one and the kernel module ``module``
    (imported only then) says ``is_available()``; ``what`` names the kernel in the reason."""
    import pytest

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 (Hopper) GPU", allow_module_level=True)
    if not importlib.import_module(module).is_available():
        pytest.skip(f"{what} unavailable (no nvcc)", allow_module_level=True)


def write_error_report(env_var: str, errors: dict[str, float]) -> None:
    """Write ``errors`` as JSON to the path in ``$env_var``, when set (the max error per case of a test module)."""
    path = os.environ.get(env_var)
    if path:
        with open(path, "w") as f:
            json.dump(errors, f, indent=1, sort_keys=True)


# ------------------------------------------------------------------------------------------ tiny models


def smollm2_llama_config(**overrides: Any):
    """A 2-layer random Llama with SmolLM2-135M's layer shapes (K = 576: ragged groups at g128, padded to 640)
    and a vocabulary of 512."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=512,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=256,
    )
    return LlamaConfig(**{**kw, **overrides})


def check_static_generation(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 6) -> None:
    """The static-cache generator (``quick generate --fast``) gives transformers' greedy tokens for ``prompt [1, T]``;
    ``generate`` runs first, so state it leaves on the model is in place."""
    from quick.generation import static_generate

    t = prompt.shape[1]
    with torch.no_grad():
        want = model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    got, _ = static_generate(model, prompt, new_tokens)
    assert torch.equal(got[0], want[0, t:])


def tiny_causal_lm(config_cls: type, **overrides: Any) -> torch.nn.Module:
    """A 2-layer random causal LM (hidden 64, MLP 128, vocab 256, 128 positions) of ``config_cls`` with
    ``overrides``, in eval mode."""
    from transformers import AutoModelForCausalLM

    kw = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(config_cls(**{**kw, **overrides})).eval()


# -------------------------------------------------------------------------------------------------- W4A8


def random_w4a8(k: int, n: int, group_size: int, seed: int = 0, scale_max: int = 127) -> W4A8Weight:
    """Codes over the whole int4 range (incl. -8) and group scales over 1..scale_max (16: the widenable ones)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    cs = torch.rand(n, generator=gen) * 0.01 + 1e-4
    gs = (
        torch.randint(1, scale_max + 1, (k // group_size, n), generator=gen, dtype=torch.int16)
        if group_size > 0
        else None
    )
    return W4A8Weight(q, cs, gs, group_size)


def check_w4a8_round_trip(layout, pack, unpack, k: int, n: int, group_size: int, qweight_shape: tuple) -> None:
    """``unpack(pack(w))`` gives back the codes and scales of a random ``w`` exactly; the packed tensors pass
    ``layout.validate`` with int32 ``qweight`` of ``qweight_shape`` and int8 group scales (none per-channel)."""
    w = random_w4a8(k, n, group_size, seed=k * 7 + n)
    packed = pack(w)
    layout.validate(packed, k, n, group_size)
    assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == qweight_shape
    back = unpack(packed, group_size)
    assert torch.equal(back.q, w.q)
    assert torch.equal(back.channel_scale, w.channel_scale)
    if group_size > 0:
        assert packed["group_scale"].dtype == torch.int8
        assert torch.equal(back.group_scale, w.group_scale)
    else:
        assert "group_scale" not in packed and back.group_scale is None


def check_w4a8_unpack_errors(pack, unpack, k: int) -> None:
    """``unpack`` names what is wrong: a group size that is not the packed one, a missing or unexpected group
    scale, a channel scale of the wrong dtype (a [k, 64] weight packed at g128)."""
    import pytest

    from quick.formats.layouts import LayoutError

    packed = pack(random_w4a8(k, 64, 128))
    with pytest.raises(LayoutError, match="group_size"):
        unpack(packed, 64)
    with pytest.raises(LayoutError, match="group_scale"):
        unpack({"qweight": packed["qweight"], "channel_scale": packed["channel_scale"]}, 128)
    with pytest.raises(LayoutError, match="takes no"):
        unpack(packed, -1)
    with pytest.raises(LayoutError, match="channel_scale"):
        unpack({**packed, "channel_scale": packed["channel_scale"].half()}, 128)


def check_fusion_switch(monkeypatch, name: str, enabled) -> None:
    """A decode-path fusion (quick.settings.fusions): on with ``QUICK_FUSIONS=all`` or a list naming it, off with
    ``none`` or a list without it, unset: on exactly when it is in the default set."""
    from quick import settings

    for raw, want in (("all", True), ("none", False), (name, True), (",".join(set(settings.FUSIONS) - {name}), False)):
        monkeypatch.setenv("QUICK_FUSIONS", raw)
        assert enabled() == want, raw
    monkeypatch.delenv("QUICK_FUSIONS")
    assert enabled() == (name in settings.DEFAULT_FUSIONS)


# ------------------------------------------------------------------------------------------- mixture of experts


def moe_routing(
    t: int, k: int, e: int, seed: int, used: int | None = None, drop: float = 0.0, device: str = "cuda"
) -> torch.Tensor:
    """``[t, k]`` distinct experts per token drawn from the first ``used`` experts (the others get no token), with
    a fraction ``drop`` of slots set to ``e`` (dropped)."""
    gen = torch.Generator().manual_seed(seed)
    used = used or e
    idx = torch.rand(t, used, generator=gen).argsort(dim=1)[:, :k]
    if drop:
        idx[torch.rand(t, k, generator=gen) < drop] = e
    return idx.to(device)


def check_moe_graph_replays(mod: Any, t: int, k: int, seeds: tuple[int, ...]) -> None:
    """A ``QuickMoEExperts`` (backend ``kernel``) on ``t`` tokens captured in a CUDA graph once, then replayed on a
    new routing, input and slot weights per seed, each replay against the module's reference path."""
    from quick.testing import REL_BOUND, rel_error

    e, h, dev = mod.num_experts, mod.hidden_size, mod.gate_up.qweight.device
    x = torch.randn(t, h).to(mod.dtype).to(dev)
    idx = moe_routing(t, k, e, seed=seeds[0] - 1, device=str(dev))
    wts = torch.rand(t, k).to(dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: kernels built and loaded, allocator pools primed
            mod(x, idx, wts)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mod(x, idx, wts)
    for seed in seeds:
        idx.copy_(moe_routing(t, k, e, seed=seed, used=min(e, 5 + seed % 4), device=str(dev)))
        x.copy_(torch.randn(t, h).to(mod.dtype).to(dev))
        wts.copy_(torch.rand(t, k).to(dev))
        graph.replay()
        torch.cuda.synchronize()
        mod.backend = "reference"
        want = mod(x, idx, wts)
        mod.backend = "kernel"
        err = rel_error(out, want.double())
        assert err < 2 * REL_BOUND[mod.dtype], f"replay with seed {seed}: relative error {err:.3e}"


def moe_stack(e: int, k: int, n: int, g: int, dtype: torch.dtype, seed: int, layout: str = "quick", device="cuda"):
    """Random codes, scales and zero points per expert packed as a ``QuickExpertStack`` in ``layout`` on ``device``,
    and the float64 weights ``[E, K, N]``."""
    from quick.nn.moe import QuickExpertStack
    from quick.testing import random_quantized

    gen = torch.Generator().manual_seed(seed)
    qws = [random_quantized(k, n, g, dtype, "cpu", gen) for _ in range(e)]
    stack = QuickExpertStack.from_quantized(qws, layout).to(device)
    return stack, torch.stack([qw.dequantize(torch.float64) for qw in qws]).to(device)


def check_moe_kernel_path(mod: Any, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    """A ``QuickMoEExperts`` forward on its kernels against its reference path (finite, x's dtype, relative error
    within twice ``REL_BOUND``); returns the kernels' output."""
    from quick.testing import REL_BOUND, rel_error

    mod.backend = "kernel"
    got = mod(x, idx, wts)
    mod.backend = "reference"
    want = mod(x, idx, wts)
    mod.backend = "kernel"
    assert got.dtype == x.dtype and torch.isfinite(got).all()
    err = rel_error(got, want.double())
    assert err < 2 * REL_BOUND[x.dtype], f"relative error {err:.3e}"
    return got


_MOE_COMMON = dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, num_attention_heads=4, num_key_value_heads=4,
                   max_position_embeddings=128, num_experts_per_tok=2)  # fmt: skip
# group-limited routing (2 groups of 4 experts, 1 chosen), one shared expert, no dense first layer
_DEEPSEEK = dict(n_routed_experts=8, moe_intermediate_size=64, intermediate_size=128, first_k_dense_replace=0,
                 n_group=2, topk_group=1, n_shared_experts=1)  # fmt: skip
# latent attention sized for every layout's blocks: kv_a_proj_with_mqa N = 64 + 64, kv_b_proj K = 64, q_b_proj N =
# 4 x (16 + 64)
_MLA = dict(kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=64, v_head_dim=16)
# kind -> (transformers config class, its arguments beside _MOE_COMMON)
TINY_MOE: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, moe_intermediate_size=64, intermediate_size=128, head_dim=16,
                                         norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, intermediate_size=64)),
    # a gated shared expert
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, moe_intermediate_size=64, intermediate_size=128,
                                         shared_expert_intermediate_size=128)),
    # Qwen2-MoE's block behind a linear-attention and a full-attention layer, zero-centred norms
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(
        num_experts=8, moe_intermediate_size=64, shared_expert_intermediate_size=64, head_dim=16,
        layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16)),
    # sigmoid routing with a correction bias, q/k norms over the whole projections, half-rotary heads
    "minimax_m2": ("MiniMaxM2Config", dict(num_local_experts=8, intermediate_size=64, head_dim=16, rotary_dim=8,
                                           eos_token_id=2, pad_token_id=1)),
    # softmax routing whose choice adds a correction bias, one shared expert, every layer sparse
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(num_experts=8, moe_intermediate_size=64, intermediate_size=128,
                                                moe_layer_start_index=0, moe_num_shared_experts=1)),
    # q/k norms over the whole projections
    "olmoe": ("OlmoeConfig", dict(num_experts=8, intermediate_size=64, eos_token_id=2, pad_token_id=1)),
    # sigmoid group-limited routing with a scaling factor, a shared expert, partial rotary, q/k/v biases
    "glm4_moe": ("Glm4MoeConfig", dict(**_DEEPSEEK, head_dim=16, attention_bias=True, routed_scaling_factor=1.5)),
    # the same routing, latent attention with a low-rank query
    "deepseek_v3": ("DeepseekV3Config", dict(**_DEEPSEEK, **_MLA, q_lora_rank=64, routed_scaling_factor=2.5)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(**_DEEPSEEK, **_MLA, q_lora_rank=64, routed_scaling_factor=1.8,
                                                mlp_layer_types=["sparse", "sparse"])),
    # softmax routing times a scaling factor, latent attention with a full-rank query
    "deepseek_v2": ("DeepseekV2Config", dict(**_DEEPSEEK, **_MLA, q_lora_rank=None, routed_scaling_factor=2.0,
                                             topk_method="group_limited_greedy")),
}  # fmt: skip


def tiny_moe(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer random MoE causal LM of a :data:`TINY_MOE` kind (hidden 64, 4 heads of 16, vocab 256), top-2 of 8
    experts (Mixtral: 4), every layer sparse; ``overrides`` set config attributes afterwards."""
    import transformers

    cls, kwargs = TINY_MOE[kind]
    cfg = getattr(transformers, cls)(**_MOE_COMMON, **kwargs)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()
