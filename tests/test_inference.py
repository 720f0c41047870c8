"""Static-cache generation matches transformers' own greedy generation (CPU here; graphs on the GPU)."""

from __future__ import annotations

import pytest
import torch

from quick.inference import StaticGenerator


def _tiny_llama(vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def test_static_generator_matches_hf_greedy():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 7))
    gen = StaticGenerator(model, batch=2, max_len=32)
    tokens, stats = gen.generate(ids, 12)
    ref = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, ref[:, 7:])
    assert stats.decode_tok_s > 0 and stats.prefill_tok_s > 0


def test_static_generator_rejects_overflow():
    gen = StaticGenerator(_tiny_llama(), batch=1, max_len=8)
    with pytest.raises(ValueError, match="do not fit"):
        gen.generate(torch.zeros(1, 6, dtype=torch.long), 4)
