"""Model families for AWQ, written as data.

AWQ needs to know, per decoder layer, which linears read the same input and which operation produced
that input, so that a per-input-channel scale ``s`` can be moved out of the linears (``W * s``) and into
the preceding op (``prev / s``) without changing the float model. That knowledge is architectural and
the same for every checkpoint of a family, so it lives here as plain dataclasses rather than as code
paths in the quantizer. Adding a family means adding one :class:`ModelFamily` entry to ``FAMILIES``
(docs/families.md: what each field is for and the tests that check an entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn


class UnsupportedModel(ValueError):
    """The model's decoder layers are not the llama-like structure the fast decode step implements."""


class FamilyError(ValueError):
    """The model's architecture is unknown to AWQ or does not look like its family says it should."""


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that share one input, the op that produced it, and the module whose output AWQ compares.

    ``prev``: the op before the linears, relative to the decoder layer (an RMSNorm or an ``nn.Linear``).
    ``linears``: the linears reading ``prev``'s output (their input channels get multiplied by ``s``).
    ``inspect``: the module whose output the scale search compares against the float model; ``None`` means
    the single linear itself. ``inspect_kwargs``: pass the decoder layer's call kwargs (position
    embeddings, attention mask) to ``inspect`` -- needed for attention blocks.
    ``same_shape``: only use the group when these two modules' weights have the same shape (AutoAWQ's
    rule for folding into ``v_proj``: with grouped-query attention a ``v_proj`` output channel feeds several
    ``o_proj`` input channels, so one scale per ``o_proj`` channel cannot be folded into it).
    ``prev_parts``: ``prev`` is a linear whose output is that many equal parts (a checkpoint's fused q|k|v or
    gate|up) and the last part feeds the group (the scales fold into its rows); the group is used only when
    the parts are equal, i.e. ``prev`` has ``prev_parts`` times the linears' input width (for q|k|v: no GQA).
    ``also_scale``: modules that read the same input but stay 16-bit (a MoE router, a shared expert's gate): their
    weights get ``* s`` too when the scale is folded, so their outputs do not change.
    ``stats_from``: the module whose input gives the activation statistics of the scale search, when each linear
    sees only part of the tokens (experts see the tokens routed to them; the MoE block sees every token).
    ``if_present``: the group applies only to layers that have this submodule (MoE models with dense-MLP layers).
    A name may hold one ``*``, standing for every index of a ``ModuleList`` (the experts): a ``*`` in ``prev`` makes
    one group per index; a ``*`` only in ``linears`` puts every index into the one group.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    inspect_kwargs: bool = False
    same_shape: tuple[str, str] | None = None
    prev_parts: int = 1
    also_scale: tuple[str, ...] = ()
    stats_from: str | None = None
    if_present: str | None = None


ROUTINGS = ("softmax", "own")


@dataclass(frozen=True)
class MoESpec:
    """A sparse mixture-of-experts block as transformers (>= 5) builds it.

    ``block``: the MoE block of a decoder layer. Its ``experts`` module holds every expert's gate and up rows as one
    3-D parameter ``gate_up_proj`` ``[E, 2I, H]`` (gate rows first) and ``down_proj`` ``[E, H, I]``, and is called
    as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``. ``router``: the module computing the
    top-k (kept 16-bit). ``num_experts`` / ``top_k``: config attribute names. ``renormalize``: the top-k softmax
    probabilities are divided by their sum -- ``True`` always (Mixtral), or the name of the config attribute that
    switches it (Qwen: ``norm_topk_prob``). ``cast_weights``: the router rounds the top-k weights to the logits'
    dtype (Qwen) instead of keeping them fp32 (Mixtral). ``shared_expert``: a dense gated MLP every token goes
    through, scaled by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE); it is quantized like a dense MLP, its gate
    (N = 1) stays 16-bit. ``checkpoint_names``: the per-expert gate, up and down linears in the published
    checkpoint files (transformers fuses them into the 3-D parameters when loading; other libraries' 4-bit
    checkpoints keep them per expert). ``checkpoint_block``: the block's name in those files where it differs from
    ``block`` (Mixtral's ``block_sparse_moe``). ``routing``: ``"softmax"`` (the top-k of a softmax over the router's
    logits, optionally renormalized: what the fused route kernel computes) or ``"own"`` (a routing only the family's
    router module computes, such as DeepSeek's sigmoid scores with a correction bias, group-limited top-k and a
    scaling factor: the decode step then calls the block's own forward, with the 4-bit experts inside it).
    """

    block: str = "mlp"
    experts: str = "experts"
    router: str = "gate"
    num_experts: str = "num_experts"
    top_k: str = "num_experts_per_tok"
    renormalize: bool | str = "norm_topk_prob"
    cast_weights: bool = True
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    checkpoint_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    checkpoint_block: str | None = None
    routing: str = "softmax"

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"MoESpec.routing must be one of {ROUTINGS}, got {self.routing!r}")

    @property
    def experts_path(self) -> str:
        return f"{self.block}.{self.experts}"


