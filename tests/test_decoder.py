"""The few-kernel decode step (quick.models.decoder) against transformers' own decoding, per family (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from helpers import check_static_generation, tiny_causal_lm, tiny_moe

from quick import inference
from quick.inference import StaticGenerator
from quick.kernels import ops
from quick.models import decoder
from quick.models.fuse import fuse_model

transformers = pytest.importorskip("transformers")


def _model(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return tiny_causal_lm(transformers.LlamaConfig, num_attention_heads=4, num_key_value_heads=2)
    if family == "mistral":
        return tiny_causal_lm(transformers.MistralConfig, num_attention_heads=4, num_key_value_heads=1)
    if family == "qwen2":  # q/k/v biases, tied embeddings
        return tiny_causal_lm(
            transformers.Qwen2Config, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
        )
    if family == "qwen3":  # per-head q/k norms, head_dim not hidden / heads
        return tiny_causal_lm(transformers.Qwen3Config, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    if family == "gemma3_text":  # 1 + weight norms, branch norms, scaled embedding, GeGLU, two rotary tables
        return _gemma(sliding_window=32)
    if family == "phi3":  # q|k|v and gate|up as single linears in the checkpoint, partial rotary
        return tiny_causal_lm(
            transformers.Phi3Config,
            num_attention_heads=4,
            num_key_value_heads=2,
            partial_rotary_factor=0.5,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "qwen3_moe":  # q/k norms, 8 experts top-2 (renormalised), every layer sparse
        return tiny_causal_lm(transformers.Qwen3MoeConfig, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                              norm_topk_prob=True)  # fmt: skip
    if family == "mixtral":
        return tiny_causal_lm(transformers.MixtralConfig, num_attention_heads=4, num_key_value_heads=1,
                              num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    if family == "qwen2_moe":  # q/k/v biases, a gated shared expert beside the routed ones
        return tiny_causal_lm(transformers.Qwen2MoeConfig, num_attention_heads=4, num_key_value_heads=2,
                              num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64,
                              shared_expert_intermediate_size=96)  # fmt: skip
    if family == "gemma":  # Gemma 1: 1 + weight norms, GeGLU, scaled embedding, no branch norms
        return tiny_causal_lm(transformers.GemmaConfig, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                              pad_token_id=0, bos_token_id=2, eos_token_id=1)  # fmt: skip
    if family == "seed_oss":  # q/k/v biases
        return tiny_causal_lm(transformers.SeedOssConfig, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if family == "smollm3":  # no rotary in the second layer (NoPE): transformers' layers
        return tiny_causal_lm(transformers.SmolLM3Config, num_attention_heads=4, num_key_value_heads=2,
                              no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if family == "gemma2":  # soft-capping: transformers' layers
        return tiny_causal_lm(transformers.Gemma2Config, num_attention_heads=4, head_dim=16, pad_token_id=0,
                              bos_token_id=2, eos_token_id=1)  # fmt: skip
    if family == "granite":  # residual / attention / embedding multipliers: transformers' layers
        return tiny_causal_lm(transformers.GraniteConfig, num_attention_heads=4, residual_multiplier=0.3,
                              embedding_multiplier=4.0, logits_scaling=2.0)  # fmt: skip
    if family == "qwen3_5":  # a Gated DeltaNet layer and a full-attention one: transformers' layers, hybrid cache
        return tiny_causal_lm(transformers.Qwen3_5TextConfig, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                              layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                              linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)  # fmt: skip
    if family == "minimax_m2":  # q/k norms over the whole projections, partial rotary, sigmoid routing (the block's)
        return tiny_causal_lm(transformers.MiniMaxM2Config, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, rotary_dim=16,
                              eos_token_id=2, pad_token_id=1)  # fmt: skip
    if family == "olmoe":  # q/k norms over the whole projections, softmax top-2 without renormalisation
        return tiny_causal_lm(transformers.OlmoeConfig, num_attention_heads=4, num_key_value_heads=4, num_experts=8,
                              num_experts_per_tok=2, intermediate_size=64, eos_token_id=2, pad_token_id=1)  # fmt: skip
    if family == "glm4_moe":  # partial rotary, q/k/v biases, per-head q/k norms, sigmoid group-limited routing with a
        # scaling factor (the block's own forward), a shared expert, layer 0 dense
        return tiny_causal_lm(transformers.Glm4MoeConfig, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, n_group=2,
                              topk_group=1, first_k_dense_replace=1, attention_bias=True, use_qk_norm=True,
                              routed_scaling_factor=1.5)  # fmt: skip
    raise KeyError(family)


def _gemma(sliding_window: int):
    return tiny_causal_lm(
        transformers.Gemma3TextConfig,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        rope_local_base_freq=100.0,
    )


def _randomise_norms(model) -> None:
    """Norm weights are all ones at init: random ones make a wrong norm (or a skipped one) visible."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))


DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gemma", "seed_oss"]
FAMILIES = [*DENSE, "qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "glm4_moe", "minimax_m2"]


def _teacher_forced(model, steps: int, tol: float) -> tuple[StaticGenerator, StaticGenerator]:
    """transformers' decoding and the fast step over 2 x 5 random prompt tokens, then ``steps`` steps fed
    transformers' tokens: the logits agree within ``tol`` at every step. Returns (reference, fast)."""
    ids = torch.randint(0, 256, (2, 5))
    ref, fast = StaticGenerator(model, 2, 16), StaticGenerator(model, 2, 16, compile="fast")
    with torch.inference_mode():
        fast.prefill(ids)
        nxt = ref.prefill(ids).argmax(-1)
        for i in range(steps):
            a, b = fast.decode_step(nxt, 5 + i).clone(), ref.decode_step(nxt, 5 + i)
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
            nxt = b.argmax(-1)
    return ref, fast


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    """Dynamo traces the three functions (fullgraph: a break fails); inductor's build is the slow test below."""
    monkeypatch.setattr(inference, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_decode_logits_match_transformers(family, fused):
    """Teacher-forced on the same tokens, every decode step's logits equal transformers' (fp32: rounding only),
    and greedy generation gives the tokens of transformers' forward over the same static cache (which
    test_inference checks against ``model.generate``; compared directly, a near-tie of the random model can
    flip between the static and the dynamic cache's rounding)."""
    model = _model(family)
    _randomise_norms(model)
    if fused:  # Phi-3's checkpoint is fused already: nothing to fuse; MoE blocks: q/k/v only (GLM: layer 0 dense)
        per_layer = 0 if family == "phi3" else 2 if family in DENSE else 1
        want = per_layer * model.config.num_hidden_layers + (family == "glm4_moe")
        assert fuse_model(model) == want
    ids = torch.randint(0, 256, (3, 6))
    ref = StaticGenerator(model, 3, 24)
    fast = StaticGenerator(model, 3, 24, compile="fast")
    with torch.inference_mode():
        a, b = fast.prefill(ids), ref.prefill(ids)
        torch.testing.assert_close(a, b)
        nxt = b.argmax(-1)
        for i in range(10):
            a, b = fast.decode_step(nxt, 6 + i).clone(), ref.decode_step(nxt, 6 + i)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            nxt = b.argmax(-1)
    assert fast._fast is not None  # the fast step ran, not transformers' forward
    assert torch.equal(fast.generate(ids, 8)[0], ref.generate(ids, 8)[0])


@pytest.mark.parametrize("family", ["gemma2", "granite", "qwen3_5", "smollm3"])
def test_static_generation_without_the_fast_step(family):
    """Families the few-kernel step does not implement decode through transformers' layers on the static cache
    (``quick generate --fast``): transformers' greedy tokens."""
    model = _model(family)
    with pytest.raises(decoder.UnsupportedModel):
        decoder.check_supported(model)
    check_static_generation(model, torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(1)))


def test_fast_decode_writes_the_cache_like_transformers():
    """After the same steps, both caches hold the same keys and values (the rotary and the slot are right),
    and transformers' token counters agree (a later transformers forward would write at the right slot)."""
    model = _model("qwen3")
    _randomise_norms(model)
    ids = torch.randint(0, 256, (2, 5))
    gens = [StaticGenerator(model, 2, 16), StaticGenerator(model, 2, 16, compile="fast")]
    for g in gens:
        g.generate(ids, 6)
    for la, lb in zip(gens[0].cache.layers, gens[1].cache.layers, strict=True):
        torch.testing.assert_close(lb.keys, la.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lb.values, la.values, rtol=1e-5, atol=1e-6)
        assert int(lb.cumulative_length) == int(la.cumulative_length) == 5 + 5
        assert la.keys[:, :, 10:].abs().sum() == 0  # nothing beyond the last step


@pytest.mark.parametrize("mode", ["none", "fast"])
def test_generate_twice_on_one_generator(mode):
    """A second generate() with another prompt gives what a fresh generator gives (the cache restarts)."""
    model = _model("llama")
    a, b = torch.randint(0, 256, (2, 7)), torch.randint(0, 256, (2, 7))
    gen = StaticGenerator(model, 2, 32, compile=mode)
    gen.generate(a, 8)
    assert torch.equal(gen.generate(b, 8)[0], StaticGenerator(model, 2, 32, compile=mode).generate(b, 8)[0])


def test_fast_decode_builds_once_for_every_layer():
    """The three functions take the layer's tensors as arguments: one graph each serves every layer (a
    4-layer model builds no more graphs than a 2-layer one)."""
    counts = []
    for layers in (2, 4):
        torch._dynamo.reset()
        decoder._COMPILED.clear()
        torch.manual_seed(0)
        model = tiny_causal_lm(transformers.LlamaConfig, num_hidden_layers=layers, num_attention_heads=4)
        fuse_model(model)
        torch._dynamo.utils.counters.clear()
        gen = StaticGenerator(model, 2, 16, compile="fast")
        gen.prefill(torch.randint(0, 256, (2, 4)))
        for layer in gen.cache.layers:  # as older torch releases mark them (guard on the address)
            torch._dynamo.mark_static_address(layer.keys, guard=True)
            torch._dynamo.mark_static_address(layer.values, guard=True)
        gen.generate(torch.randint(0, 256, (2, 4)), 4)
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        assert not torch._dynamo.utils.counters["graph_break"]
    decoder._COMPILED.clear()
    assert 3 <= counts[0] == counts[1]


def test_unsupported_models_are_refused_with_a_reason():
    gelu = tiny_causal_lm(transformers.LlamaConfig, num_attention_heads=4, hidden_act="gelu")
    with pytest.raises(decoder.UnsupportedModel, match="activation 'gelu'"):
        decoder.check_supported(gelu)
    windowed = tiny_causal_lm(transformers.MistralConfig, num_attention_heads=4, sliding_window=8)
    decoder.check_supported(windowed, 8)  # the window covers the generation: a plain static cache
    with pytest.raises(decoder.UnsupportedModel, match="sliding window 8 < 16"):
        StaticGenerator(windowed, 1, 16, compile="fast")
    with pytest.raises(decoder.UnsupportedModel, match="sliding window 8 < 16"):
        StaticGenerator(_gemma(sliding_window=8), 1, 16, compile="fast")
    extra = _model("llama")
    extra.model.layers[1].extra_layernorm = torch.nn.LayerNorm(64)  # a norm the family data does not place
    with pytest.raises(decoder.UnsupportedModel, match="extra_layernorm"):
        decoder.check_supported(extra)
    for family, key, value in (("gemma3_text", "final_logit_softcapping", 30.0), ("olmoe", "clip_qkv", 8.0)):
        model = _model(family)
        setattr(model.config, key, value)
        with pytest.raises(decoder.UnsupportedModel, match=key):
            decoder.check_supported(model)
    # families whose layers the step does not implement keep transformers' decoding (soft-capping, multipliers,
    # latent attention, linear attention)
    for model in (_model("gemma2"), _model("granite"), tiny_moe("deepseek_v3"), tiny_moe("qwen3_5_moe")):
        with pytest.raises(decoder.UnsupportedModel, match="has no fast decode step"):
            decoder.check_supported(model)


def test_decoder_needs_a_prefilled_cache():
    model = _model("llama")
    gen = StaticGenerator(model, 1, 16)
    with pytest.raises(RuntimeError, match="run the prefill"):
        decoder.FastDecoder(model, gen.cache, 16, backend=None)


@pytest.mark.slow
def test_fast_decode_inductor_same_tokens(monkeypatch):
    """Inductor-built (what the GPU runs; CPU build here: slow) fast step gives transformers' greedy tokens."""
    monkeypatch.setattr(inference, "COMPILE_BACKEND", "inductor")
    torch._dynamo.reset()
    decoder._COMPILED.clear()
    model = _model("gemma3_text")
    _randomise_norms(model)
    fuse_model(model)
    ids = torch.randint(0, 256, (2, 5))
    want = StaticGenerator(model, 2, 16).generate(ids, 8)[0]
    assert torch.equal(StaticGenerator(model, 2, 16, compile="fast").generate(ids, 8)[0], want)
    decoder._COMPILED.clear()


def test_static_generation_helpers():
    """Which decode path a GPU gets, EOS ids from tokenizer and config, and the cut after the first stop token."""
    from quick.generation import describe_decode, eos_ids, fast_step_unavailable, static_compile_mode, static_generate

    llama = _model("llama")
    cuda = torch.device("cuda")
    assert static_compile_mode(llama, 64, cuda) == "fast"
    assert static_compile_mode(_gemma(sliding_window=32), 64, cuda) == "regions"  # window < generation
    assert static_compile_mode(llama, 64, torch.device("cpu")) == "none"
    # what the CLI tells the user, with the reason where the few-kernel step does not apply
    assert describe_decode(llama, 64, cuda) == "decode: the few-kernel step in a CUDA graph"
    windowed = _gemma(sliding_window=32)
    why = fast_step_unavailable(windowed, 64)
    assert why is not None and "32 < 64" in why
    assert describe_decode(windowed, 64, cuda).endswith(f"(no few-kernel step: {why})")
    assert "'deepseek' has no fast decode step" in describe_decode(tiny_moe("deepseek_v3"), 64, cuda)
    assert describe_decode(llama, 64, torch.device("cpu")) == "decode: transformers' layers, eager (CPU)"

    class Tok:
        eos_token_id = 5

    llama.generation_config.eos_token_id = [7, 9]
    assert eos_ids(llama, Tok()) == {5, 7, 9}
    ids = torch.randint(0, 256, (1, 6))
    full, stats = static_generate(llama, ids, 10)
    assert full.shape == (1, 10) and stats.decode_tok_s > 0
    stop = {int(full[0, 3])}
    first = next(i for i, t in enumerate(full[0].tolist()) if t in stop)
    cut, _ = static_generate(llama, ids, 10, stop, warmup=True)
    assert torch.equal(cut, full[:, : first + 1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        static_generate(llama, ids, 0)
    with pytest.raises(ValueError, match="input_ids"):
        static_generate(llama, ids[0], 4)
    with pytest.raises(TypeError, match="token ids"):
        static_generate(llama, ids.float(), 4)
    with pytest.raises(ValueError, match="on meta, the model on cpu"):
        static_generate(llama, ids.to("meta"), 4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_fast_decode_bf16_rounds_like_transformers(family):
    """In bf16 the norms' cast order matters (llama: cast, then times the weight; Gemma: times 1 + weight in fp32,
    then cast): with the eager backend the step does transformers' operations, so the logits agree to a few
    bf16 roundings, far closer than the other cast order would give."""
    model = _model(family)
    _randomise_norms(model)
    model.to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 6))
    ref, fast = StaticGenerator(model, 2, 16), StaticGenerator(model, 2, 16, compile="fast")
    worst = 0.0
    with torch.inference_mode():
        fast.prefill(ids)
        nxt = ref.prefill(ids).argmax(-1)
        for i in range(6):
            a, b = fast.decode_step(nxt, 6 + i).float(), ref.decode_step(nxt, 6 + i).float()
            worst = max(worst, ((a - b).norm() / b.norm()).item())
            nxt = b.argmax(-1)
    assert worst < 1e-3, worst


@pytest.mark.parametrize("fmt", ["w4a16", "w4a8"])
def test_fast_decode_on_quantized_layers(fmt):
    """The packed layers (QuickLinear, fused or not, and QuickLinearW4A8; CPU reference paths here) run inside
    the fast step as they do in transformers' layers: the same logits at every step."""
    from quick.algorithms.rtn import quantize_model_rtn, quantize_model_rtn_w4a8
    from quick.nn.dtypes import set_compute_dtype

    model = tiny_causal_lm(transformers.LlamaConfig, num_attention_heads=4, num_key_value_heads=2, hidden_size=128)
    _randomise_norms(model)
    if fmt == "w4a16":
        quantize_model_rtn(model, 64, "quick", dtype=torch.float16, progress=False)
        set_compute_dtype(model, torch.float32)
        fuse_model(model)
    else:
        quantize_model_rtn_w4a8(model, 128, dtype=torch.float16, progress=False)
        set_compute_dtype(model, torch.float32)
    _teacher_forced(model, steps=6, tol=1e-4)


def test_fast_decode_fused_projection_route(monkeypatch):
    """The fast step's fused-kernel route (QuickLinear.fuses true: the down projection stages act(gate) * up, the o
    and down projections end with the residual add + RMSNorm of the next block, the last one with the final norm),
    on CPU with the two ops' kernels replaced by the steps they stand for: every projection takes the route, and the
    logits are those of the unfused step."""
    from quick.algorithms.rtn import quantize_model_rtn
    from quick.formats.layouts import get_layout
    from quick.kernels import decode
    from quick.nn.linear import QuickLinear

    model = tiny_causal_lm(transformers.LlamaConfig, num_attention_heads=4, num_key_value_heads=2, hidden_size=128)
    _randomise_norms(model)
    model = model.to(torch.bfloat16)
    quantize_model_rtn(model, 64, "quick_sm90", dtype=torch.bfloat16, progress=False)
    fuse_model(model)
    ids = torch.randint(0, 256, (2, 5))

    def logits(gen):
        out = []
        with torch.inference_mode():
            nxt = gen.prefill(ids).argmax(-1)
            for i in range(4):
                out.append(gen.decode_step(nxt, 5 + i).clone().float())
                nxt = out[-1].argmax(-1)
        return out

    plain = logits(StaticGenerator(model, 2, 16, compile="fast"))
    calls = {"norm": 0, "act": 0}

    def product(x, p, g, bias):
        k, n = x.shape[1], p[1].shape[1]
        w = get_layout("quick_sm90").unpack(dict(zip(("qweight", "scales", "zeros"), p, strict=True)), k, n, g)
        h = x @ w.dequantize(x.dtype)
        return h if bias is None else h + bias

    def add_norm(x, qweight, scales, zeros, g, bias, residual, weight, eps, offset=0.0, act=""):
        calls["norm"] += 1
        calls["act"] += bool(act)
        k = x.shape[1] // 2 if act else x.shape[1]
        h = product(decode.gated(x[:, :k], x[:, k:], act) if act else x, (qweight, scales, zeros), g, bias)
        r = residual + h
        return decode.rms_norm(r, weight, eps, offset), r

    monkeypatch.setattr(ops, "gemm_add_norm", add_norm)
    monkeypatch.setattr(QuickLinear, "fuses", lambda self, m, device, dtype, act="", norm=False: bool(act or norm))
    fused = logits(StaticGenerator(model, 2, 16, compile="fast"))
    layers = model.config.num_hidden_layers
    assert calls == {"norm": 4 * 2 * layers, "act": 4 * layers}  # o and down per layer and step; act on the down
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_fast_decode_rope_attention_route(monkeypatch, fused):
    """The fast step's one-op attention (rotary + cache append + attention: quick::attn_decode_rope, the CUDA
    kernel's route) forced on CPU, where the op runs its torch reference: every layer takes it, the logits match
    transformers' and the caches hold what transformers writes."""
    from quick.kernels import attention

    torch.manual_seed(0)
    kw = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64)  # a head dim the kernel takes
    model = tiny_causal_lm(transformers.LlamaConfig, **kw).to(torch.bfloat16)
    _randomise_norms(model)
    if fused:  # q/k/v as strided views of one product
        fuse_model(model)
    seen = []
    real = attention._rope_reference
    monkeypatch.setattr(attention, "_rope_reference", lambda *a: seen.append(a[0].stride()) or real(*a))

    class Forced(decoder.FastDecoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.attn_rope = True

    monkeypatch.setattr(decoder, "FastDecoder", Forced)
    ref, fast = _teacher_forced(model, steps=5, tol=3e-2)
    assert len(seen) == 5 * model.config.num_hidden_layers
    assert seen[0] == ((4 + 2 * 2) * 64 if fused else 4 * 64, 1)  # q: a view of the fused product, or its own rows
    for la, lb in zip(ref.cache.layers, fast.cache.layers, strict=True):
        torch.testing.assert_close(lb.keys.float(), la.keys.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lb.values.float(), la.values.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("group", [-1, 128], ids=["per_channel", "g128"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_fast_decode_w4a8(family, group, fused, monkeypatch):
    """W4A8 layers (fused q/k/v and gate/up or not) run in the fast step as plain ``layer(x)`` calls: each o / down
    projection is asked whether the W4A16 kernels' epilogues apply (it says no, and is never handed them); the
    teacher-forced logits equal transformers' decoding at every step and greedy generation gives its tokens."""
    from quick.algorithms.rtn import quantize_model_rtn_w4a8
    from quick.models.fuse import FusedProjection
    from quick.nn.linear_w4a8 import QuickLinearW4A8

    torch.set_num_threads(1)
    model = _model(family)
    _randomise_norms(model)
    quantize_model_rtn_w4a8(model, group, dtype=torch.float16, progress=False)
    layers = model.config.num_hidden_layers
    if fused:
        assert fuse_model(model) == 2 * layers
    asked = []
    real = QuickLinearW4A8.fuses
    monkeypatch.setattr(QuickLinearW4A8, "fuses", lambda self, *a, **kw: asked.append(a) or real(self, *a, **kw))
    ref, fast = _teacher_forced(model, steps=5, tol=1e-4)
    step = fast._fast.layers[0]
    assert isinstance(step.qkv, FusedProjection) == fused
    assert isinstance(step.o, QuickLinearW4A8) and isinstance(step.down, QuickLinearW4A8)
    # asked where a W4A16 layer would be: o and down for the add + norm (not with Gemma's branch norms), down for
    # the gate when gate/up is one fused product; at each of the 5 steps
    assert (step.add_norm, step.gated_down) == (family != "gemma3_text", fused)
    assert len(asked) == 5 * layers * (2 * step.add_norm + step.gated_down)
    ids = torch.randint(0, 256, (2, 6))
    assert torch.equal(fast.generate(ids, 6)[0], ref.generate(ids, 6)[0])


@pytest.mark.parametrize("branch", [False, True], ids=["plain", "branch_norm"])
def test_add_rms_norm_sums_slot_rows_in_fp32_first(branch):
    """A mixture-of-experts block's slot rows [T, k, H] enter the add + norm summed in fp32 and rounded once: the
    same as passing their sum; a plain 16-bit sum (rounded after every add) is not what is computed."""
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(3, 8, 64, generator=gen) * 4).bfloat16()
    residual = torch.randn(3, 64, generator=gen).bfloat16()
    weight = torch.rand(64, generator=gen).bfloat16() + 0.5
    bw = torch.rand(64, generator=gen).bfloat16() if branch else None
    summed = rows.float().sum(1).bfloat16()
    got = decoder.add_rms_norm(rows, residual, weight, 1e-6, 0.0, bw)
    want = decoder.add_rms_norm(summed, residual, weight, 1e-6, 0.0, bw)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    naive = rows[:, 0]
    for j in range(1, 8):
        naive = naive + rows[:, j]
    assert not torch.equal(naive, summed)  # the test input tells the two sums apart
