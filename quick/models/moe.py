"""Mixture-of-experts families at run time: find the MoE blocks a family describes (:class:`MoESpec`), route like the
family does, and swap transformers' fused experts modules for 4-bit ones (:class:`QuickMoEExperts`) or, during AWQ
calibration, for a float view with one ``nn.Linear`` per expert projection (:class:`FloatExperts`).

transformers (>= 5) stores the experts of a block as 3-D parameters ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]`` in one module; older versions built a ``ModuleList`` of per-expert MLPs whose block loops over
them itself, which these helpers reject with a clear error (see docs/moe.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quick.formats.layouts import LayoutError, get_layout
from quick.formats.weights import QuantizationError, QuantizedWeight
from quick.models.families import FamilyError, ModelFamily, MoESpec, decoder_layers, get_family
from quick.nn.linear import padded_in_features
from quick.nn.moe import ACTIVATIONS, MoEPlan, QuickExpertStack, QuickMoEExperts, plan_capacity

# AWQ's per-expert searches (the down projection's scale, clipping) need at least this many calibration tokens routed
# to the expert: a clipping block is G x G (G = 128), and with fewer tokens than G its statistics leave directions of
# the input unseen, so the search would fit noise. Experts under it are rounded to nearest and reported.
MIN_EXPERT_TOKENS = 128


def family_or_none(model: nn.Module) -> ModelFamily | None:
    """The model's family, or ``None`` when its ``model_type`` has none (round-to-nearest needs no family)."""
    try:
        return get_family(getattr(model, "config", None))
    except FamilyError:
        return None


def experts_modules(model: nn.Module, family: ModelFamily | None = None) -> dict[str, nn.Module]:
    """``{qualified name: module}`` of every MoE block's experts module (empty for dense families)."""
    family = family or family_or_none(model)
    if family is None or family.moe is None:
        return {}
    out = {}
    for i, layer in enumerate(decoder_layers(model, family)):
        try:
            out[f"{family.layers_path}.{i}.{family.moe.experts_path}"] = layer.get_submodule(family.moe.experts_path)
        except AttributeError:  # a dense-MLP layer (mlp_only_layers, decoder_sparse_step)
            continue
    return out


def refuse_experts(model: nn.Module, method: str) -> None:
    """A clear error where ``method`` (a quantizer without expert support) meets a mixture-of-experts model, instead of
    leaving its experts 16-bit unnoticed."""
    names = list(experts_modules(model))
    if names:
        raise QuantizationError(
            f"{method} does not quantize mixture-of-experts experts ({len(names)} experts modules, first "
            f"'{names[0]}'); quantize this model to W4A16 (AWQ or round-to-nearest, a_bit 16)"
        )


