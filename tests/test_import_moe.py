"""Other libraries' mixture-of-experts checkpoints, which store each expert's gate, up and down linear on its own:
AutoAWQ GEMM, GPTQ and compressed-tensors ``pack-quantized`` files of tiny Qwen3-MoE, Mixtral (its published
``block_sparse_moe`` / ``w1 w3 w2`` names) and Qwen2-MoE (shared expert) models load into ``QuickMoEExperts`` stacks
holding exactly the stored weights, with the logits of transformers' own model holding the dequantized weights, and
convert into QUICK checkpoints; incomplete or act-order experts are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_moe
from safetensors.torch import save_file

from quick.checkpoint import CheckpointError, load_quantized, save_quantized
from quick.formats.interleave import pack_nibbles
from quick.formats.layouts import get_layout
from quick.formats.weights import QuantizedWeight
from quick.models.moe import experts_modules
from quick.nn.linear import QuickLinear
from quick.nn.moe import QuickMoEExperts

KINDS = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "glm4_moe", "deepseek_v3", "glm4_moe_lite", "minimax_m2",
         "ernie4_5_moe")  # fmt: skip
FORMATS = ("awq", "gptq", "compressed-tensors")
G = 32
# Logits of the loaded fp16 model (CPU reference path: fp16 activations at every product) against transformers' fp32
# model holding the same dequantized weights: measured 1.7e-3 to 2.9e-3; the same weights on the wrong experts: ~1.
BOUND = 1e-2
CHECKPOINT_NAMES = {"mixtral": ("w1", "w3", "w2")}
CHECKPOINT_BLOCK = {"mixtral": "block_sparse_moe"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def draw(k: int, n: int, gen: torch.Generator, sym: bool) -> QuantizedWeight:
    """Random 4-bit codes ``[K, N]``, fp16 group scales and zero points (8 when symmetric)."""
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // G, n, generator=gen) * 0.04 + 0.01).half()
    zeros = torch.full((k // G, n), 8, dtype=torch.uint8)
    if not sym:
        zeros = torch.randint(0, 16, (k // G, n), generator=gen, dtype=torch.uint8)
    return QuantizedWeight(q, scales, zeros, G)


def gptq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``): codes packed along K, zero points minus one
    packed along N, ``g_idx`` of a model quantized without act-order."""
    k, _ = qw.q.shape
    return {
        "qweight": pack_nibbles(qw.q.t().contiguous()).t().contiguous(),
        "qzeros": pack_nibbles(qw.zeros.to(torch.int16).sub(1).to(torch.uint8)),
        "scales": qw.scales,
        "g_idx": (torch.arange(k) // G).to(torch.int32),
    }


def ct_tensors(qw: QuantizedWeight) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors' own PackedQuantizationCompressor output for the weight ``qw`` holds (asymmetric groups),
    and its own decompressed weight ``[N, K]`` in fp32."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=G)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    w = qw.dequantize(torch.float32).t().contiguous()
    zp = (qw.zeros.to(torch.int8) - 8).t().contiguous()
    state = {"weight": w, "weight_scale": qw.scales.t().contiguous(), "weight_zero_point": zp}
    stored = PackedQuantizationCompressor.compress(state, scheme)
    oracle = {**stored, "weight_scale": stored["weight_scale"].float()}
    return stored, PackedQuantizationCompressor.decompress(oracle, scheme)["weight"].float()


def quant_config(fmt: str) -> dict:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm"}
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": G, "sym": True, "desc_act": False,
                "checkpoint_format": "gptq"}  # fmt: skip
    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": G, "symmetric": False}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head", "re:.*shared_expert_gate"]}  # fmt: skip


