"""A whole (tiny, random) transformers model on the GPU kernels: logits against the reference path, and the
CUDA-graphed static-cache generator against eager decoding, for every kernel layout available here."""

from __future__ import annotations

import pytest
import torch
from helpers import smollm2_llama_config

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
    pytest.skip("needs a CUDA GPU of compute capability 8.0 or newer", allow_module_level=True)

from quick.algorithms.rtn import quantize_model_rtn  # noqa: E402
from quick.inference import StaticGenerator  # noqa: E402
from quick.kernels import dispatch  # noqa: E402
from quick.nn.linear import QuickLinear  # noqa: E402
from quick.testing import rel_error  # noqa: E402


def _model(layout: str, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = smollm2_llama_config()  # SmolLM2's layer shapes (K = 576: ragged groups at g128)
    model = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    quantize_model_rtn(model, 128, layout, dtype=dtype, progress=False)
    return model


def _layouts() -> list[str]:
    x = torch.zeros(1, 640, dtype=torch.float16, device="cuda")
    return [lay for lay in ("quick", "quick_sm90") if dispatch.kernel_for(lay, x) is not None]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["quick", "quick_sm90"])
def test_model_logits_kernel_vs_reference(layout, dtype):
    if layout not in _layouts():
        pytest.skip(f"no kernel for {layout} on this GPU")
    model = _model(layout, dtype)
    ids = torch.randint(0, 512, (3, 37), device="cuda")
    with torch.inference_mode():
        fast = model(ids).logits.float()
        for m in model.modules():
            if isinstance(m, QuickLinear):
                m.backend = "reference"
        ref = model(ids).logits.float()
    assert torch.isfinite(fast).all()
    assert rel_error(fast, ref) < (1e-2 if dtype == torch.float16 else 4e-2)


@pytest.mark.parametrize("layout", ["quick", "quick_sm90"])
def test_graphed_generation_matches_eager(layout):
    if layout not in _layouts():
        pytest.skip(f"no kernel for {layout} on this GPU")
    model = _model(layout, torch.float16)
    ids = torch.randint(0, 512, (4, 16), device="cuda")
    graphed, stats = StaticGenerator(model, 4, 48, use_graph=True).generate(ids, 24)
    eager, _ = StaticGenerator(model, 4, 48, use_graph=False).generate(ids, 24)
    assert torch.equal(graphed, eager)  # deterministic kernels: replaying the graph changes nothing
    assert stats.decode_tok_s > 0


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_awq_runs_on_the_gpu(kind):
    """AWQ's search on the GPU (layer by layer, model kept on the CPU): as good as on the CPU against float."""
    import copy

    from test_awq import GROUP, MODELS, calib, rel, with_outliers

    from quick.algorithms import awq
    from quick.auto import quantize_model_rtn as rtn_model

    torch.manual_seed(0)
    model = with_outliers(MODELS[kind]())
    ids = calib(2, 40, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    rtn = rtn_model(copy.deepcopy(model), GROUP, scale_dtype=torch.float16)
    q = awq.quantize_model_awq(copy.deepcopy(model), calib(), GROUP, device="cuda", progress=False)
    # one layer at a time went to the GPU and came back
    assert all(t.device.type == "cpu" for t in [*q.parameters(), *q.buffers()])
    with torch.no_grad():
        err_awq, err_rtn = rel(q(ids).logits, ref), rel(rtn(ids).logits, ref)
    assert err_awq < err_rtn, (err_awq, err_rtn)
    q.to("cuda")  # and the packed model runs on the kernels
    with torch.no_grad():
        out = q(ids.cuda()).logits.float().cpu()
    assert torch.isfinite(out).all() and rel(out, ref) < err_rtn
