"""Evaluation: windowed perplexity."""

from quick.eval.perplexity import eval_windows, perplexity, tokenize_eval_text

__all__ = ["eval_windows", "perplexity", "tokenize_eval_text"]