@dataclass(frozen=True)
class ModelFamily:
    """Everything AWQ needs to know about one architecture.

    ``norm_offset``: the RMSNorm multiplies by ``(norm_offset + weight)``; Gemma stores ``weight`` around 0
    and multiplies by ``1 + weight``, so folding ``1/s`` must act on ``1 + weight``, not on ``weight``.
    ``no_clip``: substrings of linear names that skip the clipping search (query/key: AutoAWQ found that
    clipping them hurts, attention scores amplify their errors).
    ``modules_to_not_convert``: substrings of module names that stay dense.
    ``requires_bos``: every sequence must start with BOS (Gemma degrades badly without it).
    ``fast_decode``: :mod:`quick.models.decoder`'s few-kernel decode step applies (q/k/v/o attention with
    optional q/k head norms, a gated MLP or a mixture-of-experts block, RMSNorms placed by ``groups`` and
    ``branch_norms``).
    ``branch_norms``: norms applied to the attention and the MLP output before each residual add (Gemma3).
    ``moe``: the family's sparse MoE block (:class:`MoESpec`); ``None`` for dense families.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    groups: tuple[ScaleGroup, ...]
    norm_offset: float = 0.0
    no_clip: tuple[str, ...] = ("q_proj", "k_proj")
    modules_to_not_convert: tuple[str, ...] = ("lm_head",)
    requires_bos: bool = False
    fast_decode: bool = False
    branch_norms: tuple[str, str] | None = None
    moe: MoESpec | None = None
    notes: str = field(default="", compare=False)


_ATTN_IN = ScaleGroup(
    prev="input_layernorm",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    inspect="self_attn",
    inspect_kwargs=True,
)
_ATTN_OUT = ScaleGroup(
    prev="self_attn.v_proj",
    linears=("self_attn.o_proj",),
    same_shape=("self_attn.v_proj", "self_attn.o_proj"),
)
_MLP_DOWN = ScaleGroup(prev="mlp.up_proj", linears=("mlp.down_proj",))


def _mlp_in(norm: str) -> ScaleGroup:
    return ScaleGroup(prev=norm, linears=("mlp.gate_proj", "mlp.up_proj"), inspect="mlp")


_LLAMA_GROUPS = (_ATTN_IN, _ATTN_OUT, _mlp_in("post_attention_layernorm"), _MLP_DOWN)
# Phi-3 stores q|k|v and gate|up as one linear each: the v rows (multi-head attention only) and the up rows are the
# tails that o_proj's and down_proj's scales fold into.
_PHI3_GROUPS = (
    ScaleGroup(prev="input_layernorm", linears=("self_attn.qkv_proj",), inspect="self_attn", inspect_kwargs=True),
    ScaleGroup(prev="self_attn.qkv_proj", linears=("self_attn.o_proj",), prev_parts=3),
    ScaleGroup(prev="post_attention_layernorm", linears=("mlp.gate_up_proj",), inspect="mlp"),
    ScaleGroup(prev="mlp.gate_up_proj", linears=("mlp.down_proj",), prev_parts=2),
)
# Gemma3 normalises the attention *output* with post_attention_layernorm (before the residual add); the MLP
# input comes from pre_feedforward_layernorm, so that is the op the gate/up scales fold into.
_GEMMA3_GROUPS = (_ATTN_IN, _ATTN_OUT, _mlp_in("pre_feedforward_layernorm"), _MLP_DOWN)


# Mixture of experts: one scale for the norm output that the router, every expert's gate/up (and a shared expert)
# read -- it folds into the shared norm, so the router is scaled too and routes exactly as before -- searched on the
# whole MoE block over every token; then per expert the down projection's scale, folded into that expert's up rows,
# searched on the tokens routed to it. The expert linears exist during calibration only (quick.models.moe).
_MOE_IN = ScaleGroup(
    prev="post_attention_layernorm",
    linears=("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
    inspect="mlp",
    also_scale=("mlp.gate",),
    stats_from="mlp",
    if_present="mlp.experts",
)
_MOE_DOWN = ScaleGroup(prev="mlp.experts.*.up_proj", linears=("mlp.experts.*.down_proj",), if_present="mlp.experts")
# Layers listed in mlp_only_layers, off the decoder_sparse_step or before first_k_dense_replace have a dense MLP.
_DENSE_MLP = (
    replace(_mlp_in("post_attention_layernorm"), if_present="mlp.gate_proj"),
    replace(_MLP_DOWN, if_present="mlp.down_proj"),
)


def _moe_groups(
    attention: tuple[ScaleGroup, ...] = (_ATTN_IN, _ATTN_OUT), shared: str | None = None, shared_gate: str | None = None
) -> tuple[ScaleGroup, ...]:
    """The scale groups of a MoE family: ``attention``'s, the MoE input (router, every expert's gate/up and a shared
    expert's ``shared`` MLP, whose 16-bit ``shared_gate`` is scaled too), each expert's down projection, the shared
    expert's down projection, and the dense-MLP layers' groups."""
    extra = (f"{shared}.gate_proj", f"{shared}.up_proj") if shared else ()
    also = (*_MOE_IN.also_scale, shared_gate) if shared_gate else _MOE_IN.also_scale
    moe_in = replace(_MOE_IN, linears=(*_MOE_IN.linears, *extra), also_scale=also)
    shared_down = (
        (ScaleGroup(prev=f"{shared}.up_proj", linears=(f"{shared}.down_proj",), if_present=shared),) if shared else ()
    )
    return (*attention, moe_in, _MOE_DOWN, *shared_down, *_DENSE_MLP)


_MOE_GROUPS = _moe_groups()
_QWEN2_MOE_GROUPS = _moe_groups(shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate")
# DeepSeek's multi-head latent attention: the layer's input norm feeds the query (or its low-rank down projection)
# and the joint key/value down projection; the low-rank up projections read their own RMSNorms. The output
# projection reads the value rows of kv_b_proj interleaved with the keys' per head: no group, its own clipping only.
_MLA_GROUPS = (
    ScaleGroup(
        prev="input_layernorm",
        linears=("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
        inspect="self_attn",
        inspect_kwargs=True,
        if_present="self_attn.q_a_proj",
    ),
    ScaleGroup(
        prev="input_layernorm",
        linears=("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
        inspect="self_attn",
        inspect_kwargs=True,
        if_present="self_attn.q_proj",
    ),
    ScaleGroup(prev="self_attn.q_a_layernorm", linears=("self_attn.q_b_proj",), if_present="self_attn.q_a_layernorm"),
    ScaleGroup(prev="self_attn.kv_a_layernorm", linears=("self_attn.kv_b_proj",)),
)
# Qwen3.5: three Gated DeltaNet (linear attention) layers to each full-attention layer (gated query, q/k norms);
# zero-centred norms (1 + weight). A linear-attention layer's q|k|v and gate projections read the input norm; its
# decay and step projections (N = the value heads) stay 16-bit and are scaled with them. Its out_proj reads a gated
# norm whose weight is shared by every value head: no per-channel fold, its own clipping only.
_LINEAR_ATTN_IN = ScaleGroup(
    prev="input_layernorm",
    linears=("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"),
    inspect="linear_attn",
    inspect_kwargs=True,
    also_scale=("linear_attn.in_proj_b", "linear_attn.in_proj_a"),
    if_present="linear_attn",
)
_HYBRID_ATTENTION = (
    replace(_ATTN_IN, if_present="self_attn"),
    replace(_ATTN_OUT, if_present="self_attn"),
    _LINEAR_ATTN_IN,
)
_QWEN3_5_KEEP = ("lm_head", "in_proj_b", "in_proj_a")
_MLA_NO_CLIP = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj")
_DEEPSEEK_MOE = MoESpec(num_experts="n_routed_experts", routing="own", shared_expert="shared_experts")

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("llama", ("llama",), "model.layers", _LLAMA_GROUPS, fast_decode=True),
    ModelFamily("mistral", ("mistral",), "model.layers", _LLAMA_GROUPS, fast_decode=True),
    ModelFamily("qwen2", ("qwen2",), "model.layers", _LLAMA_GROUPS, fast_decode=True, notes="q/k/v carry biases"),
    ModelFamily(
        "qwen3",
        ("qwen3",),
        "model.layers",
        _LLAMA_GROUPS,
        fast_decode=True,
        notes="q_norm/k_norm act per head after q/k",
    ),
    ModelFamily(
        "phi3",
        ("phi3",),
        "model.layers",
        _PHI3_GROUPS,
        no_clip=("qkv_proj",),
        fast_decode=True,
        notes="q|k|v and gate|up are single linears in the checkpoint",
    ),
    ModelFamily(
        "gemma3_text",
        ("gemma3_text",),
        "model.layers",
        _GEMMA3_GROUPS,
        norm_offset=1.0,
        requires_bos=True,
        fast_decode=True,
        branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    ),
    ModelFamily("seed_oss", ("seed_oss",), "model.layers", _LLAMA_GROUPS, fast_decode=True, notes="q/k/v biases"),
    ModelFamily(
        "smollm3",
        ("smollm3",),
        "model.layers",
        _LLAMA_GROUPS,
        notes="llama layers, every fourth without rotary (NoPE): no fast decode step",
    ),
    ModelFamily(
        "gemma",
        ("gemma",),
        "model.layers",
        _LLAMA_GROUPS,
        norm_offset=1.0,
        requires_bos=True,
        fast_decode=True,
        notes="Gemma 1: llama layers with 1 + weight norms, GeGLU and a scaled embedding",
    ),
    ModelFamily(
        "gemma2",
        ("gemma2",),
        "model.layers",
        _GEMMA3_GROUPS,
        norm_offset=1.0,
        requires_bos=True,
        branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        notes="Gemma 3's layer without q/k norms; attention and final logit soft-capping (no fast decode step)",
    ),
    ModelFamily(
        "granite",
        ("granite",),
        "model.layers",
        _LLAMA_GROUPS,
        notes="llama layers with embedding, residual and attention multipliers and scaled logits (no fast decode step)",
    ),
    ModelFamily(
        "gemma3",
        ("gemma3",),
        "model.language_model.layers",
        _GEMMA3_GROUPS,
        norm_offset=1.0,
        modules_to_not_convert=("lm_head", "vision_tower", "multi_modal_projector"),
        requires_bos=True,
        notes="multimodal wrapper: only the text decoder is quantized",
    ),
    ModelFamily(
        "qwen3_5",
        ("qwen3_5", "qwen3_5_text"),
        "model.layers",
        (*_HYBRID_ATTENTION, _mlp_in("post_attention_layernorm"), _MLP_DOWN),
        norm_offset=1.0,
        modules_to_not_convert=_QWEN3_5_KEEP,
        notes="hybrid: Gated DeltaNet linear attention in three of four layers (no fast decode step)",
    ),
    ModelFamily(
        "qwen3_5_moe",
        ("qwen3_5_moe", "qwen3_5_moe_text"),
        "model.layers",
        _moe_groups(_HYBRID_ATTENTION, shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate"),
        norm_offset=1.0,
        modules_to_not_convert=(*_QWEN3_5_KEEP, "shared_expert_gate"),
        moe=MoESpec(renormalize=True, shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
        notes="Qwen3.5's hybrid layers with a mixture of experts and a gated shared expert (no fast decode step)",
    ),
    ModelFamily(
        "qwen2_vl",
        ("qwen2_vl", "qwen2_5_vl"),
        "model.language_model.layers",
        _LLAMA_GROUPS,
        modules_to_not_convert=("lm_head", "visual"),
        notes="vision-language wrapper (Qwen2-VL, Qwen2.5-VL): the Qwen2 text decoder is quantized, the vision "
        "encoder stays 16-bit; multimodal rotary positions (no fast decode step)",
    ),
    ModelFamily(
        "qwen3_vl",
        ("qwen3_vl",),
        "model.language_model.layers",
        _LLAMA_GROUPS,
        modules_to_not_convert=("lm_head", "visual"),
        notes="vision-language wrapper (Qwen3-VL): the Qwen3 text decoder (q/k norms) is quantized",
    ),
    ModelFamily(
        "qwen3_vl_moe",
        ("qwen3_vl_moe",),
        "model.language_model.layers",
        _MOE_GROUPS,
        modules_to_not_convert=("lm_head", "visual"),
        moe=MoESpec(),
        notes="vision-language wrapper (Qwen3-VL-30B-A3B): the Qwen3-MoE text decoder is quantized",
    ),
    ModelFamily(
        "llava",
        ("llava", "mistral3"),
        "model.language_model.layers",
        _LLAMA_GROUPS,
        modules_to_not_convert=("lm_head", "vision_tower", "multi_modal_projector"),
        notes="vision-language wrappers around a Llama / Mistral text decoder (LLaVA, Mistral Small 3.1 / 3.2)",
    ),
    ModelFamily(
        "qwen3_moe",
        ("qwen3_moe",),
        "model.layers",
        _MOE_GROUPS,
        fast_decode=True,
        moe=MoESpec(),
        notes="q_norm/k_norm per head; 128 experts, top-8, no shared expert (Qwen3-30B-A3B)",
    ),
    ModelFamily(
        "mixtral",
        ("mixtral",),
        "model.layers",
        _MOE_GROUPS,
        fast_decode=True,
        moe=MoESpec(
            num_experts="num_local_experts",
            renormalize=True,
            cast_weights=False,
            checkpoint_names=("w1", "w3", "w2"),
            checkpoint_block="block_sparse_moe",
        ),
        notes="8 experts, top-2; checkpoints name the block block_sparse_moe, transformers 5 builds it as mlp",
    ),
    ModelFamily(
        "qwen2_moe",
        ("qwen2_moe",),
        "model.layers",
        _QWEN2_MOE_GROUPS,
        fast_decode=True,
        modules_to_not_convert=("lm_head", "shared_expert_gate"),
        moe=MoESpec(shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
        notes="q/k/v carry biases; a shared expert gated by sigmoid(shared_expert_gate(x)) beside the routed ones",
    ),
    ModelFamily(
        "olmoe",
        ("olmoe",),
        "model.layers",
        _MOE_GROUPS,
        fast_decode=True,
        moe=MoESpec(),
        notes="q_norm/k_norm over the whole q/k projections; 64 experts, top-8, no shared expert (OLMoE-1B-7B)",
    ),
    ModelFamily(
        "glm4_moe",
        ("glm4_moe",),
        "model.layers",
        _moe_groups(shared="mlp.shared_experts"),
        fast_decode=True,
        moe=_DEEPSEEK_MOE,
        notes="partial rotary, q/k/v biases; sigmoid routing with group-limited top-k, shared experts, the first "
        "layers dense (GLM-4.5, GLM-4.5-Air)",
    ),
    ModelFamily(
        "minimax_m2",
        ("minimax_m2",),
        "model.layers",
        _MOE_GROUPS,
        fast_decode=True,
        moe=MoESpec(num_experts="num_local_experts", renormalize=True, routing="own"),
        notes="q/k norms over the whole projections, partial rotary; sigmoid routing with a correction bias "
        "(MiniMax-M2)",
    ),
    ModelFamily(
        "ernie4_5_moe",
        ("ernie4_5_moe",),
        "model.layers",
        _moe_groups(shared="mlp.shared_experts"),
        moe=MoESpec(renormalize=True, routing="own", shared_expert="shared_experts"),
        notes="interleaved rotary in fp32 (no fast decode step); softmax routing whose choice adds a correction "
        "bias, shared experts, the first layer dense (ERNIE 4.5 MoE)",
    ),
    ModelFamily(
        "deepseek",
        ("deepseek_v3", "deepseek_v2", "glm4_moe_lite"),
        "model.layers",
        _moe_groups(_MLA_GROUPS, shared="mlp.shared_experts"),
        no_clip=_MLA_NO_CLIP,
        moe=_DEEPSEEK_MOE,
        notes="multi-head latent attention (transformers' own, no fast decode step); shared experts, the first layers "
        "dense; V3 (DeepSeek-V3/R1, Kimi K2, Moonlight) and GLM's latent-attention models (glm4_moe_lite): sigmoid "
        "routing with a correction bias and group-limited top-k; V2 (DeepSeek-V2, V2-Lite): softmax routing, greedy "
        "or group-limited; both times a scaling factor",
    ),
)

_BY_TYPE: dict[str, ModelFamily] = {t: f for f in FAMILIES for t in f.model_types}


def known_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def get_family(config_or_type: Any) -> ModelFamily:
    """Family for a ``model_type`` string or a transformers config; a clear error for unknown ones."""
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    family = _BY_TYPE.get(model_type)  # type: ignore[arg-type]
    if family is None:
        raise FamilyError(
            f"no AWQ model family for model_type '{model_type}' (known: {', '.join(known_model_types())}). "
            "To add it, append a ModelFamily to FAMILIES in quick/models/families.py with its model_type, the "
            "path of its decoder layer list (e.g. 'model.layers') and its ScaleGroups: which linears share an "
            "input and which norm/linear precedes them. Round-to-nearest (method='rtn') needs no family."
        )
    return family


def decoder_layers(model: nn.Module, family: ModelFamily) -> nn.ModuleList:
    """The model's list of decoder layers, found through ``family.layers_path``."""
    try:
        layers = model.get_submodule(family.layers_path)
    except AttributeError:
        raise FamilyError(
            f"family '{family.name}' expects decoder layers at '{family.layers_path}', which "
            f"{type(model).__name__} does not have"
        ) from None
    if not isinstance(layers, nn.ModuleList):
        raise FamilyError(f"'{family.layers_path}' is a {type(layers).__name__}, expected an nn.ModuleList")
    return layers


