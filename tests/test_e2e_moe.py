"""The end-to-end benchmark's mixture-of-experts builds: tiny random configs derived from the published Qwen3-30B-A3B
and Mixtral-8x7B ones, built from the meta device (4-bit experts with random packed stacks, or transformers' experts
running its grouped-GEMM implementation), against transformers' own model holding the same (dequantized) weights; the
memory estimate against the build; the runner's rows and files on CPU; CUDA-graph decoding on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import have_nvcc
from transformers import AutoModelForCausalLM

from quick.models import synthetic
from quick.models import synthetic_moe as sm
from quick.nn.linear import QuickLinear
from quick.nn.moe import QuickMoEExperts

SHAPES = ("qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b", "glm-4.5-air")
SOFTMAX_SHAPES = SHAPES[:3]  # routed by the fused route kernel (GLM-4.5 keeps transformers' router: MoESpec.routing)
# Logits of the fp16 4-bit build against transformers' fp32 model with its dequantized weights: they differ by the
# half-precision activations of the build (measured 0.7-1.1e-3); experts swapped for their neighbours give 0.18.
QUICK_BOUND = 1e-2
# The 16-bit build in fp32 runs transformers' grouped-GEMM experts, the reference its eager loop: summation order only.
FP32_BOUND = 1e-5
# The bf16 build (the benchmark's baseline) against the fp32 reference: bf16 activations (measured 6e-3).
BF16_BOUND = 3e-2
LOAD_CONFIG = synthetic.load_config


def tiny_config(name: str):
    """The published config of ``name`` shrunk: hidden 128, 2 layers, vocab 256, 4 heads (2 KV heads), top-2 of 8
    experts (Mixtral: 4) with intermediate 64; family, activation, routing, norms and dense first layers (GLM-4.5's
    layer 0) stay the published ones."""
    cfg = LOAD_CONFIG(name)
    over = dict(
        hidden_size=128,
        num_hidden_layers=2,
        vocab_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_experts_per_tok=2,
    )
    if cfg.model_type == "qwen3_moe":
        over.update(num_experts=8, moe_intermediate_size=64, intermediate_size=128, head_dim=32)
    elif cfg.model_type == "olmoe":
        over.update(num_experts=8, intermediate_size=64, eos_token_id=2, pad_token_id=1)
    elif cfg.model_type == "glm4_moe":
        over.update(n_routed_experts=8, moe_intermediate_size=64, intermediate_size=128, head_dim=32, eos_token_id=2,
                    pad_token_id=1)  # fmt: skip
    else:
        over.update(num_local_experts=4, intermediate_size=64)
    for key, value in over.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(synthetic, "load_config", tiny_config)
    torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than the math


def skip_without_grouped_kernel(layout: str) -> None:
    """Skip unless this GPU runs the grouped 4-bit kernels of ``layout`` (``quick_sm90``: Hopper's)."""
    if torch.cuda.get_device_capability()[0] < 8 or not have_nvcc():
        pytest.skip("the grouped 4-bit kernels need an sm_80+ GPU and nvcc")
    if layout == "quick_sm90" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the quick_sm90 experts' kernels need an sm_90 GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def reference(name: str, built: torch.nn.Module) -> torch.nn.Module:
    """transformers' own fp32 model (eager experts loop) holding ``built``'s weights, dequantized where packed."""
    ref = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32, attn_implementation="sdpa").eval()
    ref.set_experts_implementation("eager")
    state = ref.state_dict()
    with torch.no_grad():
        for key, t in built.state_dict().items():
            if key in state and state[key].shape == t.shape and t.is_floating_point():
                state[key].copy_(t)
        for mod_name, mod in built.named_modules():
            if isinstance(mod, QuickLinear):
                ref.get_submodule(mod_name).weight.copy_(mod.dequantized_weight(torch.float32))
            elif isinstance(mod, QuickMoEExperts):
                gu, dn = mod.dequantized_weights(torch.float32)
                ref.get_submodule(mod_name).gate_up_proj.copy_(gu)
                ref.get_submodule(mod_name).down_proj.copy_(dn)
    return ref


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def wrong_experts(ref: torch.nn.Module) -> torch.nn.Module:
    """``ref`` with every token's experts swapped for their neighbours' (gate|up of expert e in place of e + 1)."""
    bad = copy.deepcopy(ref)
    for layer in bad.model.layers:
        if hasattr(layer.mlp, "experts"):  # not a dense layer
            layer.mlp.experts.gate_up_proj.data = layer.mlp.experts.gate_up_proj.data.roll(1, 0)
    return bad


