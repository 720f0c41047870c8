"""Static-cache generation matches transformers' own greedy generation (CPU here; graphs on the GPU)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from helpers import smollm2_llama_config

from quick.inference import StaticGenerator


def _tiny_llama(vocab: int = 128, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def test_static_generator_matches_hf_greedy():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 7))
    gen = StaticGenerator(model, batch=2, max_len=32)
    tokens, stats = gen.generate(ids, 12)
    ref = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, ref[:, 7:])
    assert stats.decode_tok_s > 0 and stats.prefill_tok_s > 0


def test_static_generator_rejects_overflow():
    gen = StaticGenerator(_tiny_llama(), batch=1, max_len=8)
    with pytest.raises(ValueError, match="do not fit"):
        gen.generate(torch.zeros(1, 6, dtype=torch.long), 4)


def _generate(model, ids, compile_mode: str, new: int = 10):
    gen = StaticGenerator(model, batch=ids.shape[0], max_len=32, compile=compile_mode)
    return gen.generate(ids, new)[0]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("mode", ["step", "regions", "fast"])
def test_compiled_decode_traces_without_breaks(mode, fused, monkeypatch):
    """Dynamo traces the decode step (and the fused projections' shared product) in one graph per region;
    with the eager backend this checks tracing without paying for inductor's build."""
    from quick import inference
    from quick.models.fuse import fuse_model

    monkeypatch.setattr(inference, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    model = _tiny_llama()
    if fused:
        fuse_model(model)
    ids = torch.randint(0, 128, (2, 7))
    want = _generate(model, ids, "none")
    from transformers.models.llama import modeling_llama

    rotary_before = modeling_llama.apply_rotary_pos_emb
    torch._dynamo.utils.counters.clear()
    try:
        got = _generate(model, ids, mode)
    finally:
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        inference.uncompile_regions(model)
        torch._dynamo.reset()
    assert modeling_llama.apply_rotary_pos_emb is rotary_before  # the global is restored
    assert not inference._COMPILED_ROTARY
    assert torch.equal(got, want)
    assert not breaks, breaks
    assert graphs >= 1  # something was compiled at all


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["step", "regions"])
def test_compiled_decode_inductor_same_tokens(mode):
    """Inductor-compiled decode (what the benchmark runs on the GPU) gives the eager tokens (CPU build: slow)."""
    from quick import inference
    from quick.models.fuse import fuse_model

    torch._dynamo.reset()
    model = _tiny_llama()
    fuse_model(model)
    ids = torch.randint(0, 128, (2, 7))
    want = _generate(model, ids, "none")
    try:
        got = _generate(model, ids, mode)
    finally:
        inference.uncompile_regions(model)
        torch._dynamo.reset()
    assert torch.equal(got, want)


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match="compile must be one of"):
        StaticGenerator(_tiny_llama(), batch=1, max_len=8, compile="max")


@pytest.mark.parametrize("mode", ["step", "fast"])
def test_bound_quick_linears_trace_as_one_op(mode, monkeypatch):
    """KernelQuickLinear (what the GPU runs under compile) is one custom op per (fused) linear: the whole
    decode step traces without a break and gives the unbound model's tokens. A CPU op stands in for the
    CUDA kernel here through the BOUND_OPS hook."""
    from quick import inference
    from quick.algorithms.rtn import quantize_model_rtn
    from quick.formats.layouts import get_layout
    from quick.models.fuse import fuse_model

    @torch.library.custom_op("quick_test::ref_w4", mutates_args=())
    def ref_w4(
        x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int
    ) -> torch.Tensor:
        k, n = x.shape[1], scales.shape[1]
        qw = get_layout("quick").unpack({"qweight": qweight, "scales": scales, "zeros": zeros}, k, n, g)
        return (x.float() @ qw.dequantize(torch.float32)).to(x.dtype)

    @ref_w4.register_fake
    def _(x, qweight, scales, zeros, g):
        return x.new_empty((x.shape[0], scales.shape[1]))

    def applies(mod, probe):
        return mod.layout_name == "quick" and not probe.is_cuda

    def call(mod, x2):
        return torch.ops.quick_test.ref_w4(x2, mod.qweight, mod.scales, mod.zeros, mod.group_size)

    monkeypatch.setitem(inference.BOUND_OPS, "cpu_test", (applies, call))
    monkeypatch.setattr(inference, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    model = _tiny_llama(hidden=128)  # k/v N = 64: the quick layout's block width
    quantize_model_rtn(model, 64, "quick", dtype=torch.bfloat16, progress=False)
    model.to(torch.bfloat16)
    fuse_model(model)
    ids = torch.randint(0, 128, (2, 7))
    want = _generate(model, ids, "none")
    torch._dynamo.utils.counters.clear()
    got = _generate(model, ids, mode)  # binds the layers
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, inference.QuickLinear)}
    assert kinds == {"KernelQuickLinear"}
    assert not breaks, breaks
    assert torch.equal(got, want)


