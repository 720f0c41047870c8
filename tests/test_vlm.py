"""Vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Mistral 3, LLaVA) on CPU: the text decoder is quantized
(AWQ, RTN), the vision encoder and projector stay 16-bit, checkpoints reload into transformers' image-text class."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import check_static_generation
from torch import nn

from quick.algorithms import awq
from quick.auto import quantize_model_rtn
from quick.checkpoint import load_quantized, save_quantized
from quick.models.families import get_family
from quick.models.loading import generation_class
from quick.nn.linear import QuickLinear
from quick.nn.moe import QuickMoEExperts

transformers = pytest.importorskip("transformers")

GROUP = 32
TEXT = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128)  # fmt: skip
MROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}
QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "mistral3", "llava")
VISION = ("visual", "vision_tower", "multi_modal_projector")


def tiny_vlm(kind: str) -> nn.Module:
    """A 2-layer random vision-language model (text hidden 64, vocab 256; a one-block vision encoder)."""
    if kind == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
        cfg = transformers.Qwen2VLConfig(text_config={**TEXT, "rope_scaling": MROPE}, vision_config=vision)
    elif kind == "qwen2_5_vl":
        cfg = transformers.Qwen2_5_VLConfig(text_config={**TEXT, "rope_scaling": MROPE},
                                            vision_config={**QWEN_VISION, "fullatt_block_indexes": [0]})  # fmt: skip
    elif kind in ("qwen3_vl", "qwen3_vl_moe"):
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        text, cls = {**TEXT, "head_dim": 16, "rope_scaling": rope}, transformers.Qwen3VLConfig
        if kind == "qwen3_vl_moe":  # top-2 of 8 experts in every layer
            text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
            cls = transformers.Qwen3VLMoeConfig
        cfg = cls(text_config=text, vision_config={**QWEN_VISION, "deepstack_visual_indexes": [0]})
    elif kind == "mistral3":
        cfg = transformers.Mistral3Config(
            text_config={**TEXT, "model_type": "mistral", "head_dim": 16},
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               head_dim=16),
        )  # fmt: skip
    else:
        cfg = transformers.LlavaConfig(
            text_config={**TEXT, "model_type": "llama"},
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
        )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(cfg).eval()
    with torch.no_grad():  # outlier channels in the text decoder's norms: what AWQ's scales are for
        for i, layer in enumerate(model.model.language_model.layers):
            layer.input_layernorm.weight[5 + i] = 8.0
            layer.post_attention_layernorm.weight[20] = 6.0
    return model


def ids(n: int = 2, seqlen: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def vision_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if any(v in n for v in VISION) and isinstance(m, nn.Linear)}


@pytest.mark.parametrize("kind", KINDS)
def test_text_decoder_quantized_vision_kept(kind, tmp_path):
    """AWQ packs every text-decoder linear and no vision one; the 4-bit model stays close to the float one and beats
    round-to-nearest; the checkpoint reloads into transformers' image-text class with identical logits."""
    model = tiny_vlm(kind)
    fam = get_family(model.config)
    assert generation_class(model.config) is transformers.AutoModelForImageTextToText
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    vision = vision_linears(model)
    assert vision  # the encoder has linears that a careless quantizer would pack
    q = awq.quantize_model_awq(copy.deepcopy(model), ids(4, 32, seed=1), GROUP, progress=False, min_expert_tokens=8)
    packed = [n for n, m in q.named_modules() if isinstance(m, (QuickLinear, QuickMoEExperts))]
    linears = 8 if kind == "qwen3_vl_moe" else 14  # per layer q, k, v, o and gate, up, down (or one experts stack)
    assert len(packed) == linears + (kind == "qwen3_vl_moe") * 2
    assert all(n.startswith("model.language_model.layers.") for n in packed)
    assert all(isinstance(q.get_submodule(n), nn.Linear) for n in vision)
    rtn = quantize_model_rtn(copy.deepcopy(model), GROUP, skip=fam.modules_to_not_convert)
    assert all(isinstance(rtn.get_submodule(n), nn.Linear) for n in vision)
    with torch.no_grad():
        out, out_rtn = q(input_ids=x).logits, rtn(input_ids=x).logits
    # measured 0.089-0.146 (AWQ) against 0.103-0.153 (RTN); a wrong fold gives errors of order 1
    assert rel(out, ref) < 0.2 and rel(out, ref) < rel(out_rtn, ref)
    loaded = load_quantized(save_quantized(q, tmp_path / "ckpt"), dtype=torch.float32)
    assert type(loaded) is type(model)
    # transformers' own loader (after `import quick`) reads the same checkpoint into the same layers
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert sum(isinstance(m, (QuickLinear, QuickMoEExperts)) for m in hf.modules()) == len(packed)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, out)
        assert torch.equal(hf(input_ids=x).logits, out)


