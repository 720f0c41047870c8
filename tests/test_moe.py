"""Mixture-of-experts models on CPU: families as data, QuickMoEExperts against transformers' own model, the sorted-token
plan of a grouped kernel, RTN / AWQ of the experts (with the fallback of starved experts), checkpoints, bad input."""

from __future__ import annotations

import copy
import itertools
import json
import logging
from dataclasses import replace

import pytest
import torch
from helpers import check_static_generation, tiny_moe
from safetensors import safe_open

from quick.algorithms import awq
from quick.algorithms.awq import fold_scale
from quick.auto import quantize_model_rtn
from quick.checkpoint import CheckpointError, load_quantized, save_quantized
from quick.formats.weights import QuantizationError
from quick.models import moe
from quick.models.families import FamilyError, active_groups, decoder_layers, get_family
from quick.nn.dtypes import round_dense_
from quick.nn.linear import QuickLinear
from quick.nn.moe import MoEPlan, QuickExpertStack, QuickMoEExperts, build_plan, plan_capacity

GROUP = 32
# Logits of the 4-bit model against transformers' model holding the dequantized weights: they differ only by the
# fp16 rounding of activations at the packed products (measured 3-4e-4); a wrong expert, weight or routing weight
# gives errors several times the bound (checked below).
MATCH_BOUND = 2e-3

KINDS = ("qwen3_moe", "mixtral", "qwen2_moe", "qwen3_5_moe", "olmoe", "glm4_moe", "deepseek_v3", "deepseek_v2",
         "glm4_moe_lite", "minimax_m2", "ernie4_5_moe")  # fmt: skip
