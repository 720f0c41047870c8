"""W4A8 layers (``QuickLinearW4A8``) on the inference path of the W4A16 ones: q/k/v and gate/up fused at load time in
every storage (unpacked, ``w4a8``, ``w4a8_sm90``), kept unfused with a reason where they cannot be, saved and
reloaded fused or not. CPU reference path here; the ``gpu`` tests run the same on CUDA with the kernels."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import random_w4a8, tiny_causal_lm

from quick.algorithms.rtn import quantize_model_rtn_w4a8
from quick.checkpoint import load_quantized, save_quantized
from quick.formats.layouts import W4A8_LAYOUTS
from quick.formats.w4a8 import W4A8Weight
from quick.models.fuse import (
    FusedProjection,
    FusedSlice,
    FuseError,
    fuse_linears,
    fuse_model,
    split_linear,
    unfuse_model,
    unfused,
)
from quick.nn.dtypes import round_dense_
from quick.nn.linear_w4a8 import LAYOUT, UNPACKED, QuickLinearW4A8

transformers = pytest.importorskip("transformers")

STORAGES = [UNPACKED, *sorted(W4A8_LAYOUTS)]
GROUPS = [-1, 128]
FAMILIES = ["llama", "qwen3", "gemma3_text"]


def _gid(g: int) -> str:
    return "per_channel" if g == -1 else f"g{g}"


def _model(family: str, **overrides):
    """Two random decoder layers, hidden 128 (every W4A8 layout packs K = 128 and N = 64), norms made random so
    that a wrong or skipped norm shows."""
    torch.manual_seed(0)
    kw = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        model = tiny_causal_lm(transformers.LlamaConfig, **{**kw, "attention_bias": True, **overrides})
    elif family == "qwen3":
        model = tiny_causal_lm(transformers.Qwen3Config, **{**kw, "head_dim": 32, **overrides})
    elif family == "gemma3_text":
        model = tiny_causal_lm(
            transformers.Gemma3TextConfig,
            **kw,
            head_dim=32,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention"],
            rope_local_base_freq=100.0,
            **overrides,
        )
    else:
        raise KeyError(family)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
    return model


def _restore(model, storage: str) -> None:
    """Every W4A8 layer held in ``storage`` (same codes and scales: repacking is exact)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuickLinearW4A8):
            new = QuickLinearW4A8(
                mod.weight(),
                mod.bias,
                mod.dtype,
                mod.logical_in_features,
                pack=storage != UNPACKED,
                layout=LAYOUT if storage == UNPACKED else storage,
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)


def _w4a8_model(family: str, group: int, storage: str = "w4a8", **overrides):
    model = _model(family, **overrides)
    quantize_model_rtn_w4a8(model, group, dtype=torch.float16, progress=False)
    if storage != "w4a8":
        _restore(model, storage)
    storages = {m.storage for m in model.modules() if isinstance(m, QuickLinearW4A8)}
    assert storages == {storage}
    return model


def _layers(storage: str, group: int, ns=(64, 32, 96), k: int = 256) -> list[QuickLinearW4A8]:
    """W4A8 layers of one input (the second without bias), each N whole blocks of every layout."""
    gen = torch.Generator().manual_seed(0)
    mods = []
    for i, n in enumerate(ns):
        bias = None if i == 1 else torch.randn(n, generator=gen)
        w = torch.randn(n, k, generator=gen)
        packed = storage != UNPACKED
        layout = storage if packed else LAYOUT
        mods.append(QuickLinearW4A8.from_weight(w, group, bias, torch.float16, pack=packed, layout=layout))
    return mods


# ------------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("group", GROUPS, ids=_gid)
@pytest.mark.parametrize("layout", sorted(W4A8_LAYOUTS))
def test_packed_concat_equals_repack(layout, group):
    """The premise of fusing without repacking: the packed tensors of parts of whole column blocks, concatenated
    along N, are the packed tensors of the concatenated weights."""
    lay = W4A8_LAYOUTS[layout]
    nm, k = lay.n_multiple, 256
    parts = [random_w4a8(k, n, group, seed=i) for i, n in enumerate((2 * nm, nm, 3 * nm))]
    whole = W4A8Weight(
        torch.cat([p.q for p in parts], 0),
        torch.cat([p.channel_scale for p in parts], 0),
        None if group == -1 else torch.cat([p.group_scale for p in parts], 1),
        group,
    )
    want = lay.pack(whole)
    packed = [lay.pack(p) for p in parts]
    assert set(want) == set(packed[0])
    for name, t in want.items():
        assert torch.equal(torch.cat([p[name] for p in packed], dim=-1), t), name