def _act_name(module: nn.Module, name: str) -> str:
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    if act not in ACTIVATIONS:
        raise FamilyError(f"'{name}': expert activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return act


def check_fused(module: nn.Module, name: str) -> tuple[int, int, int]:
    """``(E, H, I)`` of transformers' fused experts module; a clear error for other forms."""
    if isinstance(module, (QuickMoEExperts, FloatExperts)):
        raise FamilyError(f"'{name}' is already converted ({type(module).__name__})")
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
        raise FamilyError(
            f"'{name}' ({type(module).__name__}) has no 3-D gate_up_proj / down_proj parameters: transformers >= 5 "
            "fuses the experts this way; per-expert modules of older versions are not supported"
        )
    layout = {k: getattr(module, k, d) for k, d in (("is_transposed", False), ("has_bias", False),
                                                    ("has_gate", True), ("is_concatenated", True))}  # fmt: skip
    if layout != {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True}:
        raise FamilyError(f"'{name}': experts stored as {layout}; only concatenated gate|up without bias is supported")
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(dn.shape) != (e, h, two_i // 2):
        raise FamilyError(f"'{name}': gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} do not match")
    return e, h, two_i // 2


# ------------------------------------------------------------------------------------------------ routing


def routing(config: Any, spec: MoESpec) -> tuple[int, int, bool]:
    """``(num_experts, top_k, renormalize)`` of a model config, read through the family's attribute names (from
    the text config of a vision-language model's)."""
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config
    try:
        e, k = int(getattr(config, spec.num_experts)), int(getattr(config, spec.top_k))
    except AttributeError as err:
        raise FamilyError(
            f"config {type(config).__name__} lacks {err.name!r}, which the family's MoESpec names"
        ) from None
    renorm = spec.renormalize if isinstance(spec.renormalize, bool) else bool(getattr(config, spec.renormalize))
    return e, k, renorm


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The families' routing: softmax over the experts in fp32, the ``top_k`` largest, optionally divided by their
    sum. Returns ``(weights [T, k] fp32, expert ids [T, k])`` (Qwen's router then casts the weights to the logits'
    dtype, Mixtral's keeps fp32)."""
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(f"router logits must be a float tensor [tokens, experts], got {tuple(router_logits.shape)}")
    if not 0 < top_k <= router_logits.shape[1]:
        raise ValueError(f"top_k must be in [1, {router_logits.shape[1]}], got {top_k}")
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class RoutedBlock:
    """A mixture-of-experts block's forward on ``x [T, H]`` for the few-kernel decode step: the router's linear, then
    the softmax top-k (and, for 4-bit experts, the experts' plan) in one launch (``quick::moe_route``), the experts
    (4-bit: the grouped kernels on that plan, :meth:`QuickMoEExperts.kernel_forward_planned`; 16-bit: the experts
    module itself), then the shared expert if the family has one. Where the route kernel cannot take a batch, the
    family's routing runs in PyTorch (same result up to rounding). Build with :meth:`of`, which declines blocks it
    does not recognise."""

    def __init__(self, block: nn.Module, spec: MoESpec, config: Any) -> None:
        router = block.get_submodule(spec.router)
        self.router_weight: torch.Tensor = router.weight
        self.router_bias: torch.Tensor | None = getattr(router, "bias", None)
        self.experts: nn.Module = block.get_submodule(spec.experts)
        self.num_experts, self.top_k, self.renormalize = routing(config, spec)
        self.cast_weights = spec.cast_weights
        self.shared = block.get_submodule(spec.shared_expert) if spec.shared_expert else None
        self.shared_gate = block.get_submodule(spec.shared_expert_gate) if spec.shared_expert_gate else None

    @classmethod
    def of(cls, block: nn.Module, spec: MoESpec, config: Any) -> RoutedBlock | None:
        """A :class:`RoutedBlock` for ``block``, or None where the family routes its own way (``MoESpec.routing``),
        its router is not a plain ``[E, H]`` weight or its experts are not a fused experts module (then the caller
        runs the block's own forward)."""
        if spec.routing != "softmax":
            return None
        try:
            routed = cls(block, spec, config)
        except (AttributeError, FamilyError):
            return None
        w = routed.router_weight
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != routed.num_experts:
            return None
        experts = routed.experts
        if isinstance(experts, QuickMoEExperts):
            return routed if experts.num_experts == routed.num_experts else None
        return routed if _fused_experts(experts, routed.num_experts) else None

    def route_shape(self, x: torch.Tensor) -> tuple[bool, int, int]:
        """``(planned, block size, plan capacity)`` of this batch: planned where the 4-bit grouped kernels take it
        (the route kernel then builds their plan), else capacity 0 (no plan is needed)."""
        t, k, e = x.shape[0], self.top_k, self.experts
        if not isinstance(e, QuickMoEExperts) or e.backend == "reference" or e.kernel_unavailable(x, k) is not None:
            return False, 16, 0
        bs = e.plan_block_size(t, k)
        return True, bs, plan_capacity(t, k, self.num_experts, bs)

    def kernel_takes(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[bool, int, int] | None:
        """:meth:`route_shape` where the route kernel runs for ``x`` and its router logits, else None."""
        from quick.kernels import moe as qmoe

        shape = self.route_shape(x)
        return shape if qmoe.route_unavailable(logits, self.top_k, *shape[1:]) is None else None

    def __call__(self, x: torch.Tensor, sum_slots: bool = True) -> torch.Tensor:
        """The block's output ``[T, H]``; with ``sum_slots`` False it may instead return the weighted rows of every
        slot ``[T, top_k, H]`` (4-bit experts on the grouped kernels, no shared expert) for the caller to sum."""
        if x.dim() != 2:
            raise ValueError(f"x must be [tokens, hidden], got {tuple(x.shape)}")
        logits = F.linear(x, self.router_weight, self.router_bias)
        t, k = x.shape[0], self.top_k
        shape = self.kernel_takes(x, logits)
        if shape is not None:
            import quick.kernels.ops  # noqa: F401  (registers torch.ops.quick.moe_route)

            planned, bs, cap = shape
            ids, w, *tensors = torch.ops.quick.moe_route(logits, k, self.renormalize, self.cast_weights, bs, cap)
            if planned:  # every slot names an expert: no row of the down product is left unwritten
                plan = MoEPlan(*tensors, t, k, bs)
                keep = not sum_slots and self.shared is None
                y = self.experts.kernel_forward_planned(x, plan, w, all_routed=True, sum_slots=not keep)
            else:
                y = self.experts(x, ids, w.to(logits.dtype) if self.cast_weights else w)
        else:
            w, ids = route(logits, k, self.renormalize)
            y = self.experts(x, ids, w.to(logits.dtype) if self.cast_weights else w)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        return y


def _fused_experts(module: nn.Module, num_experts: int) -> bool:
    """transformers' fused experts module of ``num_experts`` experts (3-D ``gate_up_proj`` / ``down_proj``)."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return all(isinstance(p, torch.Tensor) and p.dim() == 3 and p.shape[0] == num_experts for p in (gu, dn))


# ------------------------------------------------------------------------------------ round-to-nearest


def check_experts(experts: dict[str, nn.Module], group_size: int, layout: str) -> None:
    """Fail before any conversion if an experts module cannot be packed in ``layout`` (error names it)."""
    lay = get_layout(layout)
    for name, mod in experts.items():
        try:
            e, h, i = check_fused(mod, name)
            lay.check(padded_in_features(h, group_size, layout), 2 * i, group_size)
            lay.check(padded_in_features(i, group_size, layout), h, group_size)
        except (ValueError, FamilyError) as err:
            raise QuantizationError(f"{name}: {err}") from None


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def quantize_experts_rtn_(
    model: nn.Module,
    experts: dict[str, nn.Module],
    group_size: int = 128,
    layout: str = "quick",
    zero_point: bool = True,
    dtype: torch.dtype | None = None,
) -> int:
    """Round-to-nearest every fused experts module in ``experts`` into a :class:`QuickMoEExperts`; returns how many."""
    for name, mod in experts.items():
        check_fused(mod, name)
        q = QuickMoEExperts.from_weights(
            mod.gate_up_proj.data, mod.down_proj.data, _act_name(mod, name), group_size, layout, zero_point, dtype
        )
        _replace(model, name, q)
    return len(experts)


# ------------------------------------------------------------------------------------------ calibration


class _ExpertMLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(gate.shape[1], gate.shape[0], bias=False, device="meta")
        self.up_proj = nn.Linear(up.shape[1], up.shape[0], bias=False, device="meta")
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False, device="meta")
        for lin, w in ((self.gate_proj, gate), (self.up_proj, up), (self.down_proj, down)):
            lin.weight = nn.Parameter(w.clone(), requires_grad=False)


class FloatExperts(nn.ModuleList):
    """transformers' fused experts as one float gated MLP per expert (``[e].gate_proj / up_proj / down_proj``), same
    call and same result; exists during AWQ calibration, where every expert linear must be hooked (it sees only the
    tokens routed to it), scaled and clipped on its own."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act: str) -> None:
        i = gate_up.shape[1] // 2
        super().__init__(_ExpertMLP(gate_up[e, :i], gate_up[e, i:], down[e]) for e in range(gate_up.shape[0]))
        self.act = act

    @classmethod
    def from_fused(cls, module: nn.Module, name: str = "experts") -> FloatExperts:
        check_fused(module, name)
        return cls(module.gate_up_proj.data, module.down_proj.data, _act_name(module, name))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        act = ACTIVATIONS[self.act]
        for e in torch.unique(top_k_index).tolist():
            if e >= len(self):  # transformers' marker of a dropped slot
                continue
            tok, pos = torch.where(top_k_index == e)
            mlp = self[e]
            x = hidden_states[tok]
            y = mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current weights as transformers' ``(gate_up_proj [E, 2I, H], down_proj [E, H, I])``."""
        gu = torch.stack([torch.cat([m.gate_proj.weight.data, m.up_proj.weight.data]) for m in self])
        return gu, torch.stack([m.down_proj.weight.data for m in self])


def unfuse_experts_(layer: nn.Module, family: ModelFamily) -> bool:
    """Swap the layer's fused experts module (if any) for a :class:`FloatExperts` view; returns whether it did."""
    if family.moe is None:
        return False
    path = family.moe.experts_path
    try:
        mod = layer.get_submodule(path)
    except AttributeError:
        return False
    view = FloatExperts.from_fused(mod, path)
    view.__dict__["_quick_fused"] = mod  # not a child module: the view's items are the experts; refuse_experts_
    for p in mod.parameters():  # the view holds the weights now; refuse_experts_ writes them back
        p.data = p.data.new_empty(0)
    _replace(layer, path, view)
    return True


def _float_view(layer: nn.Module, family: ModelFamily) -> FloatExperts | None:
    if family.moe is None:
        return None
    try:
        view = layer.get_submodule(family.moe.experts_path)
    except AttributeError:
        return None
    return view if isinstance(view, FloatExperts) else None


@torch.no_grad()
def refuse_experts_(layer: nn.Module, family: ModelFamily) -> None:
    """Put the float view's (scaled, clipped) weights back into transformers' fused module."""
    view = _float_view(layer, family)
    if view is None:
        return
    fused = view.__dict__.pop("_quick_fused")
    gu, dn = view.fused()
    fused.gate_up_proj.data = gu.to(fused.gate_up_proj.dtype)
    fused.down_proj.data = dn.to(fused.down_proj.dtype)
    _replace(layer, family.moe.experts_path, fused)  # type: ignore[union-attr]


@torch.no_grad()
def pack_experts_(
    layer: nn.Module, family: ModelFamily, group_size: int, layout: str, zero_point: bool, dtype: torch.dtype
) -> None:
    """Round-to-nearest the float view's current (scaled, clipped) weights into a :class:`QuickMoEExperts`."""
    view = _float_view(layer, family)
    if view is None:
        return
    gu, dn = view.fused()
    q = QuickMoEExperts.from_weights(gu, dn, view.act, group_size, layout, zero_point, dtype)
    _replace(layer, family.moe.experts_path, q.to(gu.device))  # type: ignore[union-attr]


def expert_tokens(tokens: dict[str, int], family: ModelFamily) -> dict[int, int]:
    """Calibration tokens per expert of one layer from AWQ's per-linear token counts (``LayerReport.tokens``)."""
    if family.moe is None:
        return {}
    prefix = f"{family.moe.experts_path}."
    out: dict[int, int] = {}
    for name, t in tokens.items():
        if name.startswith(prefix) and name.endswith(".down_proj"):
            out[int(name[len(prefix) :].split(".")[0])] = t
    return out


# ------------------------------------------------------------------------------------------ checkpoints


def skeleton_experts(
    model: nn.Module,
    meta: dict[str, dict[str, Any]],
    group_size_of: Any,
    layout: str | None,
    default_layout: str,
    dtype: torch.dtype,
) -> dict[str, QuickExpertStack]:
    """Replace every fused experts module whose ``<name>.gate_up.qweight`` the checkpoint holds (``meta``: tensor name
    -> safetensors header entry) by a :class:`QuickMoEExperts` on the meta device; returns its stacks by name.

    K is taken from the stored scales (padded to whole groups as saved). ``layout``: the one asked for; ``None``:
    ``default_layout``, or 'quick' for a stack that layout cannot hold."""
    stacks: dict[str, QuickExpertStack] = {}
    suffix = ".gate_up.qweight"
    for key in sorted(k for k in meta if k.endswith(suffix)):
        name = key[: -len(suffix)]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"'{key}' does not belong to an experts module of the model") from None
        e, h, i = check_fused(mod, name)
        g = int(group_size_of(name))
        parts = {}
        for part, (k, n) in (("gate_up", (h, 2 * i)), ("down", (i, h))):
            rows = meta.get(f"{name}.{part}.scales", {}).get("shape", [0, 0])
            lay = layout or default_layout
            kp = rows[1] * g if g != -1 and len(rows) == 3 else padded_in_features(k, g, lay)
            if layout is None and lay != "quick":
                try:
                    get_layout(lay).check(kp, n, g)
                except (LayoutError, QuantizationError):
                    lay = "quick"
            parts[part] = QuickExpertStack(e, kp, n, g, lay, dtype, "meta", k)
        if parts["gate_up"].layout_name != parts["down"].layout_name:
            parts = {p: _relayout(s, "quick") for p, s in parts.items()}
        q = QuickMoEExperts.from_stacks(parts["gate_up"], parts["down"], _act_name(mod, name))
        _replace(model, name, q)
        stacks[f"{name}.gate_up"], stacks[f"{name}.down"] = q.gate_up, q.down
    return stacks


def _relayout(s: QuickExpertStack, layout: str) -> QuickExpertStack:
    return QuickExpertStack(
        s.num_experts, s.in_features, s.out_features, s.group_size, layout, s.dtype, "meta", s.logical_in_features
    )


def check_stack(
    tensors: dict[str, torch.Tensor], layout: str, stack: QuickExpertStack, where: str
) -> list[dict[str, torch.Tensor]]:
    """Stacked tensors of ``stack``'s shape in ``layout`` checked (present, ``E`` experts first, each expert valid for
    the layout; a ``LayoutError`` names the tensor and the expert); returns the experts' tensors (views)."""
    src = get_layout(layout)
    k, n, g, e = stack.in_features, stack.out_features, stack.group_size, stack.num_experts
    for tname in src.tensor_specs(k, n, g):
        t = tensors.get(tname)
        if t is None:
            raise LayoutError(f"missing tensor '{where}.{tname}' for layout '{layout}'")
        if t.dim() < 1 or t.shape[0] != e:
            raise LayoutError(f"tensor '{where}.{tname}' has shape {tuple(t.shape)}, expected {e} experts first")
    per_expert = [{tn: t[x] for tn, t in tensors.items()} for x in range(e)]
    for x, p in enumerate(per_expert):
        src.validate(p, k, n, g, where=f"{where}[{x}]")
    return per_expert


def load_stack_(stack: QuickExpertStack, tensors: dict[str, torch.Tensor], src_layout: str, where: str) -> None:
    """Check the stored stacked tensors against ``src_layout`` (:func:`check_stack`), repack each expert into the
    stack's layout when it differs, and set them."""
    per_expert = check_stack(tensors, src_layout, stack, where)
    k, n, g = stack.in_features, stack.out_features, stack.group_size
    if src_layout != stack.layout_name:
        src = get_layout(src_layout)
        dst = stack.layout
        per_expert = [dst.pack(src.unpack(p, k, n, g)) for p in per_expert]
    for tname in stack.tensor_names():
        stack.register_buffer(tname, torch.stack([p[tname] for p in per_expert]).contiguous())


# ------------------------------------------------------------------- other libraries' per-expert checkpoints


# The per-expert names of experts that a tool split out of transformers' fused module (llm-compressor's linearized
# experts), whatever the family's published names are.
LINEARIZED_NAMES = ("gate_proj", "up_proj", "down_proj")


def _moe_spec(config: Any) -> MoESpec | None:
    try:
        return get_family(config).moe
    except FamilyError:
        return None


def checkpoint_rename(config: Any, to_published: bool = False) -> Callable[[str], str] | None:
    """Checkpoint key -> model key for a family whose published files name its MoE block otherwise than
    transformers' module does (Mixtral: ``block_sparse_moe`` -> ``mlp``), or model key -> published key with
    ``to_published``; ``None`` where the names agree."""
    spec = _moe_spec(config)
    if spec is None or not spec.checkpoint_block or spec.checkpoint_block == spec.block:
        return None
    old, new = f".{spec.checkpoint_block}.", f".{spec.block}."
    if to_published:
        old, new = new, old
    return lambda key: key.replace(old, new, 1)


def per_expert_tensors(model: nn.Module, layout: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every :class:`QuickMoEExperts` of ``model`` as other libraries store experts, one linear per expert under the
    family's published names (``{experts}.{e}.{gate_proj|up_proj|down_proj}`` or Mixtral's ``w1 / w3 / w2``), each
    packed in ``layout``: ``{experts module: {tensor key: tensor}}``. Exact (the codes, scales and zero points are
    the stacks')."""
    spec = _moe_spec(getattr(model, "config", None))
    names = spec.checkpoint_names if spec is not None else LINEARIZED_NAMES
    lay = get_layout(layout)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, QuickMoEExperts):
            continue
        i = mod.intermediate_size
        tensors: dict[str, torch.Tensor] = {}
        for e in range(mod.num_experts):
            gu, dn = mod.gate_up.unpack(e), mod.down.unpack(e)
            for lin, qw in zip(names, (_columns(gu, 0, i), _columns(gu, i, 2 * i), dn), strict=True):
                tensors.update({f"{name}.{e}.{lin}.{t}": v for t, v in lay.pack(qw).items()})
        out[name] = tensors
    return out


def _columns(qw: QuantizedWeight, lo: int, hi: int) -> QuantizedWeight:
    cols = (qw.q[:, lo:hi], qw.scales[:, lo:hi], qw.zeros[:, lo:hi])
    return QuantizedWeight(*(t.contiguous() for t in cols), group_size=qw.group_size)


@dataclass(frozen=True)
class PerExpertCheckpoint:
    """An experts module whose checkpoint stores each expert's gate, up and down linear on its own (AutoAWQ, GPTQ,
    compressed-tensors): ``prefixes[e] = (gate, up, down)`` under the model's names."""

    name: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    act: str
    prefixes: tuple[tuple[str, str, str], ...]

    def linears(self) -> dict[str, tuple[int, str]]:
        """``{prefix: (expert, 'gate' | 'up' | 'down')}``."""
        parts = ("gate", "up", "down")
        return {p: (e, part) for e, trip in enumerate(self.prefixes) for part, p in zip(parts, trip, strict=True)}


def per_expert_checkpoints(
    model: nn.Module, present: Callable[[str], bool], marker: str
) -> dict[str, PerExpertCheckpoint]:
    """The fused experts modules of ``model`` whose checkpoint holds every expert's linears separately
    (``present(prefix + marker)``, keys under the model's names, e.g. ``...mlp.experts.3.gate_proj.qweight``). A module
    with some of them but not all, or with more experts than the config, is a ``ValueError`` naming the tensor."""
    family = family_or_none(model)
    if family is None or family.moe is None:
        return {}
    out: dict[str, PerExpertCheckpoint] = {}
    for name, mod in experts_modules(model, family).items():
        if isinstance(mod, (QuickMoEExperts, FloatExperts)):
            continue
        e, h, i = check_fused(mod, name)
        for names in dict.fromkeys((family.moe.checkpoint_names, LINEARIZED_NAMES)):
            prefixes = tuple(tuple(f"{name}.{x}.{n}" for n in names) for x in range(e))
            flat = [p for trip in prefixes for p in trip]
            have = [present(p + marker) for p in flat]
            if any(have):
                break
        else:
            continue
        if not all(have):
            missing = next(p for p, ok in zip(flat, have, strict=True) if not ok)
            raise ValueError(f"the checkpoint stores the experts of '{name}' per expert but lacks '{missing}{marker}'")
        if present(f"{name}.{e}.{names[0]}{marker}"):
            raise ValueError(f"the checkpoint holds more than the config's {e} experts for '{name}'")
        out[name] = PerExpertCheckpoint(name, e, h, i, _act_name(mod, name), prefixes)  # type: ignore[arg-type]
    return out


def per_expert_layout(ck: PerExpertCheckpoint, layout: str, group_size: int, explicit: bool) -> str:
    """``layout`` where it holds both products of ``ck``'s experts (K padded as it needs), else 'quick' unless the
    layout was asked for (``explicit``), where the error stands."""
    lay = get_layout(layout)
    try:
        lay.check(padded_in_features(ck.hidden_size, group_size, layout), 2 * ck.intermediate_size, group_size)
        lay.check(padded_in_features(ck.intermediate_size, group_size, layout), ck.hidden_size, group_size)
    except (LayoutError, QuantizationError):
        if explicit:
            raise
        return "quick"
    return layout


def experts_from_quantized(
    ck: PerExpertCheckpoint,
    gate: list[QuantizedWeight],
    up: list[QuantizedWeight],
    down: list[QuantizedWeight],
    layout: str,
) -> QuickMoEExperts:
    """A :class:`QuickMoEExperts` in ``layout`` from each expert's unpacked gate, up and down weights (``[K, N]``, K
    padded to what the layout needs): gate and up columns side by side per expert (gate first), as transformers
    fuses them."""
    gus = []
    for e, (g, u) in enumerate(zip(gate, up, strict=True)):
        if g.shape != u.shape or g.group_size != u.group_size or g.scales.dtype != u.scales.dtype:
            raise QuantizationError(
                f"'{ck.prefixes[e][0]}' and '{ck.prefixes[e][1]}' differ in shape, group size or scale dtype "
                f"({g.shape}, {g.group_size}, {g.scales.dtype} vs {u.shape}, {u.group_size}, {u.scales.dtype})"
            )
        if g.shape[1] != ck.intermediate_size:
            raise QuantizationError(f"'{ck.prefixes[e][0]}' has {g.shape[1]} outputs, the model {ck.intermediate_size}")
        cat = (torch.cat([g.q, u.q], 1), torch.cat([g.scales, u.scales], 1), torch.cat([g.zeros, u.zeros], 1))
        gus.append(QuantizedWeight(*cat, group_size=g.group_size))
    for e, d in enumerate(down):
        if d.shape[1] != ck.hidden_size:
            raise QuantizationError(f"'{ck.prefixes[e][2]}' has {d.shape[1]} outputs, the model {ck.hidden_size}")
    try:
        gu = QuickExpertStack.from_quantized(gus, layout, ck.hidden_size)
        dn = QuickExpertStack.from_quantized(down, layout, ck.intermediate_size)
        return QuickMoEExperts.from_stacks(gu, dn, ck.act)
    except ValueError as err:
        raise QuantizationError(f"'{ck.name}': {err}") from None