def write_checkpoint(
    kind: str, fmt: str, out: Path, seed: int = 0, published: bool = True
) -> tuple[torch.nn.Module, dict]:
    """A tiny ``kind`` MoE model saved in ``fmt`` the way that library writes MoE models (every expert linear and
    every attention / shared-expert linear quantized, routers and the shared expert's gate 16-bit), under the family's
    published tensor names, or (``published`` False) under the names of experts split out of transformers' module
    (``mlp.experts.{e}.gate_proj``, as llm-compressor saves them). Returns transformers' fp32 model holding the stored
    weights dequantized, and ``{experts module: (gate_up [E, 2I, H], down [E, H, I])}`` of those weights."""
    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    model = tiny_moe(kind, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sym = fmt == "gptq"
    tensors: dict[str, torch.Tensor] = {}

    def store(prefix: str, qw: QuantizedWeight) -> torch.Tensor:
        """Write one quantized linear; returns its dense weight ``[N, K]`` as the format's own reader sees it."""
        if fmt == "awq":
            parts, dense = get_layout("awq_gemm").pack(qw), qw.dequantize(torch.float32).t()
        elif fmt == "gptq":
            parts, dense = gptq_tensors(qw), qw.dequantize(torch.float32).t()
        else:
            parts, dense = ct_tensors(qw)
            parts["weight_shape"] = torch.tensor([qw.q.shape[1], qw.q.shape[0]], dtype=torch.int64)
        for t, v in parts.items():
            tensors[f"{prefix}.{t}"] = v
        return dense

    experts = experts_modules(model)
    dense_experts = {}
    with torch.no_grad():
        for name, mod in experts.items():
            e, two_i, h = mod.gate_up_proj.shape
            i = two_i // 2
            linearized = ("gate_proj", "up_proj", "down_proj")
            gate_n, up_n, down_n = CHECKPOINT_NAMES.get(kind, linearized) if published else linearized
            gu, dn = torch.empty(e, two_i, h), torch.empty(e, h, i)
            for x in range(e):
                gu[x, :i] = store(f"{name}.{x}.{gate_n}", draw(h, i, gen, sym))
                gu[x, i:] = store(f"{name}.{x}.{up_n}", draw(h, i, gen, sym))
                dn[x] = store(f"{name}.{x}.{down_n}", draw(i, h, gen, sym))
            mod.gate_up_proj.copy_(gu)
            mod.down_proj.copy_(dn)
            dense_experts[name] = (gu, dn)
            # a decisive router: init-scale logits leave near-ties that fp16 and fp32 break differently; sigmoid
            # scores (DeepSeek, GLM) would saturate into ties, so there a spaced correction bias decides
            router = model.get_submodule(name.rpartition(".")[0] + ".gate")
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.copy_(torch.arange(e, dtype=torch.float32))
            else:
                router.weight.mul_(40)
        for name, lin in list(model.named_modules()):
            if isinstance(lin, torch.nn.Linear) and name != "lm_head" and not name.endswith("shared_expert_gate"):
                lin.weight.copy_(store(name, draw(lin.in_features, lin.out_features, gen, sym)))
    state = model.state_dict()
    for key, t in state.items():
        prefix = key.rpartition(".")[0]
        if key.endswith(("gate_up_proj", "down_proj")) and prefix in experts:
            continue  # stored per expert above
        if f"{prefix}.weight" == key and any(k.startswith(prefix + ".") and k != key for k in tensors):
            continue  # a quantized linear
        tensors[key] = t.half()
    block = CHECKPOINT_BLOCK.get(kind) if published else None
    if block:  # the published names of the block (transformers renames them on load)
        tensors = {k.replace(".mlp.", f".{block}.", 1): v for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quant_config(fmt)
    cfg["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg))
    return model.float().eval(), dense_experts


def assert_same_experts_and_logits(model: torch.nn.Module, again: torch.nn.Module) -> None:
    """Two loads of one model: every expert stack bit-identical, the same logits."""
    for name, mod in experts_modules(model).items():
        other = again.get_submodule(name)
        for a, b in ((mod.gate_up, other.gate_up), (mod.down, other.down)):
            assert all(torch.equal(a.packed()[t], b.packed()[t]) for t in a.tensor_names())
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, again(ids()).logits)


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_per_expert_checkpoint_loads_into_stacks(kind, fmt, tmp_path):
    ref, dense = write_checkpoint(kind, fmt, tmp_path / "ckpt")
    model = load_quantized(tmp_path / "ckpt", layout="quick")
    loaded = experts_modules(model)
    assert set(loaded) == set(dense) and all(isinstance(m, QuickMoEExperts) for m in loaded.values())
    for name, mod in loaded.items():
        gu, dn = mod.dequantized_weights(torch.float32)  # exactly what the files hold, expert by expert
        torch.testing.assert_close(gu, dense[name][0], rtol=0, atol=0)
        torch.testing.assert_close(dn, dense[name][1], rtol=0, atol=0)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.o_proj"), QuickLinear)
    router = ref.get_submodule("model.layers.1.mlp.gate").weight
    torch.testing.assert_close(model.get_submodule("model.layers.1.mlp.gate").weight.float(), router.half().float())
    with torch.no_grad():
        got, want = model(ids()).logits, ref(ids()).logits
        assert rel(got, want) < BOUND, rel(got, want)
        swapped = ref.get_submodule(next(iter(dense))).gate_up_proj
        swapped.copy_(swapped.roll(1, 0))  # a negative control: the same weights on the wrong experts
        assert rel(got, ref(ids()).logits) > 3 * BOUND


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_linearized_expert_names_load_too(fmt, tmp_path):
    """Mixtral's experts split out of transformers' fused module keep the module's names (``mlp.experts.{e}.gate_proj``,
    not ``block_sparse_moe.experts.{e}.w1``): llm-compressor saves them so."""
    _, dense = write_checkpoint("mixtral", fmt, tmp_path / "ckpt", published=False)
    model = load_quantized(tmp_path / "ckpt", layout="quick")
    for name, mod in experts_modules(model).items():
        torch.testing.assert_close(mod.dequantized_weights(torch.float32)[1], dense[name][1], rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_per_expert_checkpoint_converts_to_quick(fmt, tmp_path):
    """Load, save in QUICK's stacked form, load again: the same experts, bit for bit, and the same logits."""
    write_checkpoint("mixtral", fmt, tmp_path / "ckpt")
    model = load_quantized(tmp_path / "ckpt", layout="quick")
    save_quantized(model, tmp_path / "quick")
    again = load_quantized(tmp_path / "quick")
    assert_same_experts_and_logits(model, again)


def test_per_expert_checkpoint_repacks_for_hopper(tmp_path):
    """The default layout on a CUDA device is quick_sm90; a CPU load asked for it packs the same experts."""
    _, dense = write_checkpoint("qwen3_moe", "gptq", tmp_path / "ckpt")
    model = load_quantized(tmp_path / "ckpt", layout="quick_sm90")
    for name, mod in experts_modules(model).items():
        assert mod.layout_name == "quick_sm90"
        torch.testing.assert_close(mod.dequantized_weights(torch.float32)[0], dense[name][0], rtol=0, atol=0)


def _edit(path: Path, fn) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_missing_expert_tensor_is_named(fmt, tmp_path):
    write_checkpoint("qwen3_moe", fmt, tmp_path)
    _edit(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.qweight"))
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj\.qweight"):
        load_quantized(tmp_path, layout="quick")


def test_extra_expert_is_an_error(tmp_path):
    write_checkpoint("mixtral", "awq", tmp_path)

    def add(t):
        for part in ("qweight", "qzeros", "scales"):
            for lin in ("w1", "w2", "w3"):
                t[f"model.layers.0.block_sparse_moe.experts.4.{lin}.{part}"] = t[
                    f"model.layers.0.block_sparse_moe.experts.3.{lin}.{part}"
                ].clone()

    _edit(tmp_path, add)
    with pytest.raises(CheckpointError, match="more than the config's 4 experts"):
        load_quantized(tmp_path, layout="quick")


def test_act_order_experts_are_refused(tmp_path):
    write_checkpoint("qwen3_moe", "gptq", tmp_path)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(3))

    def permute(t):
        g_idx = torch.empty(64, dtype=torch.int32)
        g_idx[order] = (torch.arange(64) // G).to(torch.int32)
        t["model.layers.0.mlp.experts.2.gate_proj.g_idx"] = g_idx

    _edit(tmp_path, permute)
    with pytest.raises(CheckpointError, match=r"experts\.2\.gate_proj.*act-order"):
        load_quantized(tmp_path, layout="quick")


def test_corrupt_expert_scales_are_named(tmp_path):
    write_checkpoint("qwen3_moe", "awq", tmp_path)
    _edit(tmp_path, lambda t: t["model.layers.0.mlp.experts.1.down_proj.scales"].view(-1)[3].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=r"experts\.1\.down_proj"):
        load_quantized(tmp_path, layout="quick")


def test_quick_convert_cli_on_a_moe_checkpoint(tmp_path, capsys):
    from quick.cli import main as cli_main

    write_checkpoint("qwen2_moe", "compressed-tensors", tmp_path / "ckpt")
    assert cli_main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--layout", "quick"]) == 0
    assert "and 4 expert stacks" in capsys.readouterr().out
    src, out = load_quantized(tmp_path / "ckpt", layout="quick"), load_quantized(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(src(ids()).logits, out(ids()).logits)


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_expert_bias_is_refused_not_dropped(fmt, tmp_path):
    write_checkpoint("qwen3_moe", fmt, tmp_path)
    _edit(tmp_path, lambda t: t.__setitem__("model.layers.0.mlp.experts.3.down_proj.bias", torch.zeros(64).half()))
    with pytest.raises(CheckpointError, match=r"experts\.3\.down_proj\.bias.*bias"):
        load_quantized(tmp_path, layout="quick")


@pytest.mark.parametrize("kind", KINDS)
def test_moe_model_saves_in_autoawq_format_one_linear_per_expert(kind, tmp_path):
    """AutoAWQ's GEMM format for a MoE model: each expert's gate, up and down linear under the family's published
    names (what AutoAWQ, vLLM and transformers read), holding exactly the stacks' weights; it loads back to the same
    stacks and logits."""
    from safetensors import safe_open

    from quick.checkpoint import make_quant_config

    write_checkpoint(kind, "gptq", tmp_path / "ckpt")
    model = load_quantized(tmp_path / "ckpt", layout="quick")
    save_quantized(model, tmp_path / "awq", make_quant_config("awq_gemm", G))
    keys = set()
    for f in (tmp_path / "awq").glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    block, (gate, up, down) = CHECKPOINT_BLOCK.get(kind, "mlp"), CHECKPOINT_NAMES.get(kind, ("gate_proj", "up_proj",
                                                                                              "down_proj"))  # fmt: skip
    for lin in (gate, up, down):
        assert {f"model.layers.1.{block}.experts.3.{lin}.{t}" for t in ("qweight", "qzeros", "scales")} <= keys
    assert f"model.layers.0.{block}.gate.weight" in keys and not any(".gate_up." in k for k in keys)
    again = load_quantized(tmp_path / "awq", layout="quick")
    assert_same_experts_and_logits(model, again)