@pytest.mark.parametrize("group", GROUPS, ids=_gid)
@pytest.mark.parametrize("storage", STORAGES)
def test_fused_layer_is_the_members_concatenated(storage, group):
    """Same storage, the members' codes and scales side by side, zeros for the missing bias, and on the reference
    path the members' outputs bit for bit (the integer sums and the per-column scaling do not depend on N).
    Splitting gives back the members' tensors exactly."""
    mods = _layers(storage, group)
    fused = fuse_linears(mods)
    assert isinstance(fused, QuickLinearW4A8) and fused.storage == storage
    assert fused.out_features == 192 and fused.group_size == group and fused.widen == all(m.widen for m in mods)
    w, parts = fused.weight(), [m.weight() for m in mods]
    assert torch.equal(w.q, torch.cat([p.q for p in parts], 0))
    assert torch.equal(w.channel_scale, torch.cat([p.channel_scale for p in parts], 0))
    if group > 0:
        assert torch.equal(w.group_scale, torch.cat([p.group_scale for p in parts], 1))
    assert torch.equal(fused.bias[64:96], torch.zeros(32, dtype=torch.float16))
    for x in (torch.randn(5, 256), torch.randn(2, 3, 256).half()):
        assert torch.equal(fused(x), torch.cat([m(x) for m in mods], dim=-1))
    owner = FusedProjection(fused, (64, 32, 96), ("q", "k", "v"), (True, False, True))
    back = split_linear(owner)
    for a, b in zip(back, mods, strict=True):
        assert a.storage == b.storage and (a.bias is None) == (b.bias is None)
        assert a.stored().keys() == b.stored().keys()
        for name, t in b.stored().items():
            assert torch.equal(a.stored()[name], t), name
        if b.bias is not None:
            assert torch.equal(a.bias, b.bias)


def test_mismatched_w4a8_layers_are_refused():
    a = _layers("w4a8", -1)[0]
    cases = [
        (_layers(UNPACKED, -1)[1], "different storage: w4a8 vs unpacked"),
        (_layers("w4a8_sm90", -1)[1], "different storage"),
        (_layers("w4a8", 128)[1], "different group_size"),
        (_layers("w4a8", -1, k=384)[1], "different in_features"),
    ]
    bf16 = _layers("w4a8", -1)[1]
    bf16.dtype = torch.bfloat16
    cases.append((bf16, "different dtype"))
    ref = _layers("w4a8", -1)[1]
    ref.backend = "reference"
    cases.append((ref, "different backend"))
    for other, reason in cases:
        with pytest.raises(FuseError, match=reason):
            fuse_linears([a, other])
    with pytest.raises(FuseError, match="all QuickLinear, all QuickLinearW4A8 or all nn.Linear"):
        fuse_linears([a, torch.nn.Linear(256, 32)])


def test_from_stored_checks_shapes_and_dtypes():
    good = _layers("w4a8", 128)[0]
    t = dict(good.stored())
    assert torch.equal(QuickLinearW4A8.from_stored(t, "w4a8", 128).weight().q, good.weight().q)
    with pytest.raises(ValueError, match="group_scale"):
        QuickLinearW4A8.from_stored({**t, "group_scale": t["group_scale"][:, :32]}, "w4a8", 128)
    with pytest.raises(ValueError, match="channel_scale"):
        QuickLinearW4A8.from_stored({**t, "channel_scale": t["channel_scale"].half()}, "w4a8", 128)
    with pytest.raises(ValueError, match="unknown W4A8 storage"):
        QuickLinearW4A8.from_stored(t, "quick", 128)
    u = dict(_layers(UNPACKED, -1)[0].stored())
    with pytest.raises(ValueError, match="are \\['q', 'channel_scale', 'group_scale'\\]"):
        QuickLinearW4A8.from_stored(u, UNPACKED, 128)
    with pytest.raises(ValueError, match="q int8"):
        QuickLinearW4A8.from_stored({**u, "q": u["q"].int()}, UNPACKED, -1)