def moe_layers(name: str) -> int:
    """How many of the tiny build's 2 layers are sparse (GLM-4.5's first layer is dense)."""
    return 2 - min(2, getattr(tiny_config(name), "first_k_dense_replace", 0))


@pytest.mark.parametrize("name", SHAPES)
def test_4bit_build_equals_transformers_with_dequantized_weights(name, tiny):
    model = sm.build_random_moe(name, torch.float16, "cpu", quantized=True)
    experts = [m for m in model.modules() if isinstance(m, QuickMoEExperts)]
    assert len(experts) == moe_layers(name) and experts[0].layout_name == sm.EXPERTS_LAYOUT
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    ref = reference(name, model)
    x = ids()
    with torch.no_grad():
        out = model(x).logits
        assert rel(out, ref(x).logits) < QUICK_BOUND
        assert rel(out, wrong_experts(ref)(x).logits) > 5 * QUICK_BOUND


@pytest.mark.parametrize("name", SHAPES)
def test_16bit_build_equals_transformers(name, tiny):
    model = sm.build_random_moe(name, torch.float32, "cpu")
    assert model.config._experts_implementation == sm.GROUPED_IMPL
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    fresh = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(128))
    down = model.model.layers[1].mlp.experts.down_proj.detach()
    assert 0.01 < float(down.std()) < 0.03  # initialised, not empty memory
    ref = reference(name, model)
    x = ids()
    with torch.no_grad():
        out = model(x).logits
        assert rel(out, ref(x).logits) < FP32_BOUND
        assert rel(out, wrong_experts(ref)(x).logits) > 1e3 * FP32_BOUND  # 0.05-0.09 for OLMoE / GLM
        bf16 = sm.build_random_moe(name, torch.bfloat16, "cpu")
        assert rel(bf16(x).logits, reference(name, bf16)(x).logits) < BF16_BOUND


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "quick"])
@pytest.mark.parametrize("name", SHAPES)
def test_weight_bytes_are_the_built_bytes(name, quantized, tiny):
    fixed, per_layer = sm.weight_bytes(name, torch.bfloat16, quantized)
    model = sm.build_random_moe(name, torch.bfloat16, "cpu", quantized)
    built = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert len(per_layer) == 2 and fixed + sum(per_layer) == built


