"""Device diagnostic: where does one batch-1 decode step of a 7B model spend its GPU time?"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from quick.inference import StaticGenerator
from quick.models.synthetic import build_random_model

impl = sys.argv[1] if len(sys.argv) > 1 else "quick"
layout = impl if impl != "fp16" else "quick"
model = build_random_model("llama-2-7b", torch.float16, "cuda", impl != "fp16", layout=layout)
g = StaticGenerator(model, 1, 256, use_graph=False)
ids = torch.randint(0, 32000, (1, 128), device="cuda")
nxt = g.prefill(ids).argmax(-1)
for i in range(3):
    nxt = g.decode_step(nxt, 128 + i).argmax(-1)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for i in range(3, 8):
        nxt = g.decode_step(nxt, 128 + i).argmax(-1)
    torch.cuda.synchronize()
print(impl, prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
