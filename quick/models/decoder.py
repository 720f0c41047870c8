"""A decode step written for few kernels: decoder layers without transformers' per-layer code.

At batch 1 a 4-bit 7B decode step is short enough (a few ms) that the small kernels between the linears are a
large share of it: transformers' layer runs ~10 of them per layer even with its norms, MLP and rotary compiled
(residual adds, cache ``index_copy_`` per tensor, transposes, the attention output copy). This step calls the
same modules' weights through three small functions of tensors only, each compiled once and shared by every
layer (the layer's tensors are arguments, so no recompile per layer):

* :func:`add_rms_norm`: (branch norm +) residual add + RMSNorm (one fused kernel: the new residual and the norm),
* :func:`attend`: q/k norms (per head: Qwen3, Gemma3; over the whole projection: OLMoE), rotary embedding, the two
  cache writes, and the attention (on CUDA the decode attention kernel of :mod:`quick.kernels.attention`, which
  reads only the positions up to this step; grouped-query SDPA elsewhere); on CUDA, for layers without q/k norms
  and with full rotary, all of it is one kernel (``quick::attn_decode_rope``),
* :func:`gated`: ``act(gate) * up`` (silu or tanh-gelu),

with the linears (dense, ``QuickLinear``, ``QuickLinearW4A8``, fused q/k/v and gate/up) called between them as they
are; a layer that has kernel epilogues (``fuses``: the W4A16 ``QuickLinear``) is asked per call whether the gate
or the residual add + norm can run inside its kernel, any other layer is called as ``layer(x)``. What differs
between families is data: which norm feeds the attention and the MLP (the AWQ scale groups' ``prev``), the norms
applied to each branch's output before the residual add (``ModelFamily.branch_norms``: Gemma3's sandwich), the
norm's ``1 + weight`` form (``norm_offset``), and whether the step applies at all (``fast_decode``). A layer whose
MLP is a mixture-of-experts block (``ModelFamily.moe``) runs it on the normed input in place of gate/up and down:
the router's linear, then its top-k and the experts' plan in one kernel feeding the grouped kernels
(:class:`quick.models.moe.RoutedBlock`), else the block's own forward. Anything else (sliding windows shorter
than the cache, soft-capping, clipped q/k/v, other activations) raises :class:`UnsupportedModel`, so the caller
keeps transformers' path. The arithmetic follows transformers' (llama RMSNorm: fp32, cast, then the
weight; Gemma's: times ``1 + weight`` in fp32, then cast; rotary in the model dtype): the logits agree (tests).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quick.kernels import attention
from quick.kernels.decode import gated, rms_norm  # transformers' arithmetic, which the fused kernels reproduce
from quick.models.families import (
    ModelFamily,
    ScaleGroup,
    UnsupportedModel,
    decoder_layers,
    get_family,
    io_groups,
    norm_eps,
)
from quick.nn.fused import FusedProjection, FusedSlice
from quick.nn.linear_w4a8 import QuickLinearW4A8


def add_rms_norm(
    h: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    branch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(r), r)`` with ``r = residual + h``, the add in the model dtype as transformers' layers do it;
    ``branch``: the weight of a norm applied to ``h`` first (Gemma3's post-attention / post-MLP norms). A 3-D ``h``
    holds a mixture-of-experts block's weighted slot rows ``[T, top_k, H]``: summed in fp32 and rounded once first."""
    if h.dim() == 3:
        h = h.float().sum(1).to(residual.dtype)
    if branch is not None:
        h = rms_norm(h, branch, eps, offset)
    residual = residual + h
    return rms_norm(residual, weight, eps, offset), residual


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    scale: float,
    offset: float = 0.0,
    kernel: bool = False,
) -> torch.Tensor:
    """One-token attention of every sequence over the static cache, which it updates at ``pos`` in place.

    ``q [B, H*D]``, ``k``/``v [B, KV*D]``, ``keys``/``values [B, KV, L, D]``, ``cos``/``sin [B, D]``,
    ``mask [B, 1, 1, L]`` (additive). The query heads of one key/value head are folded into SDPA's query length
    (no ``repeat_kv`` copy of the cache); head ``h`` reads key/value head ``h // (H / KV)`` as in transformers.
    ``kernel``: the decode attention kernel (:mod:`quick.kernels.attention`: only positions ``<= pos``, split over
    the cache) instead of SDPA. Returns ``[B, H*D]``."""
    b, kv, _, d = keys.shape
    if q_norm is not None and q_norm.shape[-1] != d:  # one norm over the whole projection (OLMoE), not per head
        q, k = rms_norm(q, q_norm, eps, offset), rms_norm(k, k_norm, eps, offset)
        q_norm = k_norm = None
    q, k, v = q.view(b, -1, d), k.view(b, kv, d), v.view(b, kv, d)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps, offset), rms_norm(k, k_norm, eps, offset)
    cos, sin = cos[:, None], sin[:, None]
    q, k = attention.rope(q, cos, sin), attention.rope(k, cos, sin)
    keys.index_copy_(2, pos, k[:, :, None])
    values.index_copy_(2, pos, v[:, :, None])
    if kernel:
        return torch.ops.quick.attn_decode(q, keys, values, pos, mask, scale).reshape(b, -1)
    out = F.scaled_dot_product_attention(q.view(b, kv, -1, d), keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, -1)