def _has(layer: nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True


def _expand(layer: nn.Module, family: ModelFamily, g: ScaleGroup) -> list[ScaleGroup]:
    """``g`` with its ``*`` names spelled out over the indices of the ``ModuleList`` they stand in."""
    starred = [n for n in (g.prev, *g.linears) if "*" in n]
    if not starred:
        return [g]
    lists = {n.partition(".*")[0] for n in starred}
    if len(lists) != 1 or any(n.count("*") != 1 or ".*." not in n for n in starred):
        raise FamilyError(f"family '{family.name}': group {g.linears} must use one '.*.' over one ModuleList")
    path = lists.pop()
    container = layer.get_submodule(path) if _has(layer, path) else None
    if not isinstance(container, nn.ModuleList):
        raise FamilyError(
            f"family '{family.name}': '{path}' of {type(layer).__name__} is a {type(container).__name__}, not a "
            "ModuleList of experts; unfuse the experts first (quick.models.moe.unfuse_experts_)"
        )
    indices = [str(i) for i in range(len(container))]
    if "*" in g.prev:
        return [
            replace(g, prev=g.prev.replace("*", i), linears=tuple(n.replace("*", i) for n in g.linears))
            for i in indices
        ]
    linears: list[str] = []
    for n in g.linears:
        linears += [n.replace("*", i) for i in indices] if "*" in n else [n]
    return [replace(g, linears=tuple(linears))]


def active_groups(layer: nn.Module, family: ModelFamily) -> list[ScaleGroup]:
    """The family's scale groups that apply to this layer (checks every named module exists)."""
    out = []
    for template in family.groups:
        if template.if_present is not None and not _has(layer, template.if_present):
            continue
        for g in _expand(layer, family, template):
            names = (g.prev, *g.linears, *g.also_scale, *(n for n in (g.inspect, g.stats_from) if n))
            for name in names:
                if not _has(layer, name):
                    raise FamilyError(
                        f"family '{family.name}': decoder layer {type(layer).__name__} has no submodule '{name}'"
                    )
            if g.same_shape is not None:
                a, b = (layer.get_submodule(n).weight.shape for n in g.same_shape)
                if a != b:
                    continue
            if g.prev_parts > 1:
                width = layer.get_submodule(g.linears[0]).weight.shape[1]
                if layer.get_submodule(g.prev).weight.shape[0] != g.prev_parts * width:
                    continue
            out.append(g)
    return out


def io_groups(family: ModelFamily) -> tuple[ScaleGroup, ScaleGroup]:
    """The family's scale groups of the attention input and of the MLP input (``inspect`` = ``self_attn`` /
    ``mlp``): which norm feeds each block and which linears read it (the facts AWQ folds its scales by)."""
    by_block = {g.inspect: g for g in family.groups if g.inspect in ("self_attn", "mlp")}
    if set(by_block) != {"self_attn", "mlp"}:
        raise UnsupportedModel(f"family '{family.name}' has no scale groups inspecting self_attn and mlp")
    return by_block["self_attn"], by_block["mlp"]


def norm_eps(norm: nn.Module) -> float:
    """An RMSNorm module's epsilon, whatever transformers calls the attribute."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise UnsupportedModel(f"{type(norm).__name__} has no epsilon attribute")
    return float(eps)
