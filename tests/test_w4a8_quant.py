"""W4A8 (QQQ) quantization on CPU: the weight grids, GPTQ, smoothing, QuickLinearW4A8, API, checkpoint, config."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from quick.algorithms import qqq
from quick.auto import AutoQuickForCausalLM, validate_quant_config
from quick.checkpoint import CheckpointError, load_quantized, save_quantized
from quick.formats import w4a8
from quick.formats import w4a8 as wf
from quick.formats.w4a8 import W4A8Weight, quantize_activations, w4a8_reference
from quick.formats.weights import QuantizationError
from quick.models.families import active_groups, decoder_layers, get_family
from quick.nn.linear_w4a8 import QuickLinearW4A8, integer_matmul, w4a8_layouts

transformers = pytest.importorskip("transformers")

W4A8 = {"w_bit": 4, "a_bit": 8, "version": "w4a8"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def outlier_inputs(t: int, k: int, seed: int = 0) -> torch.Tensor:
    """Strongly correlated activations (a low-rank part plus noise, as LLM hidden states are) with a few
    channels 20-50x larger than the rest, as after an LLM norm."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(t, k // 8, generator=gen) @ torch.randn(k // 8, k, generator=gen) / (k // 8) ** 0.5
    x = low + 0.3 * torch.randn(t, k, generator=gen)
    x = x * (0.5 + torch.rand(k, generator=gen))
    x[:, torch.randperm(k, generator=gen)[:4]] *= 20 + 30 * torch.rand(4, generator=gen)
    return x


