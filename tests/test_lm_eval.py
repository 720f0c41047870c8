"""The optional lm-eval-harness adapter: its log-likelihoods equal ours, on a dense and a quantized tiny model."""

from __future__ import annotations

import pytest
import torch

from quick.cli import main

lm_eval = pytest.importorskip("lm_eval", reason="optional: pip install lm-eval")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from quick.models.loading import ModelLoadError, default_model_dir

    try:
        path = default_model_dir(convert=False)
    except ModelLoadError:
        pytest.skip("bundled SmolLM2 tokenizer not converted yet (run `quick demo` once)")
    return AutoTokenizer.from_pretrained(path)


def tiny_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def own_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


@pytest.mark.parametrize("quantized", [False, True])
def test_harness_loglikelihood_matches_ours(tokenizer, quantized):
    from lm_eval.api.instance import Instance

    from quick.algorithms.rtn import quantize_model_rtn
    from quick.eval.lm_eval_adapter import harness_model
    from quick.nn.dtypes import set_compute_dtype
    from quick.nn.linear import QuickLinear

    model = tiny_model(len(tokenizer))
    if quantized:
        quantize_model_rtn(model, group_size=64, progress=False)
        set_compute_dtype(model, torch.float32)  # fp16-packed weights, fp32 norms/attention on CPU
        assert any(isinstance(m, QuickLinear) for m in model.modules())
    lm = harness_model(model, tokenizer)
    pairs = [("The capital of France is", " Paris"), ("Water is made of", " hydrogen and oxygen")]
    reqs = [Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    want = [own_loglikelihood(model, tokenizer, c, x) for c, x in pairs]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-3)
    assert all(v < 0 for v in got)


def test_cli_needs_a_metric(capsys):
    assert main(["eval", "smollm2"]) == 2
    assert "choose a metric" in capsys.readouterr().out


def test_run_tasks_rejects_empty_task_list():
    from quick.eval.lm_eval_adapter import run_tasks

    with pytest.raises(ValueError, match="at least one"):
        run_tasks(torch.nn.Linear(1, 1), object(), [])
