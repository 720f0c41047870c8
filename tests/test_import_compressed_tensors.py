"""compressed-tensors ``pack-quantized`` W4A16 import: unpacking against the library's own compressor on random
tensors (group and channel, symmetric and asymmetric), real SmolLM2-135M checkpoints written by llm-compressor on CPU
(perplexity and logits against compressed-tensors' own decompression), and clear errors.

llm-compressor pins transformers <= 5.17 and compressed-tensors 0.19; install ``.[formats]`` in its own virtualenv
to write the real checkpoints (they are cached; later runs need only compressed-tensors).
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
    dense_model,
    eval_ids,
    needs_real_data,
    perplexity,
    prompt_logits,
)

from quick.checkpoint import CheckpointError, load_quantized
from quick.external import ExternalFormatError
from quick.external.compressed_tensors import CompressedTensorsImporter
from quick.nn.linear import QuickLinear

CT_SKIP = "compressed-tensors is not installed (pip install '.[formats]')"


def ct_config(strategy: str = "group", group_size: int | None = 128, symmetric: bool = True, **kw) -> dict:
    weights = {"num_bits": 4, "type": "int", "strategy": strategy, "group_size": group_size, "symmetric": symmetric}
    weights.update(kw.pop("weights", {}))
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "format": "pack-quantized"}
    group.update(kw.pop("group", {}))
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": group}, "ignore": ["lm_head"]}  # fmt: skip
    qc.update(kw)
    return qc


def their_compress(n: int, k: int, strategy: str, g: int | None, symmetric: bool, seed: int = 0):
    """A random weight compressed by compressed-tensors' PackedQuantizationCompressor; returns the stored tensors
    and the library's own decompressed weight ``[N, K]`` (fp32 math on the stored bf16 scales)."""
    pytest.importorskip("compressed_tensors", reason=CT_SKIP)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy=strategy, group_size=g)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if strategy == "channel" else k // g
    scale = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
    zp = torch.zeros(n, groups, dtype=torch.int8)
    if not symmetric:
        zp = torch.randint(-8, 8, (n, groups), generator=gen).to(torch.int8)
    w = torch.randn(n, k, generator=gen) * 0.05
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
    stored = PackedQuantizationCompressor.compress(state, scheme)
    oracle = dict(stored)
    oracle["weight_scale"] = stored["weight_scale"].float()
    dense = PackedQuantizationCompressor.decompress(oracle, scheme)["weight"].float()
    return stored, dense


@pytest.mark.parametrize(
    ("n", "k", "strategy", "g", "symmetric"),
    [
        (128, 256, "group", 128, True),  # W4A16
        (128, 256, "group", 128, False),  # W4A16_ASYM
        (192, 576, "group", 64, False),
        (64, 128, "group", 32, True),
        (128, 576, "channel", None, True),
        (128, 320, "channel", None, False),  # K not a multiple of 64: padded for quick_sm90
    ],
)
def test_unpack_matches_compressed_tensors(n, k, strategy, g, symmetric):
    stored, dense = their_compress(n, k, strategy, g, symmetric)
    imp = CompressedTensorsImporter(ct_config(strategy, g, symmetric))
    assert ("weight_zero_point" in stored) == (not symmetric)
    for layout in ("quick", "quick_sm90", "awq_gemm"):
        il = imp.convert("layer", stored, k, n, layout, torch.bfloat16)
        assert il.perm is None and il.qw.scales.dtype == torch.bfloat16
        lin = QuickLinear.from_quantized(il.qw, None, layout, il.logical_in_features)
        assert torch.equal(lin.dequantized_weight(torch.float32), dense), layout
        x = torch.randn(2, k).to(torch.bfloat16)
        torch.testing.assert_close(lin(x).float(), x.float() @ dense.t(), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------- errors (no library needed)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"weights": {"num_bits": 8}}, "num_bits"),
        ({"weights": {"num_bits": 3}}, "num_bits"),
        ({"weights": {"type": "float"}}, "type"),
        ({"strategy": "tensor"}, "strategy"),
        ({"strategy": "block"}, "strategy"),
        ({"group_size": 256}, "group_size"),
        ({"group_size": 16}, "group_size"),
        ({"group": {"input_activations": {"num_bits": 8}}}, "input_activations"),
        ({"group": {"format": "naive-quantized"}}, "format"),
        ({"format": "float-quantized", "group": {"format": None}}, "format"),
        ({"quantization_status": "frozen"}, "quantization_status"),
        ({"sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity_config"),
    ],
)
def test_unsupported_configs_name_the_field(kw, field):
    base = {k: kw.pop(k) for k in ("strategy", "group_size") if k in kw}
    with pytest.raises(ExternalFormatError, match=field):
        CompressedTensorsImporter(ct_config(**base, **kw))