# ------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("group", GROUPS, ids=_gid)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_w4a8_model_same_logits(family, group, storage):
    """Fusing a W4A8 model changes which layers run, not what they compute: the same logits bit for bit."""
    torch.set_num_threads(1)
    model = _w4a8_model(family, group, storage)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_model(model) == 4
        got = model(ids).logits
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.qkv_proj.linear, QuickLinearW4A8)
    assert layer.self_attn.qkv_proj.linear.storage == storage
    assert isinstance(layer.mlp.up_proj, FusedSlice)
    assert torch.equal(got, want)
    assert fuse_model(model) == 0  # idempotent


def test_groups_that_cannot_fuse_stay_unfused_with_a_reason():
    """8 heads of 16 with one key/value head: k_proj and v_proj (N = 16) are too narrow for the ``w4a8`` layout's
    32-column blocks and stay unpacked while q_proj is packed. Their group stays unfused (one warning naming why
    and where), gate/up is fused, the logits do not change."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the quantizer's own note on the unpacked layers
        model = _model("llama", num_attention_heads=8, num_key_value_heads=1)
        quantize_model_rtn_w4a8(model, -1, dtype=torch.float16, progress=False)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.storage, attn.k_proj.storage) == ("w4a8", UNPACKED)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        with pytest.warns(RuntimeWarning, match=r"kept unfused \(layer 0 self_attn.qkv_proj and 1 more\).*storage"):
            assert fuse_model(model) == 2
        got = model(ids).logits
    assert not hasattr(attn, "qkv_proj") and isinstance(model.model.layers[0].mlp.gate_proj, FusedSlice)
    assert torch.equal(got, want)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("group", GROUPS, ids=_gid)
def test_save_and_reload(tmp_path, group, fused):
    """A W4A8 model saves under its own linear names whether it is fused or not (the fused model stays fused), and
    reloads to the same logits, fused again where it was."""
    torch.set_num_threads(1)
    model = _w4a8_model("llama", group)
    round_dense_(model, torch.float16)  # what the checkpoint stores of the dense parts
    ids = torch.randint(0, 256, (2, 7))
    if fused:
        assert fuse_model(model) == 4
    with torch.no_grad():
        want = model(ids).logits
    save_quantized(model, tmp_path / "q")
    assert sum(isinstance(m, FusedProjection) for m in model.modules()) == (4 if fused else 0)
    loaded = load_quantized(tmp_path / "q", dtype=torch.float32, layout="w4a8")
    assert not any(isinstance(m, (FusedProjection, FusedSlice)) for m in loaded.modules())
    k_proj = loaded.model.layers[0].self_attn.k_proj
    assert isinstance(k_proj, QuickLinearW4A8) and k_proj.bias is not None and k_proj.group_size == group
    if fused:
        assert fuse_model(loaded) == 4
    with torch.no_grad():
        got = loaded(ids).logits
        assert torch.equal(model(ids).logits, want)  # the saved model is unchanged
    assert torch.equal(got, want)


@pytest.mark.parametrize("storage", STORAGES)
def test_unfuse_restores_the_members(storage):
    """unfuse_model and the ``unfused`` context give back layers with the members' tensors; leaving the context
    puts the fused modules back."""
    model = _w4a8_model("qwen3", 128, storage)
    before = {n: {k: t.clone() for k, t in m.stored().items()} for n, m in model.named_modules()
              if isinstance(m, QuickLinearW4A8)}  # fmt: skip
    fuse_model(model)
    owner = model.model.layers[0].mlp.gate_up_proj
    with unfused(model):
        assert not any(isinstance(m, FusedProjection) for m in model.modules())
        now = {n: m for n, m in model.named_modules() if isinstance(m, QuickLinearW4A8)}
        assert now.keys() == before.keys()
        for name, mod in now.items():
            for k, t in before[name].items():
                assert torch.equal(mod.stored()[k], t), (name, k)
    assert model.model.layers[0].mlp.gate_up_proj is owner
    assert isinstance(model.model.layers[0].mlp.gate_proj, FusedSlice)
    assert unfuse_model(model) == 4
    assert {n for n, m in model.named_modules() if isinstance(m, QuickLinearW4A8)} == before.keys()


# ---------------------------------------------------------------------------------------------------- GPU


def _gpu_model(group: int, seed: int = 0):
    """A 2-layer Llama whose every projection the W4A8 kernels take (K, N multiples of 128), in the layout of this
    GPU's fastest W4A8 kernel; the same weights for the same seed."""
    from quick.nn.linear_w4a8 import preferred_w4a8_layout

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs a CUDA GPU of compute capability 8.0 or newer")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    quantize_model_rtn_w4a8(model, group, dtype=torch.float16, progress=False)
    layout = preferred_w4a8_layout("cuda")
    if layout != "w4a8":
        _restore(model, layout)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("group", GROUPS, ids=_gid)
