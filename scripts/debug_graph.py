"""Device diagnostic: does a CUDA-graph replay of the decode step give the same logits as eager decoding?
Runs a dense fp16 model, the reference path and each kernel layout, to tell HF/cache issues from kernel ones."""

import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from quick.inference import StaticGenerator
from quick.nn.linear import QuickLinear
from quick.quant.apply import quantize_model_rtn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import smollm2_llama_config  # noqa: E402  (tests/helpers.py)


def build(variant):
    torch.manual_seed(0)
    cfg = smollm2_llama_config()
    m = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    if variant != "dense":
        layout = "quick" if variant == "reference" else variant
        quantize_model_rtn(m, 128, layout, dtype=torch.float16, progress=False)
        for q in m.modules():
            if isinstance(q, QuickLinear) and variant == "reference":
                q.backend = "reference"
    return m


for variant in ["dense", "quick", "quick_sm90"]:  # the reference path copies host indices: not capturable
    model = build(variant)
    ids = torch.randint(0, 512, (4, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    res = []
    for use_graph in (True, False):
        g = StaticGenerator(model, 4, 48, use_graph=use_graph)
        nxt = g.prefill(ids).argmax(-1)
        logits = []
        for i in range(6):
            lg = g.decode_step(nxt, 16 + i).clone()
            logits.append(lg)
            nxt = lg.argmax(-1)
        res.append(torch.stack(logits))
    diff = [(a - b).abs().max().item() for a, b in zip(res[0], res[1], strict=True)]
    print(variant, "max |graph - eager| per step:", [f"{d:.3g}" for d in diff], flush=True)
