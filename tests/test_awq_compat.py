"""The AutoAWQ-compatible API (quick.awq): the seed's script runs unchanged, AutoAWQ's keyword arguments are
translated, warned about or refused, and the AutoAWQ GEMM layout is refused before calibration when it cannot hold
the model."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from helpers import smollm2_llama_config

from quick.auto import AutoQuickForCausalLM, validate_quant_config
from quick.awq import AutoAWQForCausalLM, _device, parse_shard_size
from quick.formats.weights import QuantizationError
from quick.nn.linear import QuickLinear

transformers = pytest.importorskip("transformers")

SEED_CONFIG = {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "QUICK"}
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Quantization maps weights to a few levels; activation-aware scaling keeps the salient channels. " * 20,
]


def _byte_tokenizer():
    """A 256-token byte-level tokenizer built offline (no hub): each byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


def _dense_dir(path: Path, **overrides) -> Path:
    """A 2-layer random Llama (hidden 128, vocab 256) and its byte tokenizer, saved as a dense fp16 checkpoint."""
    torch.manual_seed(0)
    kw = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    cfg = smollm2_llama_config(**{**kw, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.to(torch.float16).save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return _dense_dir(tmp_path_factory.mktemp("dense") / "model")


def _packed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] in ("qweight", "scales", "zeros")}


def test_seed_script_runs_unchanged(dense, tmp_path):
    """The AutoAWQ calls of the seed's README, with the keyword arguments AutoAWQ users pass."""
    from transformers import AutoTokenizer

    model = AutoAWQForCausalLM.from_pretrained(
        dense, trust_remote_code=True, safetensors=True, device_map="auto", low_cpu_mem_usage=True, use_cache=False
    )
    tokenizer = AutoTokenizer.from_pretrained(dense, trust_remote_code=True)
    model.quantize(
        tokenizer,
        quant_config=SEED_CONFIG,
        calib_data=TEXTS,
        split="train",
        text_column="text",
        duo_scaling=True,
        max_calib_samples=4,
        max_calib_seq_len=64,
        n_parallel_calib_samples=2,
    )
    assert model.is_quantized and model.quant_config["version"] == "quick"
    model.save_quantized(tmp_path / "q", safetensors=True, shard_size="200KB")
    assert len(list((tmp_path / "q").glob("*.safetensors"))) > 1  # shard_size honoured
    loaded = AutoAWQForCausalLM.from_quantized(tmp_path / "q", fuse_layers=True, max_seq_len=512, batch_size=1)
    assert hasattr(loaded.model.model.layers[0].self_attn, "qkv_proj")  # fused q/k/v
    ids = tokenizer("The quick", return_tensors="pt").input_ids
    out = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    plain = AutoAWQForCausalLM.from_quantized(tmp_path / "q", fuse_layers=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, plain(ids).logits, rtol=0, atol=1e-4)
        assert torch.equal(plain(ids).logits, model(ids).logits)


