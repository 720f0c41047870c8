"""The marker that makes plain transformers refuse a QUICK checkpoint instead of loading random weights.

transformers skips a ``quantization_config`` whose ``quant_method`` it does not know (a warning), builds dense
``nn.Linear`` layers, finds no ``weight`` for them in the files and initialises them at random: the model loads
and generates nonsense. The one field of ``config.json`` that transformers checks before reading any weight is
``transformers_weights`` (the weight file to load); a value that is not a safetensors file name stops it with a
``ValueError`` that quotes the value. QUICK checkpoints carry :data:`LOAD_GUARD` there, so the error tells the
user what to do; the registered quantizer (:mod:`quick.integrations.transformers`) removes it before transformers
resolves the files. Only stdlib here: the writer imports this without torch or transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

GUARD_KEY = "transformers_weights"
LOAD_GUARD = (
    "QUICK 4-bit checkpoint (quantization_config.quant_method 'quick'). transformers cannot read it by itself: "
    "pip install quick-llm, then `import quick` before from_pretrained (or load it with "
    "quick.AutoQuickForCausalLM.from_quantized)"
)
QUANT_METHOD = "quick"


def add_load_guard(checkpoint_dir: str | os.PathLike) -> bool:
    """Write :data:`LOAD_GUARD` into ``checkpoint_dir/config.json`` when its ``quant_method`` is ``quick``
    (AutoAWQ-format checkpoints stay readable by transformers' own AWQ loader); True when written."""
    path = Path(checkpoint_dir) / "config.json"
    raw = json.loads(path.read_text())
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return False
    raw[GUARD_KEY] = LOAD_GUARD
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return True


def drop_load_guard(config: Any) -> Any:
    """Remove the guard from a transformers config object (it names no file); returns ``config``."""
    if getattr(config, GUARD_KEY, None) == LOAD_GUARD:
        delattr(config, GUARD_KEY)
    return config