# transformers' activation names -> the gate activation of :func:`gated`
GATE_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _projections(parent: nn.Module, names: tuple[str, ...], sizes: tuple[int, ...]) -> Callable[[torch.Tensor], tuple]:
    """Callable giving the projections of one input that ``names`` (the family's scale group, relative to
    ``parent``) produce, as ``len(sizes)`` tensors: a checkpoint's single fused linear split by ``sizes`` (Phi-3's
    q|k|v, gate|up), the product of :func:`~quick.models.fuse.fuse_model`'s fused linear (one kernel), or each
    linear in turn."""
    short = tuple(n.rpartition(".")[2] for n in names)
    if len(short) == 1:
        lin = getattr(parent, short[0], None)
        if lin is None or isinstance(lin, FusedSlice):
            raise UnsupportedModel(f"{type(parent).__name__} lacks the projection {short[0]}")
        return lambda x: lin(x).split(sizes, dim=-1)
    owners = [m for m in parent.children() if isinstance(m, FusedProjection)]
    owner = next((m for m in owners if tuple(n.rpartition(".")[2] for n in m.names) == short), None)
    if owner is not None:
        return owner
    mods = [getattr(parent, n, None) for n in short]
    if any(m is None or isinstance(m, FusedSlice) for m in mods):
        raise UnsupportedModel(f"{type(parent).__name__} lacks the projections {short}")
    return lambda x: tuple(m(x) for m in mods)


def _single(parent: nn.Module, group: ScaleGroup) -> nn.Module | None:
    """The one linear of a single-linear group (a checkpoint's own fused q|k|v or gate|up), else None."""
    return getattr(parent, group.linears[0].rpartition(".")[2], None) if len(group.linears) == 1 else None


def _has_epilogues(linear: nn.Module) -> bool:
    """Whether ``linear`` is asked, per call, if the step's gate / residual add + norm can run inside its kernel
    (``fuses``; where it says yes, ``forward_gated`` / ``forward_add_norm``). Dense layers are not asked; W4A8 layers
    always say no (those epilogues exist only in the W4A16 kernels) and are called as ``layer(x)``."""
    return callable(getattr(linear, "fuses", None))