def test_published_sizes_and_the_layers_that_fit(monkeypatch, capsys):
    """From the published shapes (meta builds only): Qwen3-30B-A3B is ~60 GB in bf16 and ~17 GB 4-bit; Mixtral-8x7B
    in bf16 does not fit an 80 GB GPU, so every impl of it runs with the layers the bf16 build fits."""
    from quick.bench import e2e

    fixed, per_layer = sm.weight_bytes("qwen3-30b-a3b", torch.bfloat16)
    assert len(per_layer) == 48 and 58e9 < fixed + sum(per_layer) < 63e9
    fixed4, per_layer4 = sm.weight_bytes("qwen3-30b-a3b", torch.bfloat16, quantized=True)
    assert 15e9 < fixed4 + sum(per_layer4) < 19e9
    assert sm.layers_that_fit(10, [5, 5, 5], 1, 22) == 2 and sm.layers_that_fit(10, [5], 0, 9) == 0
    # OLMoE-1B-7B: 6.9B parameters; GLM-4.5-Air: 106B (its next-token prediction layer is not built), 4-bit fits
    for name, layers, lo, hi in (("olmoe-1b-7b", 16, 13.5e9, 14.2e9), ("glm-4.5-air", 46, 210e9, 217e9)):
        fixed, per_layer = sm.weight_bytes(name, torch.bfloat16)
        assert len(per_layer) == layers and lo < fixed + sum(per_layer) < hi
    fixed4, per_layer4 = sm.weight_bytes("glm-4.5-air", torch.bfloat16, quantized=True)
    assert 55e9 < fixed4 + sum(per_layer4) < 62e9 and per_layer4[0] < per_layer4[1] / 5  # layer 0 is dense

    monkeypatch.setattr(e2e, "DEVICE", "cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (79 * 10**9, 80 * 10**9))
    assert e2e.moe_layers_to_run("mixtral-8x7b", "quick", None, 64, 256, 128) is None
    n = e2e.moe_layers_to_run("mixtral-8x7b", "bf16", None, 64, 256, 128)
    assert 10 < n < 32 and f"running {n} of 32 layers" in capsys.readouterr().out
    assert e2e.moe_layers("mixtral-8x7b", ["bf16", "quick", "fp16"], None, 64, 256, 128) == n
    assert e2e.moe_layers("mixtral-8x7b", ["quick"], 4, 64, 256, 128) == 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (10**9, 80 * 10**9))
    with pytest.raises(MemoryError, match="not even one layer"):
        e2e.moe_layers_to_run("qwen3-30b-a3b", "bf16", None, 64, 256, 128)


def test_e2e_rows_and_files_for_moe_shapes(tiny, monkeypatch, tmp_path):
    """The runner on CPU: both MoE shapes, the bf16 baseline and the 4-bit impl; ``fast`` runs as ``graph``, ``fp16``
    is refused with a message (no row), rows carry ``moe`` and ``layers``, files are named ``e2e-moe-...``."""
    from quick.bench import e2e

    monkeypatch.setattr(e2e, "DEVICE", "cpu")
    torch._dynamo.reset()
    shapes = SHAPES[:2]
    rows, cases = e2e.run(list(shapes), [1, 2], ["bf16", "quick", "fp16"], 6, 4, None, ["fast+fused"])
    assert [(r["model"], r["impl"], r["batch"]) for r in rows] == [
        (m, i, b) for m in shapes for i in ("bf16", "quick") for b in (1, 2)
    ]
    keys = {"model", "impl", "batch", "prefill_tok_s", "decode_tok_s", "peak_mem_GB", "moe", "layers"}
    for r in rows:
        assert set(r) == keys and r["moe"] is True and r["layers"] == 2
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_mem_GB"] is None
    assert {c["variant"] for c in cases} == {"fast+fused"}  # the few-kernel step, the block called in place of the MLP
    assert all(c["fused_projections"] == 2 for c in cases)  # q|k|v of both layers; the experts stay as they are

    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.x", "cuda": "13.0", "date": "2026-12-08"}
    stem = e2e.write_results(rows, env, tmp_path, 6, 4, ["fast+fused"], cases)
    assert stem.name == "e2e-moe-h100-2026-12-08"
    table = stem.with_suffix(".md").read_text()
    assert "decode vs bf16" in table and "| qwen3-30b-a3b (2 layers) | 1 | quick | fast+fused |" in table
    assert "1.00x" in table and stem.with_suffix(".png").exists() and stem.with_suffix(".json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", [None, "quick", "quick_sm90"], ids=["bf16", "quick", "quick_sm90"])