SOFTMAX_KINDS = ("qwen3_moe", "mixtral", "qwen2_moe", "qwen3_5_moe", "olmoe")  # the rest: their own (MoESpec.routing)
# transformers' layers, no fast decode step: latent attention, linear attention, interleaved rotary
NO_FAST_STEP = ("deepseek_v3", "deepseek_v2", "glm4_moe_lite", "qwen3_5_moe", "ernie4_5_moe")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: thread hand-offs cost more than the math on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ids(n: int = 2, seqlen: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def with_outliers(model: torch.nn.Module) -> torch.nn.Module:
    """Outlier channels in the MoE input (what AWQ's scales are for)."""
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.post_attention_layernorm.weight[3 + i] = 8.0
            layer.post_attention_layernorm.weight[17] = 5.0
    return model


def dequantized_reference(float_model: torch.nn.Module, q: torch.nn.Module) -> torch.nn.Module:
    """transformers' own model holding ``q``'s weights: its dense tensors, and the 4-bit ones dequantized."""
    ref = copy.deepcopy(float_model)
    ref_state = ref.state_dict()
    with torch.no_grad():
        for key, t in q.state_dict().items():
            if key in ref_state and ref_state[key].shape == t.shape and t.is_floating_point():
                ref_state[key].copy_(t)
        for name, mod in q.named_modules():
            if isinstance(mod, QuickLinear):
                ref.get_submodule(name).weight.copy_(mod.dequantized_weight(torch.float32))
            elif isinstance(mod, QuickMoEExperts):
                gu, dn = mod.dequantized_weights(torch.float32)
                target = ref.get_submodule(name)
                target.gate_up_proj.copy_(gu)
                target.down_proj.copy_(dn)
    return ref


# ------------------------------------------------------------------------------------------------ families


@pytest.mark.parametrize("kind", KINDS)
def test_family_data_matches_the_model(kind):
    model = tiny_moe(kind)
    fam = get_family(model.config)
    assert fam.moe is not None and fam.fast_decode == (kind not in NO_FAST_STEP)  # the block in place of the MLP
    assert (fam.moe.routing == "softmax") == (kind in SOFTMAX_KINDS)
    experts = moe.experts_modules(model)
    assert list(experts) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    e, k, _ = moe.routing(model.config, fam.moe)
    for mod in experts.values():
        assert moe.check_fused(mod, "x") == (e, 64, 64)
    block = model.model.layers[0].get_submodule(fam.moe.block)
    assert not isinstance(block.get_submodule(fam.moe.router), torch.nn.Linear)  # never picked up as a linear
    if fam.moe.shared_expert:
        assert isinstance(block.get_submodule(f"{fam.moe.shared_expert}.down_proj"), torch.nn.Linear)
    if fam.moe.shared_expert_gate:
        assert isinstance(block.get_submodule(fam.moe.shared_expert_gate), torch.nn.Linear)
        assert fam.moe.shared_expert_gate in fam.modules_to_not_convert


@pytest.mark.parametrize(("kind", "norm_topk"), [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", None),
                                                 ("qwen2_moe", False), ("olmoe", False), ("olmoe", True)])  # fmt: skip
def test_route_reproduces_the_family_router(kind, norm_topk):
    """The family's routing description (softmax, top-k, renormalisation switch) equals transformers' router."""
    model = tiny_moe(kind, **({} if norm_topk is None else {"norm_topk_prob": norm_topk}))
    fam = get_family(model.config)
    _, k, renorm = moe.routing(model.config, fam.moe)
    assert renorm == (True if norm_topk is None else norm_topk)
    router = model.model.layers[0].get_submodule(f"{fam.moe.block}.{fam.moe.router}")
    x = torch.randn(50, 64)
    logits, weights, index = router(x)
    w, i = moe.route(logits, k, renorm)
    assert torch.equal(i, index)
    torch.testing.assert_close(w, weights.float(), rtol=0, atol=0)
    w_wrong, _ = moe.route(logits, k, not renorm)
    assert not torch.allclose(w_wrong, weights.float())


@pytest.mark.parametrize("cast", ["bfloat16", "float"])
def test_model_dtype_casts_keep_the_expert_stacks(cast):
    """``model.bfloat16()`` / ``.float()`` on a RTN MoE model: the expert stacks keep their packed dtypes (their
    ``dtype`` stays true) and the block's output follows the model's new dtype, equal up to that dtype's rounding."""
    model = tiny_moe("qwen3_moe")
    fam = get_family(model.config)
    moe.quantize_experts_rtn_(model, moe.experts_modules(model, fam), dtype=torch.float16)
    experts = model.model.layers[0].get_submodule(fam.moe.experts_path)
    before = {n: b.dtype for n, b in experts.named_buffers()}
    x, idx = torch.randn(6, 64), torch.randint(0, 8, (6, 2))
    w = torch.rand(6, 2)
    with torch.no_grad():
        want = experts(x, idx, w).float()
        getattr(model, cast)()
        new = torch.bfloat16 if cast == "bfloat16" else torch.float32
        got = experts(x.to(new), idx, w)
    assert {n: b.dtype for n, b in experts.named_buffers()} == before and experts.dtype == torch.float16
    assert got.dtype == new
    tol = 2e-2 if new == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_dense_mlp_layers_of_a_moe_model():
    """mlp_only_layers: that layer keeps a dense MLP; AWQ's dense groups apply there, the MoE groups elsewhere."""
    model = tiny_moe("qwen3_moe", mlp_only_layers=[0])
    fam = get_family(model.config)
    layers = decoder_layers(model, fam)
    assert list(moe.experts_modules(model)) == ["model.layers.1.mlp.experts"]
    dense = {g.linears for g in active_groups(layers[0], fam)}
    assert ("mlp.gate_proj", "mlp.up_proj") in dense and ("mlp.down_proj",) in dense
    with pytest.raises(FamilyError, match="unfuse the experts first"):
        active_groups(layers[1], fam)
    moe.unfuse_experts_(layers[1], fam)
    groups = active_groups(layers[1], fam)
    moe_in = next(g for g in groups if g.stats_from)
    assert len(moe_in.linears) == 16 and moe_in.also_scale == ("mlp.gate",)
    downs = [g for g in groups if g.prev.startswith("mlp.experts.")]
    assert [g.linears for g in downs] == [(f"mlp.experts.{e}.down_proj",) for e in range(8)]


@pytest.mark.parametrize("kind", ["glm4_moe", "deepseek_v3"])
def test_first_dense_layers_quantize_save_and_load(kind, tmp_path):
    """first_k_dense_replace (GLM-4.5, DeepSeek-V3): AWQ quantizes layer 0's dense MLP and layer 1's experts and shared
    expert; the checkpoint reloads to the same logits, which match transformers' model holding the weights."""
    model = round_dense_(with_outliers(tiny_moe(kind, first_k_dense_replace=1)), torch.float16)
    assert list(moe.experts_modules(model)) == ["model.layers.1.mlp.experts"]
    q = awq.quantize_model_awq(copy.deepcopy(model), ids(4, 32), GROUP, n_grid=4, progress=False, min_expert_tokens=8)
    mlp0, mlp1 = q.model.layers[0].mlp, q.model.layers[1].mlp
    assert all(isinstance(getattr(mlp0, n), QuickLinear) for n in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(mlp1.experts, QuickMoEExperts) and isinstance(mlp1.shared_experts.down_proj, QuickLinear)
    x = ids()
    with torch.no_grad():
        want = q(x).logits
        assert rel(want, dequantized_reference(model, q)(x).logits) < MATCH_BOUND
        loaded = load_quantized(save_quantized(q, tmp_path / "ckpt"), dtype=torch.float32)
        assert torch.equal(loaded(x).logits, want)


@pytest.mark.parametrize("kind", KINDS)
def test_fold_into_norm_and_router_is_exact(kind):
    """The MoE input scale folds into the norm and every reader of it (router, experts, shared expert and its gate):
    in float64 the block computes the same function with the same routing (the routers' softmax runs in fp32)."""
    model = tiny_moe(kind).double()
    fam = get_family(model.config)
    layer = model.model.layers[0]
    moe.unfuse_experts_(layer, fam)
    x = torch.randn(40, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = layer.mlp(layer.post_attention_layernorm(x[None]))
        group = next(g for g in active_groups(layer, fam) if g.stats_from)
        s = torch.rand(64, dtype=torch.float64) * 3 + 0.25
        fold_scale(layer, group, s, fam.norm_offset)
        out = layer.mlp(layer.post_attention_layernorm(x[None]))
        assert rel(out, ref) < 1e-6
        layer.get_submodule(fam.moe.block).gate.weight.data /= s  # a router left unscaled routes differently
        assert rel(layer.mlp(layer.post_attention_layernorm(x[None])), ref) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_folding_every_group_keeps_the_model(kind):
    """Random scales folded into every scale group of every layer (attention, latent attention's low-rank norms,
    experts, shared expert, dense MLPs) leave the float64 model's logits as they were: each group's ``prev`` is
    exactly what its linears read. Folding one group's scale into the wrong op changes them."""
    model = tiny_moe(kind).double()
    fam = get_family(model.config)
    x = ids()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in decoder_layers(model, fam):
            moe.unfuse_experts_(layer, fam)  # float64 experts (transformers' grouped product takes 16/32-bit only)
        ref = model(x).logits
        folded = 0
        for layer in decoder_layers(model, fam):
            for g in active_groups(layer, fam):
                k = layer.get_submodule(g.linears[0]).in_features
                fold_scale(layer, g, torch.rand(k, generator=gen, dtype=torch.float64) * 3 + 0.25, fam.norm_offset)
                folded += 1
        assert rel(model(x).logits, ref) < 1e-5  # the routers compute in fp32
        experts = moe.routing(model.config, fam.moe)[0]
        assert folded >= 2 * (experts + 2)  # per layer: the experts' downs, the MoE and attention inputs at least
        layer = decoder_layers(model, fam)[0]
        g = active_groups(layer, fam)[0]
        bad = replace(g, prev=g.prev, linears=g.linears[:1])  # only one of the group's readers scaled
        fold_scale(layer, bad, torch.full((64,), 2.0, dtype=torch.float64), fam.norm_offset)
        assert rel(model(x).logits, ref) > 1e-3


# ------------------------------------------------------------------------------- the 4-bit model vs transformers


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_model_equals_transformers_with_dequantized_weights(kind):
    model = round_dense_(tiny_moe(kind), torch.float16)
    q = quantize_model_rtn(copy.deepcopy(model), GROUP, skip=get_family(model.config).modules_to_not_convert)
    experts = [m for m in q.modules() if isinstance(m, QuickMoEExperts)]
    assert len(experts) == 2 and not any(n.endswith(("gate_up_proj", "down_proj")) for n, _ in q.named_parameters())
    assert experts[0].gate_up.qweight.shape[0] == experts[0].num_experts
    ref = dequantized_reference(model, q)
    x = ids()
    with torch.no_grad():
        out, want = q(x).logits, ref(x).logits
        assert rel(out, want) < MATCH_BOUND
        assert rel(model(x).logits, want) > 10 * MATCH_BOUND  # 4-bit weights differ from the float ones

        # the bound fails for a wrong weight: expert 1's gate|up in place of expert 0's
        bad = copy.deepcopy(ref)
        gu = bad.model.layers[0].mlp.experts.gate_up_proj
        gu[0] = gu[1].clone()
        assert rel(out, bad(x).logits) > 2 * MATCH_BOUND

        # ... and for a wrong routing: every slot sent to the next expert
        e = experts[0].num_experts
        orig = QuickMoEExperts.forward
        try:
            QuickMoEExperts.forward = lambda self, h, i, w: orig(self, h, (i + 1) % e, w)
            shifted = q(x).logits
        finally:
            QuickMoEExperts.forward = orig
        assert rel(shifted, want) > 2 * MATCH_BOUND

        # ... and for routing weights that skip the family's renormalisation
        if kind != "qwen2_moe":
            try:
                QuickMoEExperts.forward = lambda self, h, i, w: orig(self, h, i, w / 2)
                halved = q(x).logits
            finally:
                QuickMoEExperts.forward = orig
            assert rel(halved, want) > 2 * MATCH_BOUND


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
@pytest.mark.parametrize("kind", SOFTMAX_KINDS)
def test_routed_block_is_the_block_forward(kind, quantized):
    """The decode step's MoE call (router linear, route, experts, shared expert) equals transformers' block, on float
    and on 4-bit experts; a routing without the family's renormalisation differs; a block without a router weight is
    declined."""
    model = round_dense_(tiny_moe(kind), torch.float16)
    fam = get_family(model.config)
    if quantized:
        model = quantize_model_rtn(model, GROUP, skip=fam.modules_to_not_convert)
    block = model.model.layers[1].mlp
    routed = moe.RoutedBlock.of(block, fam.moe, model.config)
    assert routed is not None and routed.cast_weights == (kind != "mixtral")
    assert (routed.shared is not None) == (fam.moe.shared_expert is not None)
    assert isinstance(routed.experts, QuickMoEExperts) == quantized
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = block(x[:, None])[:, 0]
        got = routed(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        routed.renormalize = not routed.renormalize
        assert rel(routed(x), want) > 1e-2
    with pytest.raises(ValueError, match=r"\[tokens, hidden\]"):
        routed(x[None])
    bare = copy.deepcopy(block)
    del bare.get_submodule(fam.moe.router).weight
    assert moe.RoutedBlock.of(bare, fam.moe, model.config) is None


@pytest.mark.parametrize("kind", sorted(set(KINDS) - set(SOFTMAX_KINDS)))
def test_own_routing_keeps_the_block_forward(kind):
    """Families whose router is not a plain softmax top-k (sigmoid scores, a correction bias on the choice,
    group-limited top-k, a scaling factor) are never routed by the fused route: the decode step calls their block,
    whose router picks experts and weights that a softmax top-k of the same logits would get wrong."""
    model = round_dense_(tiny_moe(kind), torch.float16)
    fam = get_family(model.config)
    q = quantize_model_rtn(copy.deepcopy(model), GROUP, skip=fam.modules_to_not_convert)
    for m in (model, q):
        assert moe.RoutedBlock.of(m.model.layers[1].mlp, fam.moe, m.config) is None
    block = q.model.layers[1].get_submodule(fam.moe.block)
    seen = {}
    block.get_submodule(fam.moe.experts).register_forward_pre_hook(lambda _m, args: seen.update(ids=args[1], w=args[2]))
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # a trained model's correction bias, wherever the family keeps it (a parameter or a buffer)
        for name, t in itertools.chain(block.named_parameters(), block.named_buffers()):
            if "e_score_correction_bias" in name:
                t.normal_()
        block(x[None])
        logits = torch.nn.functional.linear(x.float(), block.get_submodule(fam.moe.router).weight.float())
    _, k, renorm = moe.routing(q.config, fam.moe)
    w, i = moe.route(logits, k, renorm)
    same_ids = torch.equal(i.sort(-1).values, seen["ids"].sort(-1).values)
    assert not (same_ids and torch.allclose(w.sort(-1).values, seen["w"].float().sort(-1).values, atol=1e-3))


@pytest.mark.parametrize("kind", KINDS)
def test_static_generation_matches_generate(kind):
    """The static-cache generator (``quick generate --fast``; the block's own forward or the routed call) gives
    transformers' greedy tokens on the 4-bit model."""
    model = round_dense_(tiny_moe(kind), torch.float16)
    check_static_generation(quantize_model_rtn(model, GROUP, skip=get_family(model.config).modules_to_not_convert),
                            ids(1, 7, seed=1))  # fmt: skip


def test_routing_facts_in_one_read():
    """Range and repeated experts of a routing, read back together (the kernel path's one host sync)."""
    from quick.nn.moe import routing_facts

    assert routing_facts(torch.tensor([[0, 1, 2], [2, 1, 0]]), 4) == (0, 2, True)
    assert routing_facts(torch.tensor([[0, 4, 4]]), 4) == (0, 4, True)  # dropped slots may repeat
    assert routing_facts(torch.tensor([[0, 1, 2], [3, 1, 3]]), 4) == (0, 3, False)
    assert routing_facts(torch.tensor([[3], [3]]), 4) == (3, 3, True)
    assert routing_facts(torch.tensor([[-1, 7]], dtype=torch.int32), 4) == (-1, 7, True)


def test_route_kernel_limits_are_reported():
    """The route kernel's refusals name the limit (checked before the device, so they hold on any machine)."""
    from quick.kernels import moe as qmoe

    ok = torch.zeros(4, 128, dtype=torch.bfloat16)
    assert "CUDA" in qmoe.route_unavailable(ok, 8, 16, 16 * 40)
    cases = [
        (torch.zeros(4, 128), 8, "fp16 or bf16"),
        (torch.zeros(4, 128, dtype=torch.half)[:, ::2], 8, None),  # stride-2 rows: 64 experts, not contiguous
        (torch.zeros(4, 1025, dtype=torch.half), 8, "experts"),
        (torch.zeros(4, 128, dtype=torch.half), 0, "top_k"),
        (torch.zeros(4, 128, dtype=torch.half), 33, "top_k"),
        (torch.zeros(4, 8, dtype=torch.half), 9, "top_k"),
        (torch.zeros(600, 128, dtype=torch.half), 8, "slots"),
        (torch.zeros(0, 128, dtype=torch.half), 8, "slots"),
        (torch.zeros(4, 128, dtype=torch.half, device="meta").view(-1), 8, "2-D"),
    ]
    for logits, k, what in cases:
        why = qmoe.route_unavailable(logits, k, 16, 16 * 40)
        assert why is not None and (what is None or what in why), (tuple(logits.shape), k, why)
    assert "contiguous" in qmoe.route_unavailable(torch.zeros(4, 128, dtype=torch.half)[:, ::2], 8, 16, 640)
    assert "multiple of block_size" in qmoe.route_unavailable(ok, 8, 16, 17)
    assert "below" in qmoe.route_unavailable(ok, 8, 16, 16)  # a plan of 32 slots over 128 experts needs 512 rows
    assert "CUDA" in qmoe.route_unavailable(ok, 8, 16, 0)  # capacity 0: ids and weights only
    with pytest.raises(qmoe.MoEKernelError, match="CUDA"):
        qmoe.route(ok, 8, True, True, 16, 640)


def test_experts_module_matches_transformers_experts_module():
    """One block's experts, with dropped slots (id = E) and a skewed routing, against transformers' module."""
    model = tiny_moe("qwen3_moe")
    model.config._experts_implementation = "eager"  # the module's own loop: the definition (it skips dropped slots)
    fused = model.model.layers[0].mlp.experts
    q = QuickMoEExperts.from_weights(fused.gate_up_proj.data, fused.down_proj.data, "silu", GROUP, dtype=torch.float16)
    gu, dn = q.dequantized_weights(torch.float32)
    fused.gate_up_proj.data, fused.down_proj.data = gu, dn
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(33, 64, generator=gen).half().float()  # on the fp16 grid: the product inputs are exact
    idx = torch.randint(0, 3, (33, 2), generator=gen)  # experts 3..7 get nothing
    idx[::5, 1] = 8  # dropped slots
    w = torch.rand(33, 2, generator=gen)
    with torch.no_grad():
        want = fused(x, idx, w)
        got = q(x, idx, w)
    assert rel(got, want) < MATCH_BOUND
    assert rel(q(x, idx.flip(-1), w), want) > 2 * MATCH_BOUND


# --------------------------------------------------------------------------------------------------- the plan


def naive_plan(idx: torch.Tensor, e: int, b: int) -> tuple[list[int], list[int]]:
    """sorted_ids / block experts by the definition: per expert its slots in order, padded to a multiple of b."""
    pad = idx.numel()
    sorted_ids, blocks = [], []
    for ex in range(e):
        slots = [s for s, v in enumerate(idx.reshape(-1).tolist()) if v == ex]
        n = -(-len(slots) // b) * b
        sorted_ids += slots + [pad] * (n - len(slots))
        blocks += [ex] * (n // b)
    return sorted_ids, blocks


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_the_sorted_padded_routing(seed):
    gen = torch.Generator().manual_seed(seed)
    e = int(torch.randint(2, 12, (1,), generator=gen))
    t = int(torch.randint(1, 40, (1,), generator=gen))
    k = int(torch.randint(1, min(e, 4) + 1, (1,), generator=gen))
    b = [1, 4, 16][seed % 3]
    # top-k without repeats over a subset of the experts, so that some receive no token
    used = torch.randperm(e, generator=gen)[: max(k, e // 2)]
    idx = torch.stack([used[torch.randperm(len(used), generator=gen)[:k]] for _ in range(t)])
    if seed % 2:
        idx[0, -1] = e  # a dropped slot takes no row
    plan = build_plan(idx, e, b)
    want_ids, want_blocks = naive_plan(idx, e, b)
    assert plan.sorted_ids.tolist() == want_ids
    assert plan.block_experts.tolist() == want_blocks
    assert int(plan.num_padded) == len(want_ids) and plan.pad_id == t * k
    counts = torch.bincount(idx.reshape(-1), minlength=e + 1)[:e]
    assert plan.counts.tolist() == counts.tolist()
    assert (plan.offsets[1:] - plan.offsets[:-1]).tolist() == [-(-int(c) // b) * b for c in counts]
    assert int(plan.offsets[-1]) == int(plan.num_padded)
    assert all(int(c) == 0 for c in counts[[x for x in range(e) if x not in used.tolist()]])

    static = build_plan(idx, e, b, static=True)
    cap = plan_capacity(t, k, e, b)
    assert static.sorted_ids.numel() == cap and cap % b == 0 and cap >= len(want_ids)
    assert static.sorted_ids[: len(want_ids)].tolist() == want_ids
    assert (static.sorted_ids[len(want_ids) :] == t * k).all()
    assert (static.block_experts[len(want_blocks) :] == -1).all()
    # the capacity holds the worst routing: every slot alone in its own block
    worst = torch.arange(t * k).remainder(e).reshape(t, k)
    assert int(build_plan(worst, e, b).num_padded) <= cap


def test_planned_forward_equals_reference_and_needs_a_right_plan():
    torch.manual_seed(0)
    fused = tiny_moe("qwen3_moe").model.layers[0].mlp.experts
    q = QuickMoEExperts.from_weights(fused.gate_up_proj.data, fused.down_proj.data, "silu", GROUP)
    x = torch.randn(21, 64)
    idx = torch.stack([torch.randperm(5)[:2] for _ in range(21)])  # experts 5..7 idle
    idx[3, 0] = 8
    w = torch.rand(21, 2)
    ref = q(x, idx, w)
    for b in (1, 4, 16):
        for static in (False, True):
            plan = q.plan(idx, b, static)
            torch.testing.assert_close(q.forward_planned(x, plan, w), ref, rtol=1e-5, atol=1e-6)
    plan = q.plan(idx, 4)
    wrong = MoEPlan(**{**plan.__dict__, "block_experts": (plan.block_experts + 1) % 8})
    assert rel(q.forward_planned(x, wrong, w), ref) > 0.1


# ------------------------------------------------------------------------------------------- AWQ and fallback


@pytest.mark.parametrize("kind", KINDS)
def test_awq_and_rtn_both_run(kind):
    model = with_outliers(tiny_moe(kind))
    x = ids(2, 20, seed=11)
    with torch.no_grad():
        ref = model(x).logits
    skip = get_family(model.config).modules_to_not_convert
    rtn = quantize_model_rtn(copy.deepcopy(model), GROUP, skip=skip)
    reports: list[awq.LayerReport] = []
    q = awq.quantize_model_awq(
        copy.deepcopy(model), ids(4, 32), GROUP, n_grid=8, progress=False, reports=reports, min_expert_tokens=8
    )
    assert sum(isinstance(m, QuickMoEExperts) for m in q.modules()) == 2
    assert not any(isinstance(m, moe.FloatExperts) for m in q.modules())
    assert len(reports) == 2
    for r in reports:
        assert "mlp.experts.0.gate_proj" in r.tokens and max(r.tokens.values()) == 4 * 32  # the dense linears
        assert all(g["loss"] <= g["rtn_loss"] for g in r.groups.values())
        assert any(name.startswith("mlp.experts.") and name.endswith(".down_proj") for name in r.groups)
    with torch.no_grad():
        err_awq, err_rtn = rel(q(x).logits, ref), rel(rtn(x).logits, ref)
    # measured 0.09-0.12 for both; a broken fold or a wrong expert gives errors of order 1
    assert err_awq < 0.25 and err_rtn < 0.25, (err_awq, err_rtn)


def test_awq_without_packing_keeps_the_float_function():
    model = with_outliers(tiny_moe("qwen2_moe"))
    x = ids(2, 20, seed=11)
    with torch.no_grad():
        ref = model(x).logits
    out = awq.quantize_model_awq(
        copy.deepcopy(model), ids(4, 32), GROUP, n_grid=8, clip=False, quantize_weights=False, progress=False
    )
    assert all(p.dim() == 3 for n, p in out.named_parameters() if "experts" in n)
    norm = out.model.layers[0].post_attention_layernorm.weight
    assert not torch.allclose(norm, model.model.layers[0].post_attention_layernorm.weight)  # scales were folded
    with torch.no_grad():  # scaled, not clipped nor quantized: the same function up to fp16 rounding of the weights
        assert rel(out(x).logits, ref) < 1e-2


def test_experts_without_calibration_tokens_fall_back_to_rtn(caplog):
    """A router that never picks experts 6 and 7: they get no search of their own and are reported."""
    model = tiny_moe("qwen3_moe")
    fam = get_family(model.config)

    def never_6_7(mod, args, out):
        logits = out[0].clone()
        logits[:, 6:] = -torch.inf
        w, i = moe.route(logits, mod.top_k, mod.norm_topk_prob)
        return out[0], w.to(out[1].dtype), i

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_6_7)
    reports: list[awq.LayerReport] = []
    with caplog.at_level(logging.WARNING, logger="quick.algorithms.awq"):
        q = awq.quantize_model_awq(
            copy.deepcopy(model), ids(4, 32), GROUP, n_grid=4, progress=False, reports=reports, min_expert_tokens=1
        )
    for r in reports:
        starved = moe.expert_tokens({n: r.tokens[n] for n in r.rtn_fallback}, fam)
        assert starved == {6: 0, 7: 0}
        assert "mlp.experts.6.down_proj" not in r.groups and "mlp.experts.5.down_proj" in r.groups
        assert {"mlp.experts.6.gate_proj", "mlp.experts.7.up_proj"} <= set(r.rtn_fallback)
    assert "2 experts received fewer than 1 calibration tokens" in caplog.text
    with torch.no_grad():
        assert torch.isfinite(q(ids()).logits).all()

    # a threshold above every expert's count: all experts fall back, the dense linears do not
    reports = []
    awq.quantize_model_awq(
        copy.deepcopy(model), ids(2, 16), GROUP, n_grid=4, progress=False, reports=reports, min_expert_tokens=10**6
    )
    assert all(n.startswith("mlp.experts.") for r in reports for n in r.rtn_fallback)
    assert len(moe.expert_tokens({n: 0 for n in reports[0].rtn_fallback}, fam)) == 8


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    model = tiny_moe(kind)
    q = quantize_model_rtn(copy.deepcopy(model), GROUP, skip=get_family(model.config).modules_to_not_convert)
    out = save_quantized(q, tmp_path / "ckpt")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.mlp.experts.gate_up.qweight"
    assert key in index and "model.layers.0.mlp.gate.weight" in index
    assert not any(k.endswith("gate_up_proj") for k in index)
    with safe_open(str(out / index[key]), "pt") as f:
        assert f.get_tensor(key).shape[0] == q.model.layers[0].mlp.experts.num_experts
    x = ids()
    with torch.no_grad():
        want = q(x).logits
        for layout in (None, "quick_sm90"):
            loaded = load_quantized(out, dtype=torch.float32, layout=layout)
            ex = loaded.model.layers[1].mlp.experts
            assert isinstance(ex, QuickMoEExperts) and ex.layout_name == (layout or "quick")
            assert torch.equal(loaded(x).logits, want)


def test_awq_checkpoint_round_trip(tmp_path):
    model = with_outliers(tiny_moe("mixtral"))
    q = awq.quantize_model_awq(copy.deepcopy(model), ids(2, 32), GROUP, n_grid=4, progress=False, min_expert_tokens=8)
    loaded = load_quantized(save_quantized(q, tmp_path / "c"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, q(ids()).logits)


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    q = quantize_model_rtn(tiny_moe("mixtral"), GROUP)
    # AutoAWQ's format holds experts one linear per expert (tests/test_import_moe.py): none of the stacked tensors
    awq = save_quantized(q, tmp_path / "awq", {**_qc(), "quant_method": "awq", "version": "gemm"})
    awq_keys = json.loads((awq / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in awq_keys
    assert not any(".experts.gate_up." in k or ".experts.down." in k for k in awq_keys)
    out = save_quantized(q, tmp_path / "c")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.experts.down.scales"
    shard = out / index[key]
    tensors = load_file(str(shard))
    tensors[key] = tensors[key][:2].clone()  # two experts of four
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.down\.scales"):
        load_quantized(out, verify=False)
    tensors[key] = torch.full((4, 2, 64), float("nan"), dtype=torch.float16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN"):
        load_quantized(out, verify=False)


def _qc() -> dict:
    return {"bits": 4, "group_size": GROUP, "zero_point": True, "modules_to_not_convert": ["lm_head"]}


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors():
    q = QuickMoEExperts(4, 64, 32, group_size=GROUP)
    x, idx, w = torch.randn(5, 64), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    assert q(x, idx, w).shape == (5, 64)
    assert q(x[None], idx[None], w[None]).shape == (1, 5, 64)
    cases = [
        ((torch.randn(5, 32), idx, w), ValueError, "hidden_states must be"),
        ((x.long(), idx, w), TypeError, "floating point"),
        ((x, idx.float(), w), TypeError, "integer expert ids"),
        ((x, idx, w.long()), TypeError, "top_k_weights must be floating"),
        ((x, idx[:4], w[:4]), ValueError, "does not match"),
        ((x, idx, w[:, :1]), ValueError, "differ"),
        ((x, idx + 2, w), ValueError, "must lie in"),
        ((x, idx - 1, w), ValueError, "must lie in"),
        (([1.0], idx, w), TypeError, "torch.Tensor"),
    ]
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            q(*args)
    q.backend = "kernel"
    with pytest.raises(RuntimeError, match="no grouped 4-bit MoE kernel"):
        q(x, idx, w)
    q.backend = "fastest"
    with pytest.raises(ValueError, match="unknown backend"):
        q(x, idx, w)

    with pytest.raises(ValueError, match="integer tensor"):
        build_plan(idx.reshape(-1), 4)
    with pytest.raises(ValueError, match="integer tensor"):
        build_plan(idx.float(), 4)
    with pytest.raises(ValueError, match="block_size"):
        build_plan(idx, 4, 0)
    with pytest.raises(ValueError, match="must lie in"):
        build_plan(idx + 4, 4)
    with pytest.raises(TypeError):
        build_plan([[0, 1]], 4)

    with pytest.raises(ValueError, match="unsupported expert activation"):
        QuickMoEExperts(4, 64, 32, act="tanh")
    with pytest.raises(ValueError, match="num_experts"):
        QuickExpertStack(0, 64, 64)
    with pytest.raises(ValueError, match="3-D"):
        QuickExpertStack.from_weights(torch.randn(64, 64))
    with pytest.raises(QuantizationError, match="NaN"):
        QuickExpertStack.from_weights(torch.full((2, 64, 64), float("nan")), GROUP)
    with pytest.raises(ValueError, match="differ from expert 0"):
        a = QuickExpertStack.from_weights(torch.randn(1, 64, 64), GROUP)
        b = QuickExpertStack.from_weights(torch.randn(1, 64, 32), GROUP)
        QuickExpertStack.from_quantized([a.unpack(0), b.unpack(0)])
    with pytest.raises(ValueError, match="not one gated MLP"):
        QuickMoEExperts.from_stacks(QuickExpertStack(2, 64, 128, GROUP), QuickExpertStack(3, 64, 64, GROUP))
    with pytest.raises(IndexError):
        q.gate_up.expert(4)


def test_unsupported_models_and_layouts_fail_early():
    model = tiny_moe("qwen3_moe", moe_intermediate_size=48)  # gate|up N = 96: the 'quick' layout needs N % 64
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.mlp\.experts"):
        quantize_model_rtn(model, GROUP)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # nothing converted
    with pytest.raises(FamilyError, match="3-D gate_up_proj"):
        moe.check_fused(torch.nn.ModuleList([torch.nn.Linear(4, 4)]), "old")
    q = quantize_model_rtn(tiny_moe("mixtral"), GROUP)
    with pytest.raises(FamilyError, match="already converted"):
        moe.check_fused(q.model.layers[0].mlp.experts, "x")
    with pytest.raises(ValueError, match="top_k"):
        moe.route(torch.randn(3, 4), 5, True)


@pytest.mark.parametrize("method", ["rtn", "qqq"])
def test_w4a8_refuses_experts_instead_of_leaving_them_16bit(method):
    """W4A8 has no expert stacks: a MoE model is refused with the way out, before any layer changes."""
    from quick.algorithms.qqq import quantize_model_qqq
    from quick.algorithms.rtn import quantize_model_rtn_w4a8

    model = tiny_moe("glm4_moe")
    with pytest.raises(QuantizationError, match=r"does not quantize mixture-of-experts experts .*W4A16"):
        if method == "rtn":
            quantize_model_rtn_w4a8(model, progress=False)
        else:
            quantize_model_qqq(model, ids(2, 16), progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # nothing converted


def test_experts_repack_between_layouts_is_exact():
    """``QuickMoEExperts.repack_``: both stacks into the other layout and back, bit for bit, the same outputs; a layout
    that cannot hold the shapes leaves the module unchanged and says so."""
    q = quantize_model_rtn(tiny_moe("qwen3_moe"), GROUP, skip=("lm_head", "mlp.gate"))
    ex = q.model.layers[0].mlp.experts
    before = {n: t.clone() for n, t in ex.state_dict().items()}
    x = torch.randn(5, 64)
    idx = torch.tensor([[0, 3], [1, 2], [7, 0], [4, 5], [6, 1]])
    w = torch.rand(5, 2)
    want = ex(x, idx, w)
    assert ex.repack_("quick_sm90") and ex.layout_name == "quick_sm90" == ex.down.layout_name
    assert ex.gate_up.qweight.shape == (8, 64 // 64, 8 * 128)
    assert torch.equal(ex(x, idx, w), want)
    assert ex.repack_("quick") and all(torch.equal(t, before[n]) for n, t in ex.state_dict().items())
    narrow = QuickMoEExperts(2, 64, 32, "silu", GROUP)  # down K = 32: quick_sm90 packs K in blocks of 64
    assert not narrow.repack_("quick_sm90") and narrow.layout_name == "quick" == narrow.down.layout_name
