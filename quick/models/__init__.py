"""Models: the embedded SmolLM2 (GGUF -> cached safetensors checkpoint) and loading of HF directories."""

from quick.models.loading import (
    ModelLoadError,
    convert_gguf_to_checkpoint,
    default_model_dir,
    load_model,
    smollm2_gguf_path,
)

__all__ = ["ModelLoadError", "convert_gguf_to_checkpoint", "default_model_dir", "load_model", "smollm2_gguf_path"]