def _gpu_model(layout: str):
    from transformers import LlamaForCausalLM

    from quick.algorithms.rtn import quantize_model_rtn

    torch.manual_seed(0)
    cfg = smollm2_llama_config()  # SmolLM2's layer shapes (K = 576: ragged groups, padded to 640)
    model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    if layout != "fp16":
        quantize_model_rtn(model, 128, layout, dtype=torch.float16, progress=False)
    return model


_GPU_CASES = [
    (layout, mode, fused)
    for layout in ("fp16", "quick", "quick_sm90")
    for mode in ("none", "regions", "step", "fast")
    for fused in (False, True)
    # the whole-step build is slow (inductor on a whole model): only on the fused 4-bit models
    if mode != "step" or (fused and layout != "fp16")
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("layout", "mode", "fused"), _GPU_CASES, ids=[f"{a}-{b}-{'fused' if c else 'unfused'}" for a, b, c in _GPU_CASES]
)
def test_gpu_fast_decode_matches_eager(layout, mode, fused):
    """Graphed (+ compiled, + fused) decode against plain eager decode of the same model, teacher-forced on the
    eager tokens: per-step logits within fp16 rounding of the fused kernels, nearly all tokens equal."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs a CUDA GPU of compute capability 8.0 or newer")
    from quick.inference import uncompile_regions
    from quick.kernels import dispatch
    from quick.models.fuse import fuse_model

    if (
        layout != "fp16"
        and dispatch.kernel_for(layout, torch.zeros(1, 640, dtype=torch.float16, device="cuda")) is None
    ):
        pytest.skip(f"no kernel for {layout} on this GPU")
    torch._dynamo.reset()
    ref_model = _gpu_model(layout)
    ids = torch.randint(0, 512, (4, 16), device="cuda")
    eager = StaticGenerator(ref_model, 4, 48, use_graph=False)
    tokens, _ = eager.generate(ids, 24)
    model = _gpu_model(layout)  # same seed: same weights
    if fused:
        fuse_model(model)
    fast = StaticGenerator(model, 4, 48, use_graph=True, compile=mode)
    ref = StaticGenerator(ref_model, 4, 48, use_graph=False)
    with torch.inference_mode():
        a, b = fast.prefill(ids), ref.prefill(ids)
        worst = rel(a, b)
        agree = 0
        for i in range(tokens.shape[1] - 1):
            a = fast.decode_step(tokens[:, i], 16 + i).clone()
            b = ref.decode_step(tokens[:, i], 16 + i)
            assert torch.isfinite(a).all()
            worst = max(worst, rel(a, b))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    uncompile_regions(model)
    torch._dynamo.reset()
    assert worst < 2e-2, worst
    assert agree >= 0.9 * 4 * (tokens.shape[1] - 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_decode_attention_matches_transformers_sdpa():
    """The grouped-query fold at decode gives transformers' SDPA results (fp32: rounding only)."""
    from quick.inference import DECODE_ATTENTION

    ids = torch.randint(0, 128, (3, 5))
    outs = []
    for fold in (False, True):
        model = _tiny_llama()
        gen = StaticGenerator(model, batch=3, max_len=16, decode_attention=fold)
        assert (model.config._attn_implementation == DECODE_ATTENTION) == fold
        with torch.inference_mode():
            logits = [gen.prefill(ids)]
            nxt = logits[0].argmax(-1)
            for i in range(6):
                logits.append(gen.decode_step(nxt, 5 + i))
                nxt = logits[-1].argmax(-1)
        outs.append(torch.stack(logits))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs[0][1], outs[0][2])  # the steps differ: not a constant output