def test_arguments_translate_to_auto_quick(dense):
    """max_calib_samples / max_calib_seq_len / n_parallel_calib_samples / duo_scaling / apply_clip map onto
    AutoQuickForCausalLM.quantize: both APIs produce the same packed tensors."""
    tok = _byte_tokenizer()
    a = AutoAWQForCausalLM.from_pretrained(dense)
    a.quantize(tok, SEED_CONFIG, calib_data=TEXTS, max_calib_samples=4, max_calib_seq_len=64, apply_clip=False)
    b = AutoQuickForCausalLM.from_pretrained(dense)
    b.quantize(tok, SEED_CONFIG, calib_data=TEXTS, n_samples=4, seqlen=64, duo_scaling=True, apply_clip=False)
    sa, sb = _packed_state(a.model), _packed_state(b.model)
    assert sa.keys() == sb.keys() and len(sa) == 3 * 14
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gemm_layout_is_refused_before_calibration(dense):
    """K = 576 is not a multiple of 128: the AutoAWQ GEMM format cannot store it. Refused up front (not at save time
    after the whole calibration), with the way out in the message."""
    path = _dense_dir(dense.parent / "k576", hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    model = AutoAWQForCausalLM.from_pretrained(path)
    config = {**SEED_CONFIG, "version": "GEMM"}
    with pytest.raises(QuantizationError, match=r"ragged last group.*K=576.*version 'quick'.*\[32, 64\]"):
        model.quantize(_byte_tokenizer(), config, calib_data=TEXTS)
    assert not model.is_quantized and not any(isinstance(m, QuickLinear) for m in model.model.modules())


def test_gemm_layout_where_it_fits(dense, tmp_path):
    model = AutoAWQForCausalLM.from_pretrained(dense)
    model.quantize(quant_config={**SEED_CONFIG, "version": "GEMM"}, calib_data=torch.randint(0, 256, (4, 32)))
    out = model.save_quantized(tmp_path / "gemm")
    assert '"quant_method": "awq"' in (out / "config.json").read_text()


def test_cli_refuses_gemm_before_quantizing(dense, tmp_path, capsys):
    from quick.cli import main

    path = _dense_dir(dense.parent / "k576cli", hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    rc = main(["quantize", str(path), str(tmp_path / "out"), "--version", "gemm", "--method", "rtn", "--device", "cpu"])
    assert rc == 2 and not (tmp_path / "out").exists()
    assert "ragged last group" in capsys.readouterr().err


def test_modules_to_not_convert(dense):
    """With RTN any linear can stay dense; AWQ calibrates a layer's linears as groups and says so; names outside
    the decoder layers (a vision tower) are accepted by both."""
    ids = torch.randint(0, 256, (4, 32))
    model = AutoAWQForCausalLM.from_pretrained(dense)
    model.quantize(quant_config={**SEED_CONFIG, "modules_to_not_convert": ["down_proj"]}, calib_data=ids, method="rtn")
    layer = model.model.model.layers[0]
    assert type(layer.mlp.down_proj) is torch.nn.Linear and isinstance(layer.mlp.up_proj, QuickLinear)
    assert "down_proj" in model._skip
    model = AutoAWQForCausalLM.from_pretrained(dense)
    with pytest.raises(QuantizationError, match="method='rtn'"):
        model.quantize(quant_config={**SEED_CONFIG, "modules_to_not_convert": ["down_proj"]}, calib_data=ids)
    model.quantize(quant_config={**SEED_CONFIG, "modules_to_not_convert": ["vision_tower"]}, calib_data=ids)
    assert isinstance(model.model.model.layers[0].mlp.down_proj, QuickLinear)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"export_compatible": True}, "export_compatible"),
        ({"quantizer_cls": object}, "quantizer_cls"),
        ({"quant_config": {**SEED_CONFIG, "version": "GEMV"}}, "GEMV, Marlin"),
        ({"quant_config": {**SEED_CONFIG, "w_bit": 3}}, "4-bit only"),
        ({"quant_config": {**SEED_CONFIG, "modules_to_not_convert": "lm_head"}}, "list of module-name"),
    ],
)
def test_unsupported_requests_are_clear_errors(dense, kwargs, match):
    model = AutoAWQForCausalLM.from_pretrained(dense)
    kwargs = {"quant_config": SEED_CONFIG, **kwargs}
    with pytest.raises(QuantizationError, match=match):
        model.quantize(_byte_tokenizer(), calib_data=TEXTS, **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="the datasets package is installed")
def test_hub_calibration_name_without_datasets_explains(dense):
    model = AutoAWQForCausalLM.from_pretrained(dense)
    with pytest.raises(QuantizationError, match=r"'pileval'.*datasets.*calib_data=None"):
        model.quantize(_byte_tokenizer(), SEED_CONFIG, calib_data="pileval")


def test_ignored_arguments_warn(dense, tmp_path):
    model = AutoAWQForCausalLM.from_pretrained(dense)
    model.quantize(quant_config=SEED_CONFIG, calib_data=torch.randint(0, 256, (4, 32)), max_chunk_memory=2**20)
    with pytest.warns(UserWarning, match="safetensors=False ignored"):
        model.save_quantized(tmp_path / "q", safetensors=False)
    with pytest.warns(UserWarning, match="use_exllama=True ignored"):
        AutoAWQForCausalLM.from_quantized(tmp_path / "q", use_exllama=True, fuse_layers=False)
    with pytest.warns(UserWarning, match=r"ignoring arguments.*attn_implementation"):
        AutoAWQForCausalLM.from_pretrained(dense, attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # AutoAWQ's memory / cache knobs are accepted quietly
        AutoAWQForCausalLM.from_quantized(tmp_path / "q", max_seq_len=4096, batch_size=4, fuse_layers=False)


def test_constructor_and_device_maps():
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoAWQForCausalLM()
    assert _device("auto") is None and _device("balanced") is None and _device(None) is None
    assert _device("cpu") == "cpu" and _device({"": "cpu"}) == "cpu" and _device(0) == "cuda:0"
    with pytest.raises(ValueError, match="one device"):
        _device({"model.layers.0": 0, "model.layers.1": 1})


def test_shard_sizes():
    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("500MiB") == 500 * 2**20
    assert parse_shard_size(1234) == 1234 and parse_shard_size(None) is None
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(ValueError, match="shard_size"):
            parse_shard_size(bad)


def test_quant_config_accepts_autoawq_keys():
    qc = validate_quant_config({**SEED_CONFIG, "modules_to_not_convert": ["vision_tower"]})
    assert qc["version"] == "quick" and qc["modules_to_not_convert"] == ["vision_tower"]
    assert validate_quant_config({**SEED_CONFIG, "version": "GEMM"})["version"] == "awq_gemm"


def test_main_names_from_quick():
    import quick

    assert quick.AutoAWQForCausalLM is AutoAWQForCausalLM and quick.AutoQuickForCausalLM is AutoQuickForCausalLM
    assert "AutoAWQForCausalLM" in dir(quick) and isinstance(quick.__version__, str)
