"""Published mixture-of-experts shapes with random weights, built without the whole model's 16-bit experts.

The model is first built on the ``meta`` device (no memory); then, one decoder layer at a time, its experts module is
made on the target device: 4-bit stacks with random packed codes (:class:`~quick.nn.moe.QuickMoEExperts`, ``quick``
layout, the one with a grouped kernel) or transformers' own experts module with random 16-bit weights running
transformers' ``grouped_mm`` experts implementation (one grouped GEMM per projection, no loop over experts). The 4-bit
build packs the attention and dense linears too (random :class:`~quick.nn.linear.QuickLinear`, as
:func:`quick.models.synthetic.build_random_model`); everything else (embeddings, norms, router, rotary tables) is
allocated last and initialised by transformers' own ``_init_weights``. Peak memory is the built model's size.
"""

from __future__ import annotations

import torch
from torch import nn

from quick.kernels.moe import STACK_SHAPES
from quick.models import synthetic
from quick.models.families import FamilyError, ModelFamily, decoder_layers, get_family
from quick.models.linears import parent_of, quantizable_linears
from quick.models.moe import check_fused, experts_modules
from quick.nn.linear import QuickLinear, padded_in_features
from quick.nn.moe import ACTIVATIONS, QuickMoEExperts

# 16-bit baselines: impl name -> dtype of the whole model.
BASELINE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The experts layout of an impl whose own layout has no grouped 4-bit kernel (its dense linears keep their layout).
EXPERTS_LAYOUT = "quick"


def experts_layout(layout: str) -> str:
    """The layout the experts of an impl packed in ``layout`` take: its own where a grouped kernel reads it."""
    return layout if layout in STACK_SHAPES else EXPERTS_LAYOUT


# transformers' experts implementation of the 16-bit baseline (sorted tokens, torch's grouped GEMM).
GROUPED_IMPL = "grouped_mm"


def moe_family(config: object) -> ModelFamily | None:
    """The family of ``config`` when it has a MoE block, else ``None``."""
    try:
        family = get_family(config)
    except FamilyError:
        return None
    return family if family.moe is not None else None


def is_moe_shape(name: str) -> bool:
    """Whether a bundled shape name (``quick/models/configs``) is a mixture-of-experts model."""
    return moe_family(synthetic.load_config(name)) is not None


def _config(name: str, num_layers: int | None):
    cfg = synthetic.load_config(name)
    if moe_family(cfg) is None:
        raise ValueError(f"'{name}' ({cfg.model_type}) is not a mixture-of-experts model")
    if num_layers is not None:
        cfg.num_hidden_layers = num_layers
    return cfg