def test_bad_tensors_are_clear_errors():
    n, k = 64, 256
    imp = CompressedTensorsImporter(ct_config(symmetric=False))
    good = {
        "weight_packed": torch.zeros(n, k // 8, dtype=torch.int32),
        "weight_scale": torch.ones(n, 2, dtype=torch.bfloat16),
        "weight_zero_point": torch.zeros(n // 8, 2, dtype=torch.int32),
        "weight_shape": torch.tensor([n, k]),
    }
    imp.convert("x", good, k, n, "quick", torch.bfloat16)
    with pytest.raises(ExternalFormatError, match=r"'x.weight_shape' = \[64, 128\]"):
        imp.convert("x", {**good, "weight_shape": torch.tensor([n, 128])}, k, n, "quick", torch.bfloat16)
    with pytest.raises(ExternalFormatError, match="missing tensor 'x.weight_zero_point'"):
        imp.convert("x", {t: v for t, v in good.items() if t != "weight_zero_point"}, k, n, "quick", torch.bfloat16)
    with pytest.raises(ExternalFormatError, match=r"'x.weight_scale' is torch.bfloat16 \(64, 4\)"):
        imp.convert("x", {**good, "weight_scale": torch.ones(n, 4, dtype=torch.bfloat16)}, k, n, "quick", torch.float16)
    with pytest.raises(ExternalFormatError, match="NaN or inf"):
        bad = {**good, "weight_scale": good["weight_scale"] * float("inf")}
        imp.convert("x", bad, k, n, "quick", torch.bfloat16)


# --------------------------------------------------------------- real checkpoints (llm-compressor, slow)

# W4A16 as llm-compressor ships it (g128, symmetric): SmolLM2's 576-wide inputs are not divisible by 128, which
# llm-compressor refuses, so those layers stay dense (only down_proj is quantized) -- a mixed checkpoint.
G128_IGNORE = ["lm_head", "re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$", "re:.*o_proj$", "re:.*gate_proj$",
               "re:.*up_proj$"]  # fmt: skip
VARIANTS = {
    "smollm2-ct-w4a16": {"scheme": "W4A16", "ignore": G128_IGNORE},
    "smollm2-ct-w4a16-asym-g64": {"args": {"symmetric": False, "strategy": "group", "group_size": 64}},
    "smollm2-ct-w4a16-channel": {"args": {"symmetric": True, "strategy": "channel"}},
}


def write_llmcompressor(variant: str):
    def write(src: Path, out: Path) -> None:
        pytest.importorskip("llmcompressor", reason="llmcompressor is not installed (pip install '.[formats]')")
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = VARIANTS[variant]
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        if "scheme" in spec:
            recipe = QuantizationModifier(targets="Linear", scheme=spec["scheme"], ignore=spec["ignore"])
        else:
            args = QuantizationArgs(num_bits=4, type="int", **spec["args"])
            scheme = QuantizationScheme(targets=["Linear"], weights=args)
            recipe = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
        oneshot(model=model, recipe=recipe)
        model.save_pretrained(out, save_compressed=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)

    return write


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def real_checkpoint(request) -> Path:
    return cached_checkpoint(request.param, write_llmcompressor(request.param))


def ct_dense(path: Path, scale_dtype: torch.dtype) -> torch.nn.Module:
    """fp32 model whose quantized linears hold compressed-tensors' own decompressed weights."""
    pytest.importorskip("compressed_tensors", reason=CT_SKIP)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(next(iter(qc["config_groups"].values())))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                name, _, t = key.rpartition(".")
                if t.startswith("weight_"):
                    layers.setdefault(name, {})[t] = sf.get_tensor(key)
    weights = {}
    for name, state in layers.items():
        state["weight_scale"] = state["weight_scale"].float()
        weights[name] = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    return dense_model(path, weights, scale_dtype)


@pytest.mark.slow
@needs_real_data
def test_real_checkpoint_matches_compressed_tensors(real_checkpoint, tmp_path):
    ours = load_quantized(real_checkpoint, dtype=torch.float32)
    n_quant = sum(isinstance(m, QuickLinear) for m in ours.modules())
    assert n_quant == (30 if real_checkpoint.name == "smollm2-ct-w4a16" else 30 * 7)
    act_dtype = next(m for m in ours.modules() if isinstance(m, QuickLinear)).dtype
    ref = ct_dense(real_checkpoint, act_dtype)
    ids = eval_ids(real_checkpoint)
    p_ours, p_ref = perplexity(ours, ids), perplexity(ref, ids)
    print(f"\n{real_checkpoint.name}: ppl ours {p_ours:.5f}, compressed-tensors decompressed {p_ref:.5f}")
    assert abs(p_ours - p_ref) / p_ref < 1e-3
    assert_logits_close(prompt_logits(ours, real_checkpoint), prompt_logits(ref, real_checkpoint), act_dtype)
    from quick.cli import main as cli_main

    assert cli_main(["convert", str(real_checkpoint), str(tmp_path / "conv")]) == 0
    conv = load_quantized(tmp_path / "conv", dtype=torch.float32)
    assert torch.equal(prompt_logits(conv, real_checkpoint), prompt_logits(ours, real_checkpoint))


@pytest.mark.slow
@needs_real_data
def test_real_checkpoint_corrupt_or_mismatched(real_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(real_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    group = next(iter(cfg["quantization_config"]["config_groups"].values()))
    group["weights"]["num_bits"] = 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_bits = 8 is not supported"):
        load_quantized(bad)
    group["weights"]["num_bits"] = 4
    group["weights"]["symmetric"] = not group["weights"]["symmetric"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="weight_zero_point"):
        load_quantized(bad)