@pytest.mark.parametrize("name", SHAPES)
def test_cuda_graph_decode_gives_the_eager_tokens(name, layout, tiny):
    """A tiny MoE build on the GPU decoded through ``StaticGenerator`` with CUDA graphs (prefill and decode step
    captured) gives the tokens of eager decoding; the 4-bit one runs the grouped kernel, the bf16 one torch's
    grouped GEMM, neither reading back to the host during capture."""
    from quick.inference import StaticGenerator

    quantized = layout is not None
    if quantized:
        skip_without_grouped_kernel(layout)
    model = sm.build_random_moe(name, torch.bfloat16, "cuda", quantized, layout=layout or "quick")
    if quantized:
        x = torch.randn(3, 128, device="cuda", dtype=torch.bfloat16)
        assert model.model.layers[-1].mlp.experts.kernel_unavailable(x, 2) is None
    prompt = torch.randint(0, 256, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    eager, _ = StaticGenerator(model, 2, 24, use_graph=False).generate(prompt, 12)
    graphed, _ = StaticGenerator(model, 2, 24, use_graph=True, graph_prefill=True).generate(prompt, 12)
    assert torch.equal(eager, graphed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", [None, "quick", "quick_sm90"], ids=["16bit", "quick", "quick_sm90"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", SOFTMAX_SHAPES)
def test_routed_block_runs_the_route_kernel_and_equals_the_block(name, dtype, layout, tiny):
    """The decode step's MoE call on the GPU (route kernel, then the grouped kernels on its plan, or the 16-bit experts
    module) against the block's own forward (PyTorch routing, plan kernel, the same experts) for 1-64 tokens."""
    from quick.models.families import get_family
    from quick.models.moe import RoutedBlock

    quantized = layout is not None
    skip_without_grouped_kernel(layout or "quick")  # the route kernel too
    model = sm.build_random_moe(name, dtype, "cuda", quantized, layout=layout or "quick")
    fam = get_family(model.config)
    for layer in model.model.layers:
        routed = RoutedBlock.of(layer.mlp, fam.moe, model.config)
        assert routed is not None
        for t in (1, 5, 64):
            x = torch.randn(t, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(t)).to(dtype)
            shape = routed.kernel_takes(x, torch.nn.functional.linear(x, routed.router_weight))
            assert shape is not None and shape[0] == quantized  # 4-bit experts take the route kernel's plan
            with torch.inference_mode():
                got, want = routed(x), layer.mlp(x[:, None])[:, 0]
            assert got.dtype == dtype and torch.isfinite(got).all()
            assert rel(got, want) < 1e-2, f"{t} tokens: {rel(got, want):.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", [None, "quick", "quick_sm90"], ids=["bf16", "quick", "quick_sm90"])
@pytest.mark.parametrize("name", SHAPES)
def test_fast_decode_step_logits_match_transformers_on_gpu(name, layout, tiny, monkeypatch):
    """The benchmark's fast step on the GPU (fused attention steps, the MoE block on the one-launch plan and the
    decode kernels over experts, CUDA graph) teacher-forced beside transformers' forward over the same static cache:
    every step's logits within the bf16 bound."""
    from quick import inference
    from quick.inference import StaticGenerator

    quantized = layout is not None
    if quantized:
        skip_without_grouped_kernel(layout)
    monkeypatch.setattr(inference, "COMPILE_BACKEND", "eager")  # dynamo traces the step's parts; no inductor build
    torch._dynamo.reset()
    model = sm.build_random_moe(name, torch.bfloat16, "cuda", quantized, layout=layout or "quick")
    prompt = torch.randint(0, 256, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ref = StaticGenerator(model, 2, 24, use_graph=False)
    fast = StaticGenerator(model, 2, 24, use_graph=True, compile="fast")
    with torch.inference_mode():
        fast.prefill(prompt)
        nxt = ref.prefill(prompt).argmax(-1)
        for i in range(8):
            a, b = fast.decode_step(nxt, 8 + i).clone(), ref.decode_step(nxt, 8 + i)
            assert torch.isfinite(a).all()
            assert rel(a, b) < BF16_BOUND, f"step {i}: {rel(a, b):.3e}"
            nxt = b.argmax(-1)
    assert fast._fast is not None
