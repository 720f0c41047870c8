"""GPTQ import (GPTQModel / AutoGPTQ format): unpacking against GPTQModel's own pack and dequantize code on random
tensors (v1 and v2 zero points, symmetric and asymmetric, act-order), real SmolLM2-135M checkpoints written by
GPTQModel on CPU (perplexity and logits against GPTQModel's dequantized weights), and clear errors.

GPTQModel needs its own environment (torch >= 2.14.1, transformers >= 5.20.2, which conflict with llmcompressor's
pins): ``pip install ".[formats-gptq]"`` in a separate virtualenv, then run this file there. Without it, the tests that
need it skip and the error-path tests still run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from external_common import (
    assert_logits_close,
    cached_checkpoint,
    calibration_ids,
    dense_model,
    eval_ids,
    needs_real_data,
    perplexity,
    prompt_logits,
)

from quick.checkpoint import CheckpointError, load_quantized, save_quantized
from quick.external import ExternalFormatError
from quick.external.gptq import GptqImporter, v1_to_v2_zeros
from quick.nn.linear import QuickLinear

GPTQMODEL_SKIP = "gptqmodel is not installed (pip install '.[formats-gptq]' in its own environment)"


def gptq_config(**kw) -> dict:
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
    qc["checkpoint_format"] = "gptq"
    qc.update(kw)
    return qc


def act_order_g_idx(k: int, g: int, seed: int) -> torch.Tensor:
    """GPTQ's desc_act assignment: input rows in a random (Hessian) order, group = position // g."""
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // g).to(torch.int32)
    return g_idx