def _skeleton(cfg, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def random_quick_experts(
    fused: nn.Module, name: str, group_size: int, dtype: torch.dtype, device: torch.device | str, fill: bool = True,
    layout: str = EXPERTS_LAYOUT,
) -> QuickMoEExperts:  # fmt: skip
    """A :class:`QuickMoEExperts` of the shape of transformers' experts module ``fused`` with random packed stacks."""
    e, h, i = check_fused(fused, name)
    act = getattr(getattr(fused, "config", None), "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise FamilyError(f"'{name}': expert activation {act!r} is not supported")
    q = QuickMoEExperts(e, h, i, act, group_size, layout, dtype, device)
    if fill:
        for stack in (q.gate_up, q.down):
            synthetic.fill_random_packed_(stack.packed(), dtype)
    return q


def _random_linear(lin: nn.Linear, group_size: int, layout: str, dtype: torch.dtype, device, fill: bool) -> QuickLinear:
    k, n = lin.in_features, lin.out_features  # a K off the group (a tiny shared expert's down) is zero-padded
    mod = QuickLinear(padded_in_features(k, group_size, layout), n, False, group_size, layout, dtype, device, k)
    if fill:
        synthetic.fill_random_packed_(mod.packed(), dtype)
    return mod


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, child = parent_of(root, name)
    setattr(parent, child, module)


def _convert_(
    model: nn.Module,
    quantized: bool,
    group_size: int,
    layout: str,
    dtype: torch.dtype,
    device: torch.device | str,
    quantize_lm_head: bool,
    fill: bool,
) -> None:
    """Make every experts module (and with ``quantized`` every eligible linear) on ``device``, layer by layer."""
    family = moe_family(model.config)
    assert family is not None
    skip = tuple(s for s in family.modules_to_not_convert if not (quantize_lm_head and s == "lm_head"))
    for name, fused in experts_modules(model, family).items():
        if quantized:
            _replace(model, name, random_quick_experts(fused, name, group_size, dtype, device, fill,
                                                       experts_layout(layout)))  # fmt: skip
        else:  # transformers' own module, allocated and initialised here so only one layer is ever pending
            fused.to_empty(device=device)
            if fill:
                model._init_weights(fused)
    if quantized:
        for lin_name, lin in quantizable_linears(model, skip):
            _replace(model, lin_name, _random_linear(lin, group_size, layout, dtype, device, fill))


def _materialize_(model: nn.Module, device: torch.device | str) -> None:
    """Allocate what is still on the meta device and initialise it as transformers does (norms to one, rotary
    tables computed, linears and embeddings normal)."""
    owners = [m for m in model.modules() if any(t.is_meta for t in (*m.parameters(False), *m.buffers(False)))]
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    with torch.no_grad():
        for m in owners:
            model._init_weights(m)


def build_random_moe(
    name: str,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    quantized: bool = False,
    group_size: int = 128,
    layout: str = "quick",
    num_layers: int | None = None,
    seed: int = 0,
    quantize_lm_head: bool = False,
) -> nn.Module:
    """A causal MoE LM of a bundled shape with random weights on ``device`` (see the module docstring).

    ``quantized``: 4-bit experts in :func:`experts_layout` of ``layout`` and every other eligible linear packed in
    ``layout``;
    otherwise ``dtype`` weights with transformers' :data:`GROUPED_IMPL` experts implementation."""
    torch.manual_seed(seed)
    model = _skeleton(_config(name, num_layers), dtype)
    if not quantized:
        model.set_experts_implementation(GROUPED_IMPL)
    _convert_(model, quantized, group_size, layout, dtype, device, quantize_lm_head, fill=True)
    _materialize_(model, device)
    return model


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(
    name: str,
    dtype: torch.dtype = torch.bfloat16,
    quantized: bool = False,
    group_size: int = 128,
    layout: str = "quick",
    num_layers: int | None = None,
    quantize_lm_head: bool = False,
) -> tuple[int, list[int]]:
    """Exact bytes of :func:`build_random_moe`'s model, from a meta build: ``(outside the decoder layers, [per
    decoder layer])``."""
    model = _skeleton(_config(name, num_layers), dtype)
    _convert_(model, quantized, group_size, layout, dtype, "meta", quantize_lm_head, fill=False)
    layers = decoder_layers(model, moe_family(model.config))  # type: ignore[arg-type]
    per_layer = [_bytes((*layer.parameters(), *layer.buffers())) for layer in layers]
    total = _bytes((*model.parameters(), *model.buffers()))
    return total - sum(per_layer), per_layer


def kv_bytes_per_layer(name: str, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Static KV cache bytes of one layer holding ``tokens`` (batch x cache length) positions."""
    cfg = synthetic.load_config(name)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_key_value_heads * head_dim * tokens * torch.empty(0, dtype=dtype).element_size()


def layers_that_fit(fixed: int, per_layer: list[int], kv_per_layer: int, budget: int) -> int:
    """How many leading decoder layers fit ``budget`` bytes with their KV cache (0: not even the embeddings)."""
    used = fixed
    for n, b in enumerate(per_layer):
        used += b + kv_per_layer
        if used > budget:
            return n
    return len(per_layer)


__all__ = [
    "BASELINE_DTYPES",
    "EXPERTS_LAYOUT",
    "GROUPED_IMPL",
    "build_random_moe",
    "is_moe_shape",
    "kv_bytes_per_layer",
    "layers_that_fit",
    "moe_family",
    "random_quick_experts",
    "weight_bytes",
]
