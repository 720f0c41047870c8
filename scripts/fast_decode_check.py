"""The few-kernel decode step on a real model (CPU): RTN w4 g128, then per-step logits of the fast step against
transformers' forward over the same static cache, in fp32 and bf16 (eager backend: transformers' operations).

    python scripts/fast_decode_check.py /path/to/checkpoint   # a dense checkpoint dir (or a GGUF to convert)
"""

import sys
from pathlib import Path

import torch

from quick import inference
from quick.checkpoint import set_compute_dtype
from quick.inference import StaticGenerator
from quick.models.loading import convert_gguf_to_checkpoint, load_model
from quick.quant.apply import quantize_model_rtn


def main(src: str) -> int:
    inference.COMPILE_BACKEND = "eager"
    path = Path(src)
    if path.suffix == ".gguf":
        out = Path("/tmp/quick-fast-check") / path.stem
        if not (out / "config.json").exists():
            convert_gguf_to_checkpoint(path.parent, path.name, out)
        path = out
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = load_model(path, dtype, "cpu")
        quantize_model_rtn(model, 128, "quick", dtype=torch.bfloat16, progress=False)
        set_compute_dtype(model, dtype)
        ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        ref, fast = StaticGenerator(model, 1, n + 12), StaticGenerator(model, 1, n + 12, compile="fast")
        worst, agree = 0.0, 0
        with torch.inference_mode():
            fast.prefill(ids)
            nxt = ref.prefill(ids).argmax(-1)
            for i in range(11):
                a, b = fast.decode_step(nxt, n + i).float(), ref.decode_step(nxt, n + i).float()
                worst = max(worst, ((a - b).norm() / b.norm()).item())
                agree += int(a.argmax() == b.argmax())
                nxt = b.argmax(-1)
        text = tok.decode(StaticGenerator(model, 1, n + 12, compile="fast").generate(ids, 12)[0][0])
        print(f"{dtype}: worst relative logit difference {worst:.3g}, argmax agree {agree}/11, {text!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