def _cache_tensors(cache, index: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``index``'s key and value tensors ``[B, KV, max_len, D]`` of a transformers static cache (5.x keeps
    them on ``cache.layers[i]``, 4.x in ``cache.key_cache`` / ``value_cache``). A sliding-window layer is
    accepted when its window covers the whole cache (then it never rolls: a plain static layer)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        layer = layers[index]
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    else:
        keys, values = cache.key_cache[index], cache.value_cache[index]
    if keys is None or values is None or keys.dim() != 4:
        raise RuntimeError("the static cache is not allocated yet: run the prefill before the first decode step")
    for t in (keys, values):
        # transformers marks the cache tensors as static addresses for its own compiled step; where torch's
        # default guards on that address (older releases), every layer's tensors would be a recompile of the
        # shared functions here, which take them as plain arguments
        if getattr(t, "_dynamo_static_input_type", None) == "guarded":
            t._dynamo_static_input_type = "unguarded"
    if keys.shape[2] != max_len or values.shape[2] != max_len:
        raise UnsupportedModel(
            f"cache layer {index} holds {keys.shape[2]} positions, not {max_len}: a sliding window shorter than "
            "the generation is not supported by the fast decode step"
        )
    return keys, values


@dataclass
class _Layer:
    norm_attn: torch.Tensor  # weight of the norm feeding the attention ...
    norm_mlp: torch.Tensor  # ... and the MLP
    post_attn: torch.Tensor | None  # weights of the norms on each branch's output (ModelFamily.branch_norms)
    post_mlp: torch.Tensor | None
    eps: float
    qkv: Callable[[torch.Tensor], tuple]
    o: nn.Module
    gate_up: Callable[[torch.Tensor], tuple] | None  # None for a mixture-of-experts block (``moe``)
    down: nn.Module | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qk_eps: float
    scale: float
    rope: str | None  # which rotary table (transformers' layer type where the model has several)
    gated_down: bool  # gate/up is one fused linear and down has epilogues: down.forward_gated(gate_up product)
    add_norm: bool  # o and down (or o, before experts) have epilogues and no branch norms: add + norm in their kernels
    keys: torch.Tensor
    values: torch.Tensor
    # W4A8 layers of q/k/v and gate/up whose input norm may quantize for them (normquant), with their split sizes
    nq_attn: QuickLinearW4A8 | None = None
    nq_mlp: QuickLinearW4A8 | None = None
    qkv_sizes: tuple[int, ...] = ()
    mlp_sizes: tuple[int, ...] = ()
    # a mixture-of-experts block on the normed input [T, H] in place of gate_up / down: RoutedBlock (router top-k and
    # plan in one kernel, then the grouped kernels), or transformers' own block where RoutedBlock declines it; called
    # with sum_slots=False it may return the weighted slot rows [T, top_k, H], which the next add + norm sums
    # (add_rms_norm; a norm that quantizes for W4A8 takes the sum)
    moe: Callable[..., torch.Tensor] | None = None