def test_e2e_results_format(tmp_path):
    """The benchmark's files: the issue's JSON schema (+ variant for ablations), a table with ratios, a plot."""
    import json

    from quick.bench import e2e

    assert e2e.parse_variant("step+fused") == ("step", True, True)
    assert e2e.parse_variant("eager") == ("none", False, False)
    assert e2e.resolve_variants(["graph"], "regions", True) == ["regions+fused"]
    assert e2e.parse_variant("fast+fused") == ("fast", True, True)
    with pytest.raises(ValueError, match="unknown variant"):
        e2e.parse_variant("quick")
    rows = [
        {
            "model": "llama-2-7b",
            "impl": impl,
            "batch": b,
            "prefill_tok_s": 1e3,
            "decode_tok_s": tok * b,
            "peak_mem_GB": 4.0,
        }
        for impl, tok in (("fp16", 100.0), ("quick", 250.0))
        for b in (1, 64)
    ]
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.x", "cuda": "13.0", "date": "2026-11-23"}
    stem = e2e.write_results(rows, env, tmp_path, 128, 128, ["graph"])
    doc = json.loads(stem.with_suffix(".json").read_text())
    assert stem.name == "e2e-h100-2026-11-23"
    assert isinstance(doc["gpu"], str) and isinstance(doc["date"], str)
    keys = {"model", "impl", "batch", "prefill_tok_s", "decode_tok_s", "peak_mem_GB"}
    assert all(set(r) == keys for r in doc["rows"])
    assert "| llama-2-7b | 64 | quick | graph | 1000 | 16000 | 2.50x | 4.0 |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 0


def test_e2e_records_the_fusions_and_the_attention_kernel(tmp_path, monkeypatch):
    """The results say which decode-path fusions (``QUICK_FUSIONS``, sorted) and whether the attention kernel
    (``QUICK_ATTN_KERNEL``) were on, in the JSON and in the table's caption."""
    import json

    from quick.bench import e2e

    monkeypatch.setenv("QUICK_FUSIONS", "pdl,act")
    monkeypatch.setenv("QUICK_ATTN_KERNEL", "0")
    assert e2e.fusion_switches() == {"fusions": ["act", "pdl"], "attn_kernel": False}
    monkeypatch.setenv("QUICK_FUSIONS", "all")
    monkeypatch.delenv("QUICK_ATTN_KERNEL")
    assert e2e.fusion_switches() == {"fusions": ["act", "norm", "normquant", "pdl", "rope"], "attn_kernel": True}
    monkeypatch.setenv("QUICK_FUSIONS", "none")
    env = {"gpu": "NVIDIA H100", "torch": "2.x", "cuda": "13.0", "date": "2026-11-23", **e2e.fusion_switches()}
    row = {"model": "m", "impl": "fp16", "batch": 1, "prefill_tok_s": 1.0, "decode_tok_s": 1.0, "peak_mem_GB": 1.0}
    stem = e2e.write_results([row], env, tmp_path, 16, 16, ["graph"])
    doc = json.loads(stem.with_suffix(".json").read_text())
    assert (doc["fusions"], doc["attn_kernel"]) == ([], True)
    assert "Kernel fusions: none; decode attention kernel on." in stem.with_suffix(".md").read_text()


