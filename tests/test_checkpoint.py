"""Quantized checkpoints: bit-identical round trips, corrupt files, AutoAWQ GEMM import, convert, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quick.auto import AutoQuickForCausalLM, quantize_model_rtn
from quick.checkpoint import (
    INDEX_NAME,
    CheckpointError,
    load_quantized,
    make_quant_config,
    save_quantized,
)
from quick.cli import main as cli_main
from quick.nn.linear import QuickLinear

transformers = pytest.importorskip("transformers")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of each int32 holds column 8j + AWQ_ORDER[i]


def tiny_llama(hidden: int = 64, inter: int = 128, tie: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        intermediate_size=inter,
        vocab_size=256,
        num_attention_heads=4,
        num_key_value_heads=2 if hidden >= 128 else 4,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def quantized(group_size: int = 32, **kw) -> torch.nn.Module:
    return quantize_model_rtn(tiny_llama(**kw), group_size, scale_dtype=torch.float16)


def shard_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize(
    ("group_size", "tie", "shard"),
    [(32, False, None), (128, True, None), (64, False, 20_000)],  # 128 with K=64/128: ragged -> padded layers
)
def test_round_trip_bit_identical(tmp_path, group_size, tie, shard):
    model = quantized(group_size, tie=tie)
    ref = logits(model)
    kw = {} if shard is None else {"max_shard_size": shard}
    out = save_quantized(model, tmp_path / "ck", make_quant_config("quick", group_size), **kw)
    files = shard_files(out)
    assert (len(files) > 1) == (shard is not None)
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quick" and qc["version"] == "quick" and qc["bits"] == 4
    assert qc["group_size"] == group_size and qc["zero_point"] is True and "lm_head" in qc["modules_to_not_convert"]
    if tie:
        assert "lm_head.weight" not in index["weight_map"]

    loaded = load_quantized(out, dtype=torch.float32)
    assert torch.equal(logits(loaded), ref)
    packed = [m for m in loaded.modules() if isinstance(m, QuickLinear)]
    assert len(packed) == 14
    if group_size == 128:
        # K=64 (q/k/v/o/gate/up) is a ragged group of 128: stored padded; down_proj (K=128) is not
        assert sum(m.in_features != m.logical_in_features for m in packed) == 12
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for name, m in model.named_modules():
        if isinstance(m, QuickLinear):
            other = loaded.get_submodule(name)
            for t, v in m.packed().items():
                assert torch.equal(getattr(other, t), v), (name, t)


def test_round_trip_awq_layout_and_mixed_group_sizes(tmp_path):
    model = quantized(32)
    # one layer with another group size: recorded by name, loaded strictly
    lin = torch.nn.Linear(128, 64, bias=False)
    from quick.nn.dtypes import set_compute_dtype

    model.model.layers[0].mlp.down_proj = QuickLinear.from_linear(lin, 64, "quick", True, torch.float16)
    set_compute_dtype(model, torch.float32)
    ref = logits(model)
    out = save_quantized(model, tmp_path / "mixed", make_quant_config("quick", 32))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["module_group_sizes"] == {"model.layers.0.mlp.down_proj": 64}
    assert torch.equal(logits(load_quantized(out, dtype=torch.float32)), ref)
    with pytest.raises(CheckpointError, match="one group size"):
        save_quantized(model, tmp_path / "awq", make_quant_config("awq_gemm", 32))

    with pytest.raises(CheckpointError, match="ragged"):  # K=64 at g128: AutoAWQ could not read it
        save_quantized(quantized(128), tmp_path / "awq_ragged", make_quant_config("awq_gemm", 128))
    assert not (tmp_path / "awq_ragged").exists()

    uniform = quantized(32)
    ref = logits(uniform)
    out = save_quantized(uniform, tmp_path / "awq2", make_quant_config("awq_gemm", 32))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["version"]) == ("awq", "gemm")
    assert "model.layers.0.self_attn.q_proj.qzeros" in load_file(shard_files(out)[0])
    assert torch.equal(logits(load_quantized(out, dtype=torch.float32)), ref)


# ------------------------------------------------------------------------------------ corrupt files


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_quantized(quantized(32), tmp_path / "ck", make_quant_config("quick", 32))


def test_truncated_shard_is_a_clear_error(checkpoint):
    f = shard_files(checkpoint)[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{f.name}.*truncated"):
        load_quantized(checkpoint, verify=False)


def test_corrupt_header_is_a_clear_error(checkpoint):
    f = shard_files(checkpoint)[0]
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f.name):
        load_quantized(checkpoint, verify=False)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("model.layers.1.self_attn.q_proj.scales", (3, 64)),
        ("model.layers.0.mlp.up_proj.qweight", (4, 128)),  # needs [K/16, 2N] = (4, 256)
        ("model.layers.0.input_layernorm.weight", (63,)),
    ],
)
def test_wrong_shape_error_names_the_tensor(checkpoint, key, shape):
    f = shard_files(checkpoint)[0]
    tensors = load_file(f)
    tensors[key] = torch.zeros(shape, dtype=tensors[key].dtype)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_quantized(checkpoint, verify=False)


def test_wrong_dtype_error_names_the_tensor(checkpoint):
    f = shard_files(checkpoint)[0]
    tensors = load_file(f)
    key = "model.layers.0.self_attn.v_proj.qweight"
    tensors[key] = tensors[key].float()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_quantized(checkpoint, verify=False)


def test_missing_tensor_is_an_error(checkpoint):
    f = shard_files(checkpoint)[0]
    tensors = load_file(f)
    del tensors["model.norm.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    index = json.loads((checkpoint / INDEX_NAME).read_text())
    del index["weight_map"]["model.norm.weight"]
    (checkpoint / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_quantized(checkpoint, verify=False)


def test_unsupported_awq_version(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gemv"):
        load_quantized(checkpoint, verify=False)


# ------------------------------------------------------------------------------------------ AutoAWQ


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM packing, written from its format description (independent of quick.packing)."""
    k, n = codes.shape
    c = codes.to(torch.int64).reshape(k, n // 8, 8)
    word = torch.zeros(k, n // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        word |= c[:, :, col] << (4 * i)
    return (word - ((word >> 31) & 1) * (1 << 32)).to(torch.int32)  # two's complement int32


def write_autoawq_checkpoint(model: torch.nn.Module, out: Path, group_size: int = 128) -> None:
    """An AutoAWQ GEMM export of ``model``'s packed layers: config + safetensors + index, AutoAWQ's names."""
    out.mkdir()
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, QuickLinear):
            qw = m.unpack()
            tensors[f"{name}.qweight"] = awq_pack(qw.q)
            tensors[f"{name}.qzeros"] = awq_pack(qw.zeros)
            tensors[f"{name}.scales"] = qw.scales.clone()
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] not in dict(model.named_modules()) or not isinstance(
            model.get_submodule(key.rpartition(".")[0]), QuickLinear
        ):
            tensors[key] = t.half().clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    cfg["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def autoawq(tmp_path) -> tuple[Path, torch.Tensor, torch.nn.Module]:
    source = quantized(128, hidden=128, inter=256)  # K multiple of 128, as AutoAWQ requires
    write_autoawq_checkpoint(source, tmp_path / "awq")
    return tmp_path / "awq", logits(source), source


def test_autoawq_gemm_checkpoint_loads_with_same_outputs(autoawq):
    path, ref, source = autoawq
    model = load_quantized(path, dtype=torch.float32)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, QuickLinear)}
    assert len(packed) == 14 and {m.layout_name for m in packed.values()} == {"quick"}  # repacked
    for name, m in packed.items():  # the same codes, scales and zeros: no requantization
        a, b = m.unpack(), source.get_submodule(name).unpack()
        assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert torch.equal(logits(model), ref)