def _block_call(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A transformers block taking ``[B, S, H]`` as a function of ``[T, H]``."""

    def call(x: torch.Tensor, sum_slots: bool = True) -> torch.Tensor:
        return block(x[:, None])[:, 0]

    return call


# (backend, dynamic) -> the three compiled functions: module-level so that every decoder (every batch size and
# generator) reuses dynamo's cache of them instead of building its own.
_COMPILED: dict[tuple[str | None, bool | None], tuple[Callable, Callable, Callable]] = {}


def compiled_parts(backend: str | None, dynamic: bool | None = None) -> tuple[Callable, Callable, Callable]:
    """(add_rms_norm, attend, gated), compiled with ``backend`` (``None``: plain eager functions)."""
    key = (backend, dynamic)
    if key not in _COMPILED:
        fns = (add_rms_norm, attend, gated)
        if backend is not None:
            fns = tuple(torch.compile(f, fullgraph=True, dynamic=dynamic, backend=backend) for f in fns)
        _COMPILED[key] = fns
    return _COMPILED[key]


def _gate_act(cfg) -> str:
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if act not in GATE_ACTS:
        raise UnsupportedModel(f"activation {act!r} (the fast decode step implements {sorted(GATE_ACTS)})")
    return GATE_ACTS[act]


def check_supported(model: nn.Module, max_len: int | None = None) -> None:
    """Raise :class:`UnsupportedModel` unless the fast decode step implements this model (for generations of up
    to ``max_len`` tokens: a sliding window must cover them)."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if max_len is not None and window and window < max_len:
        raise UnsupportedModel(f"sliding window {window} < {max_len} positions (the fast step attends to all)")
    family = get_family(cfg)
    if not family.fast_decode:
        raise UnsupportedModel(f"family '{family.name}' has no fast decode step (ModelFamily.fast_decode)")
    _gate_act(cfg)
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "clip_qkv"):
        if getattr(cfg, key, None):
            raise UnsupportedModel(f"{key} is not supported by the fast decode step")
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "rotary_emb", "norm"):
        if not hasattr(inner, name):
            raise UnsupportedModel(f"model.model has no '{name}'")
    if not hasattr(model, "lm_head"):
        raise UnsupportedModel("the model has no lm_head")
    names = (*(g.prev for g in io_groups(family)), *(family.branch_norms or ()))
    for layer in decoder_layers(model, family):
        missing = [n for n in names if not hasattr(layer, n)]
        if missing:
            raise UnsupportedModel(f"decoder layer {type(layer).__name__} has no {missing}")
        known = set(names) | {"self_attn", "mlp"}
        extra = [n for n, m in layer.named_children() if "norm" in n and n not in known]
        if extra:  # a norm the family's data does not place: computing without it would be wrong
            raise UnsupportedModel(f"decoder layer norms {extra} are not described by family '{family.name}'")


def _takes_layer_type(rotary: nn.Module) -> bool:
    try:
        return "layer_type" in inspect.signature(rotary.forward).parameters
    except (TypeError, ValueError):
        return False