@pytest.mark.parametrize("mode", ["step", "regions", "fast"])
def test_compiled_decode_builds_twice_for_many_batch_sizes(mode, monkeypatch):
    """Automatic dynamic shapes: the first batch size compiles static, the second generalises the batch dim,
    later ones reuse it (the full benchmark's 5 batch sizes cost 2 builds per model, not 5)."""
    from quick import inference

    monkeypatch.setattr(inference, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    model = _tiny_llama()
    inputs = [torch.randint(0, 128, (b, 4)) for b in (2, 3, 4, 5)]
    wants = [StaticGenerator(model, ids.shape[0], 16).generate(ids, 3)[0] for ids in inputs]  # before compiling
    torch._dynamo.utils.counters.clear()
    graphs = []
    try:
        for ids, want in zip(inputs, wants, strict=True):
            got = StaticGenerator(model, ids.shape[0], 16, compile=mode).generate(ids, 3)[0]
            assert torch.equal(got, want)
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    finally:
        inference.uncompile_regions(model)
        torch._dynamo.reset()
    assert graphs[1] > graphs[0]  # the second size recompiled (dynamic) ...
    assert graphs[3] == graphs[1]  # ... and the later ones did not


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["fp16", "quick", "quick_sm90"])
def test_gpu_graphed_prefill_matches_eager(layout):
    """Prefill replayed from a CUDA graph: the same logits as eager, and after ``cache.reset()`` a second
    generation (graph replays only, as in the benchmark) gives the same tokens again."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs a CUDA GPU of compute capability 8.0 or newer")
    from quick.kernels import dispatch

    if (
        layout != "fp16"
        and dispatch.kernel_for(layout, torch.zeros(1, 640, dtype=torch.float16, device="cuda")) is None
    ):
        pytest.skip(f"no kernel for {layout} on this GPU")
    model = _gpu_model(layout)
    ids = torch.randint(0, 512, (3, 16), device="cuda")
    eager = StaticGenerator(model, 3, 40, use_graph=True, graph_prefill=False)
    graphed = StaticGenerator(model, 3, 40, use_graph=True, graph_prefill=True)
    with torch.inference_mode():
        a = eager.prefill(ids).clone()
        b = graphed.prefill(ids).clone()
    assert torch.isfinite(b).all()
    assert rel(b, a) < 1e-3, rel(b, a)
    with torch.inference_mode():
        eager.cache.reset()
        graphed.cache.reset()
    want, _ = eager.generate(ids, 20)
    first, _ = graphed.generate(ids, 20)
    with torch.inference_mode():
        graphed.cache.reset()
    again, stats = graphed.generate(ids, 20)
    assert torch.equal(first, want)
    assert torch.equal(again, first)
    assert stats.prefill_tok_s > 0


def test_random_model_quantizes_the_output_projection_only_when_asked(monkeypatch):
    """e2e impl ``<layout>+lm_head``: the output projection is packed too (it is ~7 % of a Llama-2 decode step's
    bytes in 4-bit, ~23 % for Llama-3's 128k vocabulary); by default it stays fp16, as in AutoAWQ."""
    from transformers import LlamaConfig

    from quick.bench import e2e
    from quick.models import synthetic
    from quick.nn.linear import QuickLinear

    tiny = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2, vocab_size=512
    )
    monkeypatch.setattr(synthetic, "load_config", lambda name: tiny)
    plain = synthetic.build_random_model("tiny", torch.float16, "cpu", True, num_layers=1)
    both = synthetic.build_random_model("tiny", torch.float16, "cpu", True, num_layers=1, quantize_lm_head=True)
    assert type(plain.lm_head) is torch.nn.Linear and isinstance(both.lm_head, QuickLinear)
    assert isinstance(plain.model.layers[0].mlp.down_proj, QuickLinear)
    assert e2e.LM_HEAD == "+lm_head" and "quick_sm90+lm_head".removesuffix(e2e.LM_HEAD) == "quick_sm90"
    layout = plain.model.layers[0].mlp.down_proj.layout.name
    assert e2e.packed_layouts(plain) == {layout} and e2e.packed_layouts(torch.nn.Linear(4, 4)) == set()


def _e2e_parser():
    import argparse

    from quick.bench.cli_args import add_e2e_arguments

    p = argparse.ArgumentParser()
    add_e2e_arguments(p)
    return p


def test_e2e_prefill_only_arguments(capsys):
    """``--prefill-only`` with the W4A8 impls parses as written; token counts, batch sizes and layer counts must be
    positive integers (an argparse error naming the value, exit code 2)."""
    from quick.cli import main

    argv = "--impls fp16 quick_sm90 w4a8 w4a8_g128 --variants fast+fused --prefill-only --prompt 2048"
    args = _e2e_parser().parse_args([*argv.split(), "--batches", "1", "2", "4", "8", "16"])
    assert args.prefill_only and (args.prompt, args.batches) == (2048, [1, 2, 4, 8, 16])
    assert args.impls == ["fp16", "quick_sm90", "w4a8", "w4a8_g128"] and args.variants == ["fast+fused"]
    assert not _e2e_parser().parse_args([]).prefill_only
    for bad in (["--prompt", "0"], ["--batches", "1", "-2"], ["--gen", "x"], ["--layers", "0"]):
        assert main(["bench", "e2e", *bad]) == 2
        assert "expected a positive integer" in capsys.readouterr().err