def test_autoawq_checkpoint_keep_layout(autoawq):
    path, ref, _ = autoawq
    model = load_quantized(path, dtype=torch.float32, layout="awq_gemm")
    assert {m.layout_name for m in model.modules() if isinstance(m, QuickLinear)} == {"awq_gemm"}
    assert torch.equal(logits(model), ref)


def test_quick_convert_round_trip(autoawq, tmp_path, capsys):
    path, ref, source = autoawq
    out = tmp_path / "converted"
    assert cli_main(["convert", str(path), str(out)]) == 0
    assert "repacked 14 layers" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["group_size"]) == ("quick", "quick", 128)
    converted = load_quantized(out, dtype=torch.float32)
    assert torch.equal(logits(converted), ref)
    for name, m in source.named_modules():  # the converted tensors are the QUICK packing of the same codes
        if isinstance(m, QuickLinear):
            for t, v in m.packed().items():
                assert torch.equal(getattr(converted.get_submodule(name), t), v)
    auto = AutoQuickForCausalLM.from_pretrained(out, device="cpu")
    assert auto.is_quantized and auto.quant_config["q_group_size"] == 128
    assert torch.equal(logits(auto.model), ref)


# ------------------------------------------------------------------------------------------- atomicity


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model = quantized(32)
    import quick.checkpoint as ck

    calls = {"n": 0}
    real = ck.save_file

    def failing(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard: a crash in the middle of the save
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", failing)
    target = tmp_path / "ck"
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, target, max_shard_size=20_000)
    assert calls["n"] == 2
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path):
    model = quantized(32)
    ref = logits(model)
    target = save_quantized(model, tmp_path / "ck")

    def boom(_tmp):
        raise RuntimeError("killed before publishing")

    with pytest.raises(RuntimeError, match="killed"):
        save_quantized(quantized(64, seed=1), target, _before_publish=boom)
    assert torch.equal(logits(load_quantized(target, dtype=torch.float32)), ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    # and a successful overwrite replaces it
    other = quantized(64, seed=1)
    save_quantized(other, target)
    assert torch.equal(logits(load_quantized(target, dtype=torch.float32)), logits(other))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ------------------------------------------------------------------------------------------ auto API


def test_quant_config_validation():
    from quick.auto import validate_quant_config
    from quick.formats.weights import QuantizationError

    assert validate_quant_config({"version": "gemm"})["version"] == "awq_gemm"
    for bad, match in [
        ({"w_bit": 3}, "w_bit"),
        ({"q_group_size": 96}, "q_group_size"),
        ({"version": "marlin"}, "marlin"),
        ({"zero_point": "yes"}, "zero_point"),
        ({"group_size": 128}, "unknown"),
    ]:
        with pytest.raises(QuantizationError, match=match):
            validate_quant_config(bad)


# ------------------------------------------------------------------------------- checksums, permissions


def zero_middle(f: Path, fraction: float = 0.3) -> None:
    """Zero a run of bytes in the middle of ``f`` (tensor data; the header at the start stays intact)."""
    data = bytearray(f.read_bytes())
    n = int(len(data) * fraction)
    start = (len(data) - n) // 2
    data[start : start + n] = bytes(n)
    f.write_bytes(bytes(data))


def test_checksums_recorded_per_shard(checkpoint):
    index = json.loads((checkpoint / INDEX_NAME).read_text())
    digests = index["metadata"]["sha256"]
    assert sorted(digests) == sorted(p.name for p in shard_files(checkpoint))
    import hashlib

    for name, digest in digests.items():
        assert hashlib.sha256((checkpoint / name).read_bytes()).hexdigest() == digest


def test_zeroed_bytes_in_a_shard_fail_with_a_clear_error(checkpoint, capsys):
    shard = shard_files(checkpoint)[0]
    zero_middle(shard)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: SHA-256 .* does not match .*verify=False"):
        load_quantized(checkpoint)
    with pytest.raises(CheckpointError, match="SHA-256"):
        AutoQuickForCausalLM.from_quantized(checkpoint, device="cpu")
    # the opt-out reads the (corrupt) bytes without hashing them
    load_quantized(checkpoint, verify=False)
    AutoQuickForCausalLM.from_quantized(checkpoint, device="cpu", verify=False)
    assert cli_main(["convert", str(checkpoint), str(checkpoint.parent / "conv")]) != 0
    assert "SHA-256" in capsys.readouterr().err and not (checkpoint.parent / "conv").exists()
    assert cli_main(["convert", "--no-verify", str(checkpoint), str(checkpoint.parent / "conv")]) == 0


def test_checksum_index_errors(checkpoint):
    index_path = checkpoint / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["metadata"]["sha256"] = {"../elsewhere.safetensors": "00"}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file of the checkpoint"):
        load_quantized(checkpoint)
    del index["metadata"]["sha256"]  # written by an older version or by hand: nothing to verify
    index_path.write_text(json.dumps(index))
    load_quantized(checkpoint)


def test_saved_checkpoint_is_readable_by_others(tmp_path):
    import os
    import stat

    old = os.umask(0o077)  # even under a strict umask the published files are shareable
    try:
        out = save_quantized(quantized(), tmp_path / "ck", max_shard_size=40_000)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(shard_files(out)) > 1 and files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name