def test_gpu_fused_matches_unfused(group):
    """On the kernels: the fused q/k/v and gate/up layers run the kernel (not the reference) and the prompt logits
    are those of the unfused model (the integer sums are exact; only the fp16 rounding of the outputs may differ)."""
    from quick.nn.linear_w4a8 import preferred_w4a8_layout

    ref, model = _gpu_model(group), _gpu_model(group)
    assert fuse_model(model) == 4
    ids = torch.randint(0, 512, (4, 64), device="cuda")
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    qkv = model.model.layers[0].self_attn.qkv_proj.linear
    assert qkv.storage == preferred_w4a8_layout("cuda") and qkv.last_path == "kernel"
    assert torch.isfinite(got).all()
    assert _rel(got, want) < 1e-2, _rel(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("group", GROUPS, ids=_gid)
@pytest.mark.parametrize("mode", ["none", "fast"])
def test_gpu_graphed_decode_matches_eager(mode, group, fused):
    """CUDA-graphed decode (plain, or the fast step), fused or not, against eager unfused decoding of the same
    weights, teacher-forced on the eager tokens: logits within the fp16 rounding of the kernels at every step,
    nearly every greedy token the same; the graphed prefill gives the eager prefill's logits."""
    from quick.inference import StaticGenerator

    torch._dynamo.reset()
    ref_model, model = _gpu_model(group), _gpu_model(group)
    if fused:
        assert fuse_model(model) == 4
    ids = torch.randint(0, 512, (4, 16), device="cuda")
    tokens, _ = StaticGenerator(ref_model, 4, 48, use_graph=False).generate(ids, 24)
    fast = StaticGenerator(model, 4, 48, use_graph=True, compile=mode, graph_prefill=True)
    ref = StaticGenerator(ref_model, 4, 48, use_graph=False)
    with torch.inference_mode():
        a, b = fast.prefill(ids).clone(), ref.prefill(ids)
        worst, agree = _rel(a, b), 0
        for i in range(tokens.shape[1] - 1):
            a = fast.decode_step(tokens[:, i], 16 + i).clone()
            b = ref.decode_step(tokens[:, i], 16 + i)
            assert torch.isfinite(a).all()
            worst = max(worst, _rel(a, b))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    torch._dynamo.reset()
    assert (fast._fast is not None) == (mode == "fast")
    # the rope kernel rounds q/k once where transformers rounds three times; int8 activation quantization turns
    # those one-ulp differences into ~2.6 % of the logits (CPU emulation of the kernel's arithmetic: 2.87 % worst)
    from quick import settings

    bound = 4e-2 if mode == "fast" and settings.fusion_enabled("rope") else 2e-2
    assert worst < bound, worst
    assert agree >= 0.9 * 4 * (tokens.shape[1] - 1)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_gpu_e2e_w4a8_rows(mode, tmp_path):
    """``quick bench e2e --impls fp16 w4a8 w4a8_g128 --variants fast+fused`` (one layer of Llama-2-7B, short): a row
    per impl and batch, the W4A8 models fused; ``--prefill-only``: prefill tokens/s rows with ``mode``."""
    import json

    from quick.bench import e2e

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs a CUDA GPU of compute capability 8.0 or newer")
    rows, cases = e2e.run(["llama-2-7b"], [1, 4], ["fp16", "w4a8", "w4a8_g128"], 256, 16, 1, ["fast+fused"], mode=mode)
    assert [(r["impl"], r["batch"]) for r in rows] == [(i, b) for i in ("fp16", "w4a8", "w4a8_g128") for b in (1, 4)]
    assert all(c["fused_projections"] == 2 for c in cases)
    assert all(r["prefill_tok_s"] > 0 and r["peak_mem_GB"] > 0 for r in rows)
    if mode == "prefill":
        assert all(r["mode"] == "prefill" and r["decode_tok_s"] is None for r in rows)
    else:
        assert all(r["decode_tok_s"] > 0 for r in rows)
    stem = e2e.write_results(rows, e2e.env_stamp(), tmp_path, 256, 16, ["fast+fused"], cases, mode=mode)
    assert len(json.loads(stem.with_suffix(".json").read_text())["rows"]) == 6
