"""Optional lm-evaluation-harness adapter: run harness tasks on a dense or quantized ``quick`` model.

The harness already knows how to drive a Hugging Face ``PreTrainedModel`` (its ``HFLM`` class); a quantized model
is one, with ``QuickLinear`` modules inside, so the adapter hands it over as an instance instead of letting the
harness load weights itself. Tasks fetch their datasets from the hub, so they only run where one is reachable.
Install with ``pip install lm-eval`` (or ``pip install "quick[lmeval]"``).
"""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install lm-eval"


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:  # optional dependency
        raise ImportError(INSTALL_HINT) from exc
    return lm_eval, HFLM


def harness_model(model: Any, tokenizer: Any, batch_size: int = 1, max_length: int | None = None) -> Any:
    """Wrap ``model`` (a ``PreTrainedModel``, e.g. ``AutoQuickForCausalLM(...).model``) as an ``lm_eval`` LM."""
    _, HFLM = _harness()
    if tokenizer is None:
        raise ValueError("the harness needs the model's tokenizer (checkpoint has no tokenizer files?)")
    device = next(model.parameters()).device
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=str(device))


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` on the wrapped model."""
    if not tasks:
        raise ValueError("name at least one lm-eval task (e.g. arc_easy, hellaswag)")
    lm_eval, _ = _harness()
    lm = harness_model(model, tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    results = out.get("results", {}) if out else {}
    return {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in results.items()
    }