def tiny_llama(seed: int = 0, outliers: bool = True) -> nn.Module:
    """Two layers, K = 96 (ragged at g128), GQA; norms with a few large channels like trained models."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=96,
        num_hidden_layers=2,
        intermediate_size=192,
        vocab_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if outliers:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in decoder_layers(model, get_family("llama")):
                for name, mod in layer.named_modules():
                    if name.endswith("norm"):
                        w = 1.0 + 0.2 * torch.randn(mod.weight.shape, generator=gen)
                        w[torch.randperm(w.numel(), generator=gen)[:3]] *= 15.0
                        mod.weight.copy_(w)
    return model


def calib(n: int = 16, seqlen: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _quiet_packing_fallback():
    # tiny layers with N % 32 != 0 cannot be packed and fall back to unpacked storage, with a warning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="W4A8 packing failed", category=RuntimeWarning)
        yield


# ----------------------------------------------------------------------------------------- weight grids


@pytest.mark.parametrize("group_size", [-1, 128])
def test_rtn_grid_is_the_format(group_size):
    w = torch.randn(64, 320) * torch.rand(64, 1)
    w[3] = 0.0  # an all-zero row must not divide by zero
    qw = wf.quantize_w4a8_rtn(w, group_size)
    kp = 384  # stored K: whole groups and a multiple of the kernels' 128
    assert qw.q.shape == (64, kp) and qw.q.dtype == torch.int8
    assert int(qw.q.min()) >= -8 and int(qw.q.max()) <= 7
    assert torch.all(qw.q[:, 320:] == 0)
    deq = qw.dequantize(torch.float64)[:, :320]
    assert torch.all(deq[3] == 0)
    # round to nearest: every element within half a step of its grid (the step is s_ch, or s_ch * s_g)
    step = qw.channel_scale.double()[:, None].expand(64, 320)
    if group_size != -1:
        assert qw.group_scale.dtype == torch.int16 and int(qw.group_scale.min()) >= 1
        # the largest group of a row gets s_g = 16: the most resolution with every q * s_g an int8
        assert int(qw.group_scale.max()) == 16
        assert w4a8.widens_to_int8(qw.group_scale)
        step = step * qw.group_scale.double().t().repeat_interleave(128, dim=1)[:, :320]
    assert torch.all((deq - w.double()).abs() <= 0.5 * step * (1 + 2e-3) + 1e-6)
    assert rel(deq, w) < 0.15
    # the search's fake quantization is the same grid
    assert torch.allclose(wf.fake_quant_weight(w, group_size).double(), deq, rtol=1e-6, atol=1e-7)


def test_bad_weights_and_group_sizes_raise():
    with pytest.raises(QuantizationError, match="group size 64"):
        wf.quantize_w4a8_rtn(torch.randn(8, 128), 64)
    with pytest.raises(QuantizationError, match="NaN"):
        wf.quantize_w4a8_rtn(torch.full((8, 128), float("nan")), -1)
    with pytest.raises(QuantizationError, match="Hessian shape"):
        qqq.gptq_w4a8(torch.randn(8, 128), torch.eye(64), -1)


# ------------------------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_outlier_hessian(group_size, act_order):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=gen)
    x = outlier_inputs(2048, 256)
    ref = x @ w.t()
    err_rtn = rel(x @ wf.quantize_w4a8_rtn(w, group_size).dequantize(torch.float32).t(), ref)
    qw = qqq.gptq_w4a8(w, x.t() @ x, group_size, act_order=act_order)
    assert isinstance(qw, W4A8Weight)  # validated format
    err_gptq = rel(x @ qw.dequantize(torch.float32).t(), ref)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_gptq_handles_dead_inputs_and_ragged_groups():
    w = torch.randn(32, 200)
    x = outlier_inputs(512, 200)
    x[:, 7] = 0.0  # a channel that is never active: weight dropped, no NaN from the Cholesky
    qw = qqq.gptq_w4a8(w, x.t() @ x, 128)
    assert qw.q.shape == (32, 256) and torch.all(qw.q[:, 7] == 0) and torch.all(qw.q[:, 200:] == 0)
    assert rel(x @ qw.dequantize(torch.float32)[:, :200].t(), x @ w.t()) < 0.2


def test_clip_search_never_increases_weighted_error():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=gen) ** 3  # heavy tails: clipping pays off
    d = torch.rand(128, generator=gen) + 0.1

    def err(a: torch.Tensor) -> torch.Tensor:
        st = wf.channel_scale_for(a, -1)[:, None]
        return ((w - qqq._round_q(w, st) * st) ** 2 * d).sum(1)

    a = qqq.clipped_amax(w, d, lambda x: wf.channel_scale_for(x, -1))
    full = w.abs().amax(1)
    assert torch.all(a <= full) and torch.all(err(a) <= err(full)) and (a < full).any()


# -------------------------------------------------------------------------------------------- smoothing


def test_smoothing_reduces_quantized_block_error():
    """On a layer whose norms feed outlier channels, the searched alpha beats no smoothing, for each group."""
    model = tiny_llama()
    family = get_family("llama")
    layer = decoder_layers(model, family)[0]
    groups = active_groups(layer, family)
    linears = qqq.layer_linears(layer, family)
    site_of = {n: g.linears[0] for g in groups for n in g.linears}
    for n in linears:
        site_of.setdefault(n, n)
    x = model.model.embed_tokens(calib(8, 32))
    pos = torch.arange(32)[None]
    kw = {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None}
    with torch.no_grad():
        _, sites, probes = qqq._collect(layer, [x], [kw], groups, linears, site_of, 1, torch.device("cpu"))
        before = {n: lin.weight.detach().clone() for n, lin in linears.items()}
        improved = 0
        for g in groups:
            site = sites[site_of[g.linears[0]]]
            res = qqq.search_smoothing(layer, g, site.amax, probes[qqq.probe_module_name(g)], -1)
            assert res.loss <= res.identity_loss
            improved += res.loss < 0.7 * res.identity_loss
        for n, lin in linears.items():  # the search leaves the layer unchanged
            assert torch.equal(lin.weight, before[n])
    # the attention input and the MLP input carry the norm outliers: smoothing must pay off there
    assert improved >= 2


def test_smoothing_candidates_contain_identity_and_are_normalised():
    ax, aw = torch.rand(64) * 10 + 0.1, torch.rand(64) + 0.1
    cands = qqq.smoothing_candidates(ax, aw, 10)
    assert len(cands) == 12 and torch.equal(cands[0][1], torch.ones(64))
    for _alpha, s in cands[1:]:
        assert torch.isfinite(s).all() and torch.allclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-4)


# ---------------------------------------------------------------------------------------- QuickLinearW4A8


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("pack", [False, None])
def test_linear_matches_float64_reference(group_size, pack):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=gen)
    bias = torch.randn(64, generator=gen)
    mod = QuickLinearW4A8.from_weight(w, group_size, bias, torch.float16, pack=pack)
    if pack is None:
        assert mod.storage == "w4a8" and "qweight" in mod.stored()
    else:
        assert mod.storage == "unpacked" and set(mod.stored()) == {"q", "channel_scale"} | (
            {"group_scale"} if group_size != -1 else set()
        )
    x = outlier_inputs(37, 256).reshape(1, 37, 256)
    out = mod(x)
    assert out.dtype == x.dtype and out.shape == (1, 37, 64)
    ref = w4a8_reference(x, mod.weight(), mod.bias)
    assert rel(out, ref) < 1e-6  # the reference path is that arithmetic, cast to fp32
    out64 = mod(x.double())
    assert rel(out64, ref) < 1e-13
    assert rel(out, x @ w.t() + bias) < 0.2  # and it is a sane approximation of the float layer


def test_layer_widen_flag_follows_its_scales():
    """Layers know whether q * s_g fits int8 (scales <= 16) without reading scales at forward time, keep it
    right across load_state_dict, and hand it to kernels that take it."""
    rtn = QuickLinearW4A8.from_weight(torch.randn(64, 256), 128, pack=None, layout="w4a8_sm90")
    assert rtn.widen and not QuickLinearW4A8.from_weight(torch.randn(64, 256), -1).widen
    gen = torch.Generator().manual_seed(3)
    big = W4A8Weight(
        torch.randint(-8, 8, (64, 256), generator=gen, dtype=torch.int8),
        torch.rand(64, generator=gen) + 0.1,
        torch.randint(17, 128, (2, 64), generator=gen, dtype=torch.int16),
        128,
    )
    old = QuickLinearW4A8(big, pack=None, layout="w4a8_sm90")
    assert not old.widen
    old.load_state_dict(rtn.state_dict())
    assert old.widen
    rtn.load_state_dict(QuickLinearW4A8(big, pack=None, layout="w4a8_sm90").state_dict())
    assert not rtn.widen
    seen = {}

    def fake_kernel(x2d, packed, group_size, *, widen=False):
        seen["widen"] = widen
        return x2d.new_zeros(x2d.shape[0], 64)

    assert old._run_kernel(fake_kernel, torch.randn(3, 256)).shape == (3, 64) and seen["widen"] is True


@pytest.mark.parametrize("pack", [None, False], ids=["packed", "unpacked"])
def test_model_dtype_casts_keep_the_layer_working(pack):
    """``model.to(torch.bfloat16)`` / ``.half()`` / ``.float()`` move a W4A8 layer without casting its tensors (the
    channel scales must stay fp32, codes and group scales integer): the output is unchanged, in the input's dtype."""
    gen = torch.Generator().manual_seed(5)
    lin = nn.Linear(256, 64, bias=True)
    lin.weight.data = torch.randn(64, 256, generator=gen) * 0.05
    layer = QuickLinearW4A8.from_linear(lin, 128, pack=pack)
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    before = {n: b.dtype for n, b in layer.named_buffers()}
    want = layer(x)
    model = nn.Sequential(layer).to(torch.bfloat16)
    model.half()
    model.float()
    assert {n: b.dtype for n, b in layer.named_buffers()} == before
    assert torch.equal(model(x), want) and want.dtype == torch.bfloat16