def test_generation_class_keeps_causal_lms():
    """Causal LMs (and Gemma 3's multimodal class, which transformers lists as a causal LM) keep that class."""
    assert generation_class(transformers.LlamaConfig()) is transformers.AutoModelForCausalLM
    assert generation_class(transformers.Gemma3Config()) is transformers.AutoModelForCausalLM
    assert generation_class(transformers.Qwen2_5_VLConfig()) is transformers.AutoModelForImageTextToText


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "mistral3"])
def test_w4a8_quantizes_the_text_decoder_only(kind):
    """W4A8 (QQQ) packs the 14 text-decoder linears and leaves the vision encoder 16-bit; closer to the float model
    than W4A8 round-to-nearest."""
    from quick.algorithms.qqq import quantize_model_qqq
    from quick.algorithms.rtn import quantize_model_rtn_w4a8
    from quick.nn.linear_w4a8 import QuickLinearW4A8

    model = tiny_vlm(kind)
    fam = get_family(model.config)
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    q = quantize_model_qqq(copy.deepcopy(model), ids(4, 32, seed=1), group_size=-1, progress=False)
    rtn = quantize_model_rtn_w4a8(copy.deepcopy(model), skip=fam.modules_to_not_convert, progress=False)
    packed = [n for n, m in q.named_modules() if isinstance(m, QuickLinearW4A8)]
    assert len(packed) == 14 and all(n.startswith("model.language_model.layers.") for n in packed)
    assert all(isinstance(q.get_submodule(n), nn.Linear) for n in vision_linears(model))
    assert all(isinstance(rtn.get_submodule(n), nn.Linear) for n in vision_linears(model))
    with torch.no_grad():
        err_q, err_rtn = rel(q(input_ids=x).logits, ref), rel(rtn(input_ids=x).logits, ref)
    assert err_q < 0.3 and err_q < err_rtn, (err_q, err_rtn)


@pytest.mark.parametrize("kind", KINDS)
def test_static_generation_matches_generate(kind):
    """The static-cache generator (``quick generate --fast``) gives transformers' greedy tokens, also after a
    ``generate`` call left its state on the model (Qwen-VL keeps rope deltas that would read the static generator's
    4-D mask as padding)."""
    check_static_generation(tiny_vlm(kind), ids(1, 7, seed=1))


def word_tokenizer(vocab: int = 256):
    """A word-level fast tokenizer over ``w0 .. w{vocab-2}`` and ``[UNK]``, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 1)} | {"[UNK]": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_processor_files_travel_with_the_checkpoint(command, tmp_path):
    """A quantized (or converted) vision-language checkpoint keeps its source's image processor files, so the
    processor loads from the quantized directory as from the original."""
    from quick.auto import AutoQuickForCausalLM
    from quick.checkpoint import PROCESSOR_FILES

    src = tmp_path / "dense"
    tiny_vlm("qwen2_5_vl").save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    transformers.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12544).save_pretrained(src)
    assert (src / "preprocessor_config.json").is_file() and "preprocessor_config.json" in PROCESSOR_FILES
    model = AutoQuickForCausalLM.from_pretrained(src, device="cpu")
    model.quantize(quant_config={"q_group_size": GROUP}, method="rtn", progress=False)
    out = model.save_quantized(tmp_path / "w4")
    if command == "convert":  # the quantized directory as a source of its own: the files go along again
        from quick.cli import main

        assert main(["convert", str(out), str(tmp_path / "again"), "--layout", "quick"]) == 0
        out = tmp_path / "again"
    assert (out / "preprocessor_config.json").read_text() == (src / "preprocessor_config.json").read_text()
    want = transformers.AutoImageProcessor.from_pretrained(src).to_dict()
    assert transformers.AutoImageProcessor.from_pretrained(out).to_dict() == want
    assert not (out / "processor_config.json").exists()  # only what the source had
