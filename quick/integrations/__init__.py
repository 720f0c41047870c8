"""Bridges to other frameworks: transformers (``from_pretrained`` of QUICK checkpoints) and PEFT (LoRA on
``QuickLinear``). Each submodule imports its framework itself; importing this package imports neither."""