def test_integer_matmul_is_exact():
    gen = torch.Generator().manual_seed(6)
    for group_size, k in ((-1, 4096), (-1, 20000), (128, 1024)):
        q = torch.randint(-8, 8, (48, k), generator=gen, dtype=torch.int8)
        q[:, :128] = -8  # extreme values in the first group
        gs = None if group_size == -1 else torch.randint(1, 128, (k // 128, 48), generator=gen, dtype=torch.int16)
        w = W4A8Weight(q, torch.ones(48), gs, group_size)
        xq = torch.randint(-127, 128, (9, k), generator=gen, dtype=torch.int8)
        xq[:, :128] = 127
        wi = q.long() * (1 if gs is None else gs.long().t().repeat_interleave(128, dim=1))
        exact = (xq.long() @ wi.t()).double()
        assert torch.equal(integer_matmul(xq, w), exact)


def test_linear_ragged_input_and_errors():
    mod = QuickLinearW4A8.from_weight(torch.randn(32, 96), 128, pack=False)
    assert mod.in_features == 128 and mod.logical_in_features == 96
    x = torch.randn(4, 96)
    assert torch.equal(mod(x), mod(torch.nn.functional.pad(x, (0, 32))))
    with pytest.raises(ValueError, match="in_features"):
        mod(torch.randn(4, 64))
    with pytest.raises(TypeError, match="floating"):
        mod(torch.ones(4, 96, dtype=torch.int32))
    mod.backend = "kernel"
    with pytest.raises(RuntimeError, match="no W4A8 GPU kernel"):
        mod(x)
    with pytest.raises(ValueError, match="dtype"):
        QuickLinearW4A8(mod.weight(), dtype=torch.float32)


def test_activation_quantization_matches_kernel_rule():
    x = torch.tensor([[0.0, 0.0], [1.0, -0.5], [254.0, 1.0]])
    xq, sx = quantize_activations(x)
    assert torch.equal(xq, torch.tensor([[0, 0], [127, -64], [127, 0]], dtype=torch.int8))  # -63.5 -> -64 (even)
    assert torch.allclose(sx, torch.tensor([0.0, 1 / 127, 2.0]))


# ---------------------------------------------------------------------------------- model, API, checkpoint


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("group_size", [-1, 128])
def test_qqq_model_beats_rtn_and_round_trips(tmp_path, group_size):
    ids = calib(2, 64, seed=9)
    ref = logits(tiny_llama(), ids)
    qc = {**W4A8, "q_group_size": group_size}
    rtn = AutoQuickForCausalLM(tiny_llama()).quantize(quant_config=qc, method="rtn", progress=False)
    err_rtn = rel(logits(rtn.model, ids), ref)
    auto = AutoQuickForCausalLM(tiny_llama()).quantize(quant_config=qc, calib_data=calib(), progress=False)
    assert auto.quant_config == {**qc, "zero_point": False}
    mods = [m for m in auto.model.modules() if isinstance(m, QuickLinearW4A8)]
    assert len(mods) == 14 and not any(isinstance(m, nn.Linear) for m in auto.model.model.layers.modules())
    out = logits(auto.model, ids)
    err_qqq = rel(out, ref)
    assert err_qqq < 0.8 * err_rtn, (err_qqq, err_rtn)

    path = auto.save_quantized(tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["version"] == "w4a8" and cfg["a_bit"] == 8 and cfg["bits"] == 4 and cfg["method"] == "qqq"
    assert cfg["group_size"] == group_size and cfg["zero_point"] is False
    again = AutoQuickForCausalLM.from_quantized(path, device="cpu")
    assert again.quant_config == auto.quant_config
    assert torch.equal(logits(again.model, ids), out)
    # the storage each layer had (packed or the unpacked fallback) survives the round trip
    before = {n: m.storage for n, m in auto.model.named_modules() if isinstance(m, QuickLinearW4A8)}
    after = {n: m.storage for n, m in again.model.named_modules() if isinstance(m, QuickLinearW4A8)}
    assert before == after


@pytest.mark.skipif("w4a8_sm90" not in w4a8_layouts(), reason="no Hopper W4A8 layout")
def test_layouts_are_interchangeable(tmp_path):
    """A model packed for the Hopper kernel saves, reloads into the mma.sync layout and back, same outputs."""
    ids = calib(2, 32, seed=3)
    auto = AutoQuickForCausalLM(tiny_llama(outliers=False)).quantize(
        quant_config={**W4A8, "q_group_size": 128}, method="rtn", progress=False
    )
    ref = logits(auto.model, ids)
    for name, m in list(auto.model.named_modules()):
        if isinstance(m, QuickLinearW4A8) and m.storage != "unpacked":
            sm90 = QuickLinearW4A8.from_tensors(m.stored(), m.storage, 128, m.bias, m.dtype, m.logical_in_features,
                                                layout="w4a8_sm90")  # fmt: skip
            assert sm90.storage == "w4a8_sm90" and torch.equal(sm90.weight().q, m.weight().q)
            parent, _, child = name.rpartition(".")
            setattr(auto.model.get_submodule(parent), child, sm90)
    assert torch.equal(logits(auto.model, ids), ref)
    path = auto.save_quantized(tmp_path / "sm90")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["storage"] == "w4a8_sm90"
    for layout in ("w4a8", "w4a8_sm90"):
        model = load_quantized(path, layout=layout, dtype=torch.float32)
        storages = {m.storage for m in model.modules() if isinstance(m, QuickLinearW4A8)}
        assert layout in storages and storages <= {layout, "unpacked"}
        assert torch.equal(logits(model, ids), ref)


def test_checkpoint_errors(tmp_path):
    auto = AutoQuickForCausalLM(tiny_llama(outliers=False)).quantize(
        quant_config={**W4A8, "q_group_size": 128}, method="rtn", progress=False
    )
    path = auto.save_quantized(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="cannot be repacked"):
        load_quantized(path, layout="quick")
    with pytest.raises(CheckpointError, match="cannot be saved"):
        save_quantized(auto.model, tmp_path / "bad", {"quant_method": "quick", "version": "quick", "group_size": 128})
    # a corrupt scale is caught at load, naming the layer
    tensors = load_quantized(path).model.layers[0].mlp.up_proj.stored()
    bad = {k: v.clone() for k, v in tensors.items()}
    bad["channel_scale"][3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        QuickLinearW4A8.from_tensors(bad, "w4a8", 128)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["group_size"] = -1  # stored tensors have group scales: the format check catches it
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="W4A8 layer"):
        load_quantized(path)


@pytest.mark.parametrize(
    ("config", "method", "match"),
    [
        ({**W4A8, "a_bit": 4}, None, "a_bit=4"),
        ({"a_bit": 8, "version": "quick"}, None, "needs version 'w4a8'"),
        ({**W4A8, "q_group_size": 64}, None, "q_group_size=64"),
        ({**W4A8, "w_bit": 8}, None, "w_bit=8"),
        ({**W4A8, "zero_point": True}, None, "symmetric"),
        ({**W4A8, "bits": 4}, None, "unknown quant_config keys"),
        ({**W4A8, "q_group_size": 128}, "awq", "'qqq'"),
        ({"w_bit": 4, "q_group_size": 128}, "qqq", "W4A8"),
    ],
)
def test_config_validation(config, method, match):
    with pytest.raises(QuantizationError, match=match):
        AutoQuickForCausalLM(tiny_llama(outliers=False)).quantize(quant_config=config, method=method, progress=False)


def test_config_defaults():
    assert validate_quant_config({"a_bit": 8}) == {**W4A8, "q_group_size": 128, "zero_point": False}
    assert validate_quant_config({"version": "W4A8", "q_group_size": -1})["a_bit"] == 8
    assert "a_bit" not in validate_quant_config({"a_bit": 16})  # W4A16 configs are unchanged


def test_cli_rejects_bad_w4a8_arguments():
    from quick.cli import build_parser
    from quick.commands import quantize

    parser = build_parser()
    for argv in (
        ["quantize", "m", "o", "--a-bit", "8", "--group-size", "32"],
        ["quantize", "m", "o", "--version", "w4a8", "--method", "awq"],
    ):
        args = parser.parse_args(argv)
        with pytest.raises(QuantizationError):
            quantize.run(args)


# ------------------------------------------------------------------------------------------------------ GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("n", [192, 256])
def test_gpu_layer_matches_float64_reference(group_size, dtype, m, n):
    """The GPU forward (the W4A8 kernel where it takes the shape, else the reference on the GPU) against the
    float64 arithmetic of the format on fresh data; with bias, ragged K (SmolLM2-like 576, stored as 640)."""
    from quick.nn.linear_w4a8 import _kernel_for

    gen = torch.Generator().manual_seed(100 + m)
    w = torch.randn(n, 576, generator=gen) * 0.05
    bias = torch.randn(n, generator=gen)
    mod = QuickLinearW4A8.from_weight(w, group_size, bias, dtype).cuda()
    x = outlier_inputs(m, 576, seed=m).to(dtype).cuda()
    out = mod(x)
    assert out.dtype == dtype and out.shape == (m, n) and torch.isfinite(out).all()
    xp = torch.nn.functional.pad(x, (0, mod.in_features - 576))  # what the layer hands the kernel (K 576 -> 640)
    kernel = _kernel_for(mod.storage, xp) is not None and n % 128 == 0
    assert mod.last_path == ("kernel" if kernel else "reference")
    wc = mod.weight()
    wc = W4A8Weight(
        wc.q.cpu(), wc.channel_scale.cpu(), None if wc.group_scale is None else wc.group_scale.cpu(), group_size
    )
    ref = w4a8_reference(torch.nn.functional.pad(x.cpu(), (0, mod.in_features - 576)), wc, mod.bias.cpu())
    bound = 4e-3 if dtype == torch.float16 else 2e-2  # the output rounded to 16 bits
    assert rel(out.cpu(), ref) < bound
    mod.backend = "reference"
    assert rel(mod(x).cpu(), ref) < bound and mod.last_path == "reference"


@pytest.mark.gpu
@cuda
def test_gpu_qqq_tiny_model():
    """QQQ calibrates on the GPU (half-precision activations) and still beats W4A8 RTN."""
    ids = calib(2, 64, seed=9).cuda()
    dense = tiny_llama().half().cuda()
    ref = logits(dense, ids).float()
    qc = {**W4A8, "q_group_size": 128}
    rtn = AutoQuickForCausalLM(tiny_llama().half().cuda()).quantize(quant_config=qc, method="rtn", progress=False)
    auto = AutoQuickForCausalLM(tiny_llama().half().cuda()).quantize(
        quant_config=qc, calib_data=calib(), progress=False
    )
    err_rtn, err_qqq = rel(logits(rtn.model, ids).float(), ref), rel(logits(auto.model, ids).float(), ref)
    assert err_qqq < 0.9 * err_rtn, (err_qqq, err_rtn)