class FastDecoder:
    """The decode step of a supported model over a transformers static cache (see the module docstring).

    Made after the prefill (the cache tensors must exist). ``__call__(ids [B, 1], pos [1], mask [B, 1, 1, L])``
    returns the next-token logits ``[B, V]`` and writes the step's keys and values at ``pos``; ``L`` is the
    cache's ``max_len``."""

    def __init__(
        self,
        model: nn.Module,
        cache,
        max_len: int,
        backend: str | None = "inductor",
        dynamic: bool | None = None,
        attn_kernel: bool | None = None,
        attn_rope: bool | None = None,
        fusions: bool = True,
    ) -> None:
        check_supported(model, max_len)
        self.model = model
        self.cache, self.max_len = cache, max_len
        self.norm_rms, self.attend, self.gated = compiled_parts(backend, dynamic)
        # QuickLinear projections may take the step's small kernels into theirs (CUDA, decode sizes: QuickLinear.fuses
        # decides per call, from the switches in quick.kernels.decode): the down projection stages act(gate) * up
        # itself, and the o / down projections end with the residual add + RMSNorm. fusions=False: never.
        self.fusions = fusions
        family = get_family(model.config)
        self.offset = float(family.norm_offset)
        self.act = _gate_act(model.config)
        inner = model.model
        types = getattr(model.config, "layer_types", None) if _takes_layer_type(inner.rotary_emb) else None
        self.layers = [
            self._layer(i, layer, family, types[i] if types else None)
            for i, layer in enumerate(decoder_layers(model, family))
        ]
        self.final_norm, self.final_eps = inner.norm.weight, norm_eps(inner.norm)
        # the decode attention kernel where it has a variant (attn_kernel None: if the GPU can build it; False: SDPA)
        keys = self.layers[0].keys
        heads = model.config.num_attention_heads
        fits = keys.is_cuda and attention.supports(heads, keys.shape[1], keys.shape[-1], keys.dtype)
        self.attn_kernel = fits and (attention.is_available(keys.device) if attn_kernel is None else attn_kernel)
        # ... with the rotary and the cache append inside it (attn_rope None: attention.rope_fusion_enabled()), for
        # the layers it applies to (no q/k head norms, rotary over every channel: checked per call)
        self.attn_rope = self.attn_kernel and (attention.rope_fusion_enabled() if attn_rope is None else attn_rope)
        # transformers 5.x cache layers count their tokens on the device; one multi-tensor add per step keeps
        # them equal to what transformers' own update would leave (4.x has no such counters)
        layers = getattr(cache, "layers", None) or []
        self._counters = [c for c in (getattr(layer, "cumulative_length", None) for layer in layers) if c is not None]

    def _layer(self, index: int, layer: nn.Module, family: ModelFamily, rope: str | None) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        keys, values = _cache_tensors(self.cache, index, self.max_len)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        g_attn, g_mlp = io_groups(family)
        norm_attn, norm_mlp = layer.get_submodule(g_attn.prev), layer.get_submodule(g_mlp.prev)
        post = [layer.get_submodule(n).weight for n in family.branch_norms] if family.branch_norms else [None, None]
        cfg = self.model.config
        d = keys.shape[-1]
        qkv_sizes = (cfg.num_attention_heads * d, keys.shape[1] * d, keys.shape[1] * d)
        ffn = getattr(cfg, "intermediate_size", None)
        qkv = _projections(attn, g_attn.linears, qkv_sizes)
        moe = None
        if family.moe is not None and hasattr(mlp, "experts"):
            from quick.models.moe import RoutedBlock

            moe = RoutedBlock.of(mlp, family.moe, cfg) or _block_call(mlp)
        gate_up = None if moe is not None else _projections(mlp, g_mlp.linears, (ffn, ffn))
        down = None if moe is not None else mlp.down_proj
        gated_down = self.fusions and isinstance(gate_up, FusedProjection) and _has_epilogues(down)
        add_norm = (
            self.fusions
            and _has_epilogues(attn.o_proj)
            and (moe is not None or _has_epilogues(down))
            and post[0] is None
            and post[1] is None
        )
        nq_attn = nq_mlp = None
        if self.fusions and post[0] is None and post[1] is None:  # branch norms come before the add: not fused
            from quick.models import normquant

            nq_attn = normquant.w4a8_layer(qkv if isinstance(qkv, FusedProjection) else _single(attn, g_attn))
            if moe is None:
                nq_mlp = normquant.w4a8_layer(gate_up if isinstance(gate_up, FusedProjection) else _single(mlp, g_mlp))
            if nq_attn is not None or nq_mlp is not None:
                import quick.kernels.ops  # noqa: F401 - defines torch.ops.quick.rms_norm_quant
        return _Layer(
            norm_attn=norm_attn.weight,
            norm_mlp=norm_mlp.weight,
            post_attn=post[0],
            post_mlp=post[1],
            eps=norm_eps(norm_attn),
            qkv=qkv,
            o=attn.o_proj,
            gate_up=gate_up,
            down=down,
            q_norm=None if q_norm is None else q_norm.weight,
            k_norm=None if k_norm is None else k_norm.weight,
            qk_eps=norm_eps(q_norm) if q_norm is not None else 0.0,
            scale=float(getattr(attn, "scaling", keys.shape[-1] ** -0.5)),
            rope=rope,
            gated_down=gated_down,
            add_norm=add_norm,
            keys=keys,
            values=values,
            nq_attn=nq_attn,
            nq_mlp=nq_mlp,
            qkv_sizes=qkv_sizes,
            mlp_sizes=(ffn, ffn),
            moe=moe,
        )

    def _rotary(self, h: torch.Tensor, pos: torch.Tensor) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin ``[B, D]`` of this step's position, once per rotary table the layers use."""
        rotary, ids = self.model.model.rotary_emb, pos.view(1, 1).expand(h.shape[0], 1)
        out = {}
        for rope in {layer.rope for layer in self.layers}:
            cos, sin = rotary(h[:, None], ids, rope) if rope is not None else rotary(h[:, None], ids)
            out[rope] = (cos[:, 0], sin[:, 0])
        return out

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from quick.models import normquant

        h = self.model.model.embed_tokens(ids)[:, 0]  # [B, hidden]
        rope = self._rotary(h, pos)
        mask = mask.contiguous()  # once per step (an expanded mask would be copied inside every layer's attend)
        residual = torch.zeros_like(h)  # layer 0's add is then exact: norm(0 + h) == norm(h)
        branch = None  # the previous layer's post-MLP norm (applied to its output before the add)
        off = self.offset
        x = None  # the next block's normed input, where the projection before it already made it (add_norm)
        rows, dt = h.shape[0], h.dtype
        for i, layer in enumerate(self.layers):
            if x is None and normquant.applies(layer.nq_attn, h, layer.norm_attn):
                xq, sx, residual = normquant.norm_quant(h, residual, layer.norm_attn, layer.eps, off)
                q, k, v = layer.nq_attn.forward_quantized(xq, sx, dt).split(layer.qkv_sizes, dim=-1)
            else:
                if x is None:
                    x, residual = self.norm_rms(h, residual, layer.norm_attn, layer.eps, off, branch)
                q, k, v = layer.qkv(x)
            cos, sin = rope[layer.rope]
            if self.attn_rope and layer.q_norm is None and cos.shape[-1] == layer.keys.shape[-1]:
                kv_cache = (layer.keys, layer.values)
                a = torch.ops.quick.attn_decode_rope(q, k, v, *kv_cache, pos, cos, sin, mask, layer.scale)
            else:
                a = self.attend(
                    q, k, v, layer.keys, layer.values, pos, cos, sin, mask, layer.q_norm, layer.k_norm, layer.qk_eps,
                    layer.scale, off, self.attn_kernel,
                )  # fmt: skip
            act = self.act if layer.gated_down and layer.down.fuses(rows, h.device, dt, act=self.act) else ""
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            gu = None  # the gate/up product, where the norm before it quantized its input (normquant)
            if layer.add_norm and layer.o.fuses(rows, h.device, dt, norm=True):
                x, residual = layer.o.forward_add_norm(a, residual, layer.norm_mlp, layer.eps, off)
            else:
                o = layer.o(a)
                if normquant.applies(layer.nq_mlp, o, layer.norm_mlp):
                    xq, sx, residual = normquant.norm_quant(o, residual, layer.norm_mlp, layer.eps, off)
                    gu = layer.nq_mlp.forward_quantized(xq, sx, dt)
                else:
                    x, residual = self.norm_rms(o, residual, layer.norm_mlp, layer.eps, off, layer.post_attn)
            if layer.moe is not None:  # router and experts, then the next layer's add + norm
                nxt_nq = nxt is not None and nxt.nq_attn is not None  # its norm quantizes: it takes a summed h
                h, x, branch = layer.moe(x, sum_slots=nxt_nq), None, layer.post_mlp
                continue
            if gu is not None:
                down_in = gu if act else self.gated(*gu.split(layer.mlp_sizes, dim=-1), self.act)
            else:
                down_in = layer.gate_up.linear(x) if act else self.gated(*layer.gate_up(x), self.act)
            norm_w, norm_eps = (nxt.norm_attn, nxt.eps) if nxt else (self.final_norm, self.final_eps)
            if layer.add_norm and layer.down.fuses(rows, h.device, dt, act=act, norm=True):
                x, residual = layer.down.forward_add_norm(down_in, residual, norm_w, norm_eps, off, act)
            else:
                h = layer.down.forward_gated(down_in, act) if act else layer.down(down_in)
                x = None
            branch = layer.post_mlp
        if x is None:
            x, _ = self.norm_rms(h, residual, self.final_norm, self.final_eps, off, branch)
        if self._counters:
            torch._foreach_add_(self._counters, 1)
        return self.model.lm_head(x)