def their_pack(k: int, n: int, g: int, sym: bool, act: bool, seed: int = 0):
    """Random codes, zero points and scales packed by GPTQModel's TorchLinear.pack_original; returns the module
    (v2 zero points) and its dense weight [K, N] from GPTQModel's own dequantize_weight in fp32."""
    gptqmodel = pytest.importorskip("gptqmodel", reason=GPTQMODEL_SKIP)
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    gen = torch.Generator().manual_seed(seed)
    groups = 1 if g == -1 else -(-k // g)
    gs = k if g == -1 else g
    g_idx = act_order_g_idx(k, gs, seed) if act else (torch.arange(k) // gs).to(torch.int32)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).half().float()
    zeros = torch.full((n, groups), 8.0) if sym else torch.randint(0, 16, (n, groups), generator=gen).float()
    q = torch.randint(0, 16, (n, k), generator=gen).float()
    w = (q - zeros[:, g_idx.long()]) * scales[:, g_idx.long()]
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = w
    mod = TorchLinear(bits=4, group_size=gs, sym=sym, desc_act=act, in_features=k, out_features=n, bias=False)
    mod.pack_original(lin, scales, zeros.to(torch.int32), g_idx)
    mod.scales = mod.scales.float()  # their dequantization in fp32 (the packed scales are fp16-exact)
    mod.post_init()
    dense = mod.dequantize_weight().float()
    assert gptqmodel is not None
    return mod, dense


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize(
    ("k", "n", "g", "sym", "act"),
    [
        (256, 64, 128, True, False),
        (256, 64, 128, False, False),
        (256, 128, 64, False, True),
        (576, 64, 128, False, True),  # SmolLM2's K: a ragged last group of 64 rows, act-order
        (192, 64, 32, True, True),
        (256, 64, -1, False, False),
    ],
)
def test_unpack_matches_gptqmodel(fmt, k, n, g, sym, act):
    mod, dense = their_pack(k, n, g, sym, act)
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    tensors = {"qweight": mod.qweight.clone(), "scales": mod.scales.half(), "g_idx": mod.g_idx.clone()}
    if fmt == "gptq":
        from gptqmodel.quantization import QuantizeConfig

        convert_gptq_v2_to_v1_format_module(mod, QuantizeConfig(bits=4, group_size=mod.group_size))
    tensors["qzeros"] = mod.qzeros.clone()
    imp = GptqImporter(gptq_config(group_size=g, sym=sym, desc_act=act, checkpoint_format=fmt))
    for layout in ("quick", "quick_sm90", "awq_gemm"):
        il = imp.convert("layer", tensors, k, n, layout, torch.float16)
        lin = QuickLinear.from_quantized(il.qw, None, layout, il.logical_in_features)
        if il.perm is not None:
            lin.perm = il.perm
        assert (il.perm is not None) == act
        ours = lin.unpack().dequantize(torch.float32)[:k]
        if il.perm is not None:
            ours = ours[torch.argsort(il.perm)]
        assert torch.equal(ours, dense), layout
        x = torch.randn(3, k).half()
        ref = (x.float() @ dense).half()
        torch.testing.assert_close(lin(x), ref, rtol=2e-3, atol=2e-3)


def test_v1_zero_points_borrow_like_gptqmodel():
    """A zero point of 0 stored as v1 borrows from the next nibble; adding the constant back restores it."""
    pytest.importorskip("gptqmodel", reason=GPTQMODEL_SKIP)
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization import QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    mod = TorchLinear(bits=4, group_size=32, sym=False, desc_act=False, in_features=32, out_features=8, bias=False)
    zeros = torch.tensor([[0, 15, 0, 0, 7, 0, 15, 0]], dtype=torch.int32)
    words = (zeros[0].to(torch.int64) << (4 * torch.arange(8))).sum()
    mod.qzeros = torch.tensor([[words - (1 << 32) if words >= 1 << 31 else words]], dtype=torch.int32)
    convert_gptq_v2_to_v1_format_module(mod, QuantizeConfig(bits=4, group_size=32))
    from quick.formats.interleave import unpack_nibbles

    assert unpack_nibbles(v1_to_v2_zeros(mod.qzeros)).tolist() == zeros.tolist()


# --------------------------------------------------------------------------------- errors (no GPTQModel)


def test_unsupported_configs_name_the_field():
    for kw, field in [
        ({"bits": 3}, "bits"),
        ({"bits": 8}, "bits"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format"),
        ({"pack_dtype": "int16"}, "pack_dtype"),
        ({"group_size": 256}, "group_size"),
        ({"group_size": 16}, "group_size"),
        ({"dynamic": {"-:.*down": {}}}, "dynamic"),
    ]:
        with pytest.raises(ExternalFormatError, match=field):
            GptqImporter(gptq_config(**kw))


def test_bad_tensors_are_clear_errors():
    k, n = 256, 64
    imp = GptqImporter(gptq_config())
    good = {
        "qweight": torch.zeros(k // 8, n, dtype=torch.int32),
        "qzeros": torch.zeros(2, n // 8, dtype=torch.int32),
        "scales": torch.ones(2, n, dtype=torch.float16),
    }
    imp.convert("x", good, k, n, "quick", torch.float16)
    with pytest.raises(ExternalFormatError, match=r"'x.qweight' is torch.int32 \(16, 64\)"):
        imp.convert("x", {**good, "qweight": good["qweight"][:16]}, k, n, "quick", torch.float16)
    with pytest.raises(ExternalFormatError, match="missing tensor 'x.qzeros'"):
        imp.convert("x", {k_: v for k_, v in good.items() if k_ != "qzeros"}, k, n, "quick", torch.float16)
    with pytest.raises(ExternalFormatError, match="NaN or inf"):
        imp.convert("x", {**good, "scales": good["scales"] * float("nan")}, k, n, "quick", torch.float16)
    bad_gidx = torch.zeros(k, dtype=torch.int32)  # every row in group 0: groups of 256, not 128
    with pytest.raises(ExternalFormatError, match="g_idx gives groups"):
        imp.convert("x", {**good, "g_idx": bad_gidx}, k, n, "quick", torch.float16)
    with pytest.raises(ExternalFormatError, match=r"g_idx values must lie in \[0, 1\]"):
        imp.convert("x", {**good, "g_idx": torch.full((k,), 5, dtype=torch.int32)}, k, n, "quick", torch.float16)


def test_perm_applies_on_reference_path_and_round_trips(tmp_path):
    """A layer with an input permutation equals the dense layer on the unpermuted input, and our checkpoints keep
    the permutation (a model with perm saved and loaded gives the same logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quick.auto import quantize_model_rtn

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=1, intermediate_size=128, vocab_size=128,
                      num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    model = quantize_model_rtn(LlamaForCausalLM(cfg).eval(), 32, scale_dtype=torch.float16)
    lin = model.model.layers[0].mlp.down_proj
    perm = torch.randperm(lin.logical_in_features)
    x = torch.randn(2, lin.logical_in_features)
    with torch.no_grad():
        before = lin(x[..., perm])
        lin.perm = perm
        assert torch.equal(lin(x), before)
        lin.backend = "reference"
        assert torch.equal(lin(x), before)
        lin.backend = "auto"
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    out = save_quantized(model, tmp_path / "ck")
    loaded = load_quantized(out, dtype=torch.float32)
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.perm, perm)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    with pytest.raises(CheckpointError, match="no input permutation"):
        from quick.checkpoint import make_quant_config

        save_quantized(model, tmp_path / "awq", make_quant_config("awq_gemm", 32))


# ------------------------------------------------------------------------ real checkpoints (GPTQModel, slow)

VARIANTS = {
    "smollm2-gptq-g128-asym-act": {"sym": False, "desc_act": True},
    "smollm2-gptq-g128-sym": {"sym": True, "desc_act": False},
}


def write_gptq(variant: str):
    def write(src: Path, out: Path) -> None:
        pytest.importorskip("gptqmodel", reason=GPTQMODEL_SKIP)
        import os

        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        from gptqmodel import GPTQModel, QuantizeConfig

        ids = calibration_ids(8, 256)
        calib = [{"input_ids": r[None], "attention_mask": torch.ones_like(r)[None]} for r in ids]
        qcfg = QuantizeConfig(bits=4, group_size=128, **VARIANTS[variant])
        model = GPTQModel.load(str(src), qcfg, device="cpu")
        model.quantize(calib, batch_size=1)
        model.save(str(out))

    return write


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def real_checkpoint(request) -> Path:
    return cached_checkpoint(request.param, write_gptq(request.param))


def gptqmodel_dense(path: Path, scale_dtype: torch.dtype) -> torch.nn.Module:
    """fp32 model whose quantized linears hold GPTQModel's own dequantized weights (read by GPTQModel)."""
    pytest.importorskip("gptqmodel", reason=GPTQMODEL_SKIP)
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    g = GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    weights = {}
    for name, m in g.model.named_modules():
        if isinstance(m, BaseQuantLinear):
            m.scales = m.scales.float()
            weights[name] = m.dequantize_weight().float().t()
    return dense_model(path, weights, scale_dtype)


@pytest.mark.slow
@needs_real_data
def test_real_gptq_checkpoint_matches_gptqmodel(real_checkpoint, tmp_path):
    ours = load_quantized(real_checkpoint, dtype=torch.float32)
    qc = json.loads((real_checkpoint / "config.json").read_text())["quantization_config"]
    perms = [m.perm is not None for m in ours.modules() if isinstance(m, QuickLinear)]
    assert len(perms) == 30 * 7 and all(perms) == bool(qc["desc_act"]) and any(perms) == bool(qc["desc_act"])
    act_dtype = next(m for m in ours.modules() if isinstance(m, QuickLinear)).dtype
    ref = gptqmodel_dense(real_checkpoint, act_dtype)
    ids = eval_ids(real_checkpoint)
    p_ours, p_ref = perplexity(ours, ids), perplexity(ref, ids)
    print(f"\n{real_checkpoint.name}: ppl ours {p_ours:.5f}, GPTQModel dequantized {p_ref:.5f}")
    assert abs(p_ours - p_ref) / p_ref < 1e-3
    assert_logits_close(prompt_logits(ours, real_checkpoint), prompt_logits(ref, real_checkpoint), act_dtype)
    # converted to our format (CLI), the same logits
    from quick.cli import main as cli_main

    assert cli_main(["convert", str(real_checkpoint), str(tmp_path / "conv")]) == 0
    conv = load_quantized(tmp_path / "conv", dtype=torch.float32)
    assert torch.equal(prompt_logits(conv, real_checkpoint), prompt_logits(ours, real_checkpoint))


@pytest.mark.slow
@needs_real_data
def test_real_gptq_checkpoint_corrupt_or_mismatched(real_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(real_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bits = 8 is not supported"):
        load_quantized(bad)
    cfg["quantization_config"]["bits"] = 4
    cfg["quantization_config"]["group_size"] = 64  # files hold groups of 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"qzeros' is torch.int32 \(5, 72\), expected torch.int32 \(9, 72\)"):
        load_quantized(bad)