def test_e2e_prefill_results_format(tmp_path):
    """Prefill-only results: the decode schema's keys plus ``mode: "prefill"`` (rows and document), decode tokens/s
    null, a table of prefill tokens/s against fp16, files of their own name."""
    import json

    from quick.bench import e2e

    rows = [
        {"model": "m", "impl": impl, "batch": b, "prefill_tok_s": tok * b, "decode_tok_s": None, "peak_mem_GB": 9.0}
        for impl, tok in (("fp16", 1000.0), ("w4a8", 1500.0))
        for b in (1, 16)
    ]
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.x", "cuda": "13.0", "date": "2026-11-23", "prefill": "graph"}
    stem = e2e.write_results(rows, env, tmp_path, 2048, 128, ["fast+fused"], mode="prefill")
    assert stem.name == "e2e-h100-2026-11-23-prefill"
    doc = json.loads(stem.with_suffix(".json").read_text())
    assert doc["mode"] == "prefill" and doc["prompt_tokens"] == 2048 and doc["new_tokens"] == 0
    keys = {"model", "impl", "batch", "prefill_tok_s", "decode_tok_s", "peak_mem_GB", "mode"}
    assert all(set(r) == keys and r["mode"] == "prefill" and r["decode_tok_s"] is None for r in doc["rows"])
    table = stem.with_suffix(".md").read_text()
    assert "| m | 16 | w4a8 | fast+fused | 24000 | 1.50x | 9.0 |" in table and "prefill vs fp16" in table
    with pytest.raises(ValueError, match="mode must be one of"):
        e2e.write_results(rows, env, tmp_path, 2048, 128, mode="decoding")


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_e2e_w4a8_rows_run_fused_on_the_fast_path(mode, monkeypatch):
    """The benchmark's W4A8 impls (per-channel and g128) on a tiny model on the CPU, variant fast+fused: every
    q/k/v and gate/up is one fused W4A8 layer, decoding goes through the fast step, and the rows have the schema
    (prefill mode: prefill tokens/s only)."""
    from transformers import LlamaConfig

    from quick import inference
    from quick.bench import e2e
    from quick.models import decoder, synthetic
    from quick.models.fuse import FusedProjection
    from quick.nn.linear_w4a8 import QuickLinearW4A8

    torch.set_num_threads(1)
    tiny = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, vocab_size=256
    )
    monkeypatch.setattr(synthetic, "load_config", lambda name: tiny)
    monkeypatch.setattr(e2e, "DEVICE", "cpu")
    monkeypatch.setattr(e2e, "PREFILL_REPEATS", 2)
    monkeypatch.setattr(inference, "COMPILE_BACKEND", "eager")
    built, steps = {}, []
    build = e2e._build
    monkeypatch.setattr(e2e, "_build", lambda name, impl, layers: built.setdefault(impl, build(name, impl, layers)))
    call = decoder.FastDecoder.__call__
    monkeypatch.setattr(decoder.FastDecoder, "__call__", lambda self, *a: steps.append(1) or call(self, *a))
    torch._dynamo.reset()
    try:
        rows, cases = e2e.run(["tiny"], [1, 2], ["w4a8", "w4a8_g128"], 8, 4, 1, ["fast+fused"], mode=mode)
    finally:
        torch._dynamo.reset()
    assert [(r["impl"], r["batch"]) for r in rows] == [("w4a8", 1), ("w4a8", 2), ("w4a8_g128", 1), ("w4a8_g128", 2)]
    assert all(c["fused_projections"] == 2 for c in cases)  # 1 layer: q/k/v and gate/up
    for impl, model in built.items():
        layer = model.model.layers[0]
        for owner in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
            assert isinstance(owner, FusedProjection) and isinstance(owner.linear, QuickLinearW4A8)
            assert owner.linear.group_size == (128 if impl == "w4a8_g128" else -1)
    assert all(r["prefill_tok_s"] > 0 and r["peak_mem_GB"] is None for r in rows)
    if mode == "prefill":
        assert all(r["mode"] == "prefill" and r["decode_tok_s"] is None for r in rows) and not steps
    else:
        assert all("mode" not in r and r["decode_tok_s"] > 0 for r in rows) and steps
    with pytest.raises(ValueError, match="mode must be one of"):
        e2e.run(["tiny"], [1], ["w4a8"], 8, 4, 1, mode="both")


@pytest.mark.parametrize("group", [-1, 128], ids=["per_channel", "g128"])
@pytest.mark.parametrize("mode", ["step", "regions", "fast"])
def test_compiled_decode_w4a8_same_tokens(mode, group, monkeypatch):
    """Fused W4A8 layers in every compiled decode mode (eager backend: tracing only) give the tokens of the plain
    static decode. They are called as they are (no bound op): dynamo may split the step or a region around them;
    the fast step's compiled parts hold no linear and trace without a break."""
    from quick import inference
    from quick.algorithms.rtn import quantize_model_rtn_w4a8
    from quick.models.fuse import fuse_model

    monkeypatch.setattr(inference, "COMPILE_BACKEND", "eager")
    torch.set_num_threads(1)
    torch._dynamo.reset()
    model = _tiny_llama(hidden=128)
    quantize_model_rtn_w4a8(model, group, dtype=torch.float16, progress=False)
    assert fuse_model(model) == 4
    ids = torch.randint(0, 128, (2, 7))
    want = _generate(model, ids, "none", new=6)
    torch._dynamo.utils.counters.clear()
    try:
        got = _generate(model, ids, mode, new=6)
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
    finally:
        inference.uncompile_regions(model)
        torch._dynamo.reset()
    assert torch.equal(got, want)
    if mode == "fast":
        assert not breaks, breaks
