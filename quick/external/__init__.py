"""Import 4-bit checkpoints written by other libraries (compressed-tensors / llm-compressor, GPTQModel / AutoGPTQ).

Each importer turns one linear's stored tensors into the project's unpacked :class:`QuantizedWeight` plus an optional
input permutation (act-order); :func:`importer_for` picks one from a ``quantization_config``. The shared pieces are in
:mod:`quick.external.base`; the checkpoint loader (:mod:`quick.checkpoint`) drives the importers.
"""

from __future__ import annotations

from typing import Any

from quick.external.base import (
    FORMATS,
    ExternalFormatError,
    ImportedLinear,
    Importer,
    build_linear,
    check_group_size,
    detect_format,
    scale_dtype,
)
from quick.external.compressed_tensors import CompressedTensorsImporter
from quick.external.gptq import GptqImporter

__all__ = [
    "CompressedTensorsImporter",
    "ExternalFormatError",
    "FORMATS",
    "GptqImporter",
    "ImportedLinear",
    "Importer",
    "build_linear",
    "check_group_size",
    "detect_format",
    "importer_for",
    "scale_dtype",
]


def importer_for(qc: dict[str, Any]) -> Importer:
    """The importer of an external ``quantization_config`` (raises for 'quick'/'awq', which need none)."""
    fmt = detect_format(qc)
    if fmt == "compressed-tensors":
        return CompressedTensorsImporter(qc)
    if fmt == "gptq":
        return GptqImporter(qc)
    raise ExternalFormatError(f"format '{fmt}' is read by quick.checkpoint directly, not by an importer")
