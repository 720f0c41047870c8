"""The calibration pass AWQ and QQQ share: capture what each decoder layer receives, then quantize the layers one at
a time, each on the compute device in the calibration dtype, with only the current layer off the model's device.

The inputs of the first layer, and the keyword arguments every layer receives (rotary position embeddings,
attention mask; Gemma3 passes different ones to sliding-window and global layers), are captured by temporarily
replacing every layer with a catcher that records its call and passes the hidden states through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quick.formats.weights import SUPPORTED_DTYPES, QuantizationError
from quick.models.families import ModelFamily, decoder_layers, get_family
from quick.nn.dtypes import round_dense_


class _StopForward(Exception):
    """Raised by the last catcher: the rest of the model (final norm, lm_head) is not needed."""


@dataclass
class LayerInputs:
    """Calibration inputs of the first decoder layer, in chunks, and the kwargs every layer is called with.

    ``hidden[c]`` is chunk ``c`` ``[B, S, H]``; ``kwargs[i][c]`` the keyword arguments layer ``i`` received
    for chunk ``c`` (tensors on the compute device).
    """

    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]


class _Catcher(nn.Module):
    def __init__(self, index: int, store: LayerInputs, last: bool) -> None:
        super().__init__()
        self.index, self.store, self.last = index, store, last

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:
            raise QuantizationError("decoder layer called with extra positional arguments; expected keywords")
        if self.index == 0:
            self.store.hidden.append(hidden_states.detach())
        self.store.kwargs[self.index].append(dict(kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def calibration_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls there are ~50x slower and less exact); the model's dtype on GPU."""
    if device.type == "cpu" or model_dtype not in SUPPORTED_DTYPES:
        return torch.float32
    return model_dtype


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    samples: torch.Tensor,
    family: ModelFamily | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LayerInputs:
    """Run the model's embedding part on ``samples`` [n, seqlen] and record what each decoder layer gets.

    Only the non-layer modules (embeddings, rotary tables) visit the compute device; the layers are swapped
    for catchers during the pass, so they are neither moved nor run.
    """
    family = family or get_family(model.config)
    device = torch.device(device) if device is not None else default_device()
    layers = decoder_layers(model, family)
    originals = list(layers)
    store = LayerInputs(hidden=[], kwargs=[[] for _ in originals])
    for i in range(len(originals)):
        layers[i] = _Catcher(i, store, last=i == len(originals) - 1)
    home = next(model.parameters()).device
    try:
        model.to(device)
        for start in range(0, samples.shape[0], batch_size):
            ids = samples[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        model.to(home)
    if len(store.hidden) * batch_size < samples.shape[0] or any(len(k) != len(store.hidden) for k in store.kwargs):
        raise QuantizationError("calibration pass did not reach every decoder layer for every chunk")
    store.hidden = [h.to(dtype) for h in store.hidden]
    store.kwargs = [[_cast_floats(kw, dtype) for kw in per_layer] for per_layer in store.kwargs]
    return store


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Cast floating tensors (rotary cos/sin, additive masks) inside kwargs to the calibration dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def calibration_setup(
    model: nn.Module, samples: torch.Tensor, family: ModelFamily | None, device: torch.device | str | None,
    dtype: torch.dtype | None, batch_size: int, search_samples: int | None, cpu_search_samples: int, what: str,
) -> tuple[ModelFamily, torch.device, torch.dtype, int | None]:  # fmt: skip
    """The checks and defaults of a calibrated quantization: ``(family, device, dtype, n_search_chunks)``. ``dtype``
    (called ``what`` in its error) defaults to the model's when fp16/bf16, else fp16; the search runs on
    ``search_samples`` (default: all on GPU, ``cpu_search_samples`` on CPU), counted in chunks of ``batch_size``."""
    family = family or get_family(model.config)
    device = torch.device(device) if device is not None else default_device()
    model_dtype = next(model.parameters()).dtype
    dtype = dtype or (model_dtype if model_dtype in SUPPORTED_DTYPES else torch.float16)
    if dtype not in SUPPORTED_DTYPES:
        raise QuantizationError(f"{what} must be float16 or bfloat16, got {dtype}")
    if samples.dim() != 2 or samples.dtype not in (torch.int64, torch.int32):
        raise QuantizationError(f"calibration samples must be integer token ids [n, seqlen], got {samples.shape}")
    if batch_size < 1:
        raise QuantizationError(f"batch_size must be positive, got {batch_size}")
    if search_samples is None and device.type == "cpu":
        search_samples = cpu_search_samples
    return family, device, dtype, None if search_samples is None else max(1, math.ceil(search_samples / batch_size))


LayerStep = Callable[[int, nn.Module, list[torch.Tensor], list[dict[str, Any]]], list[torch.Tensor]]


@torch.no_grad()
def calibrate_layers(
    model: nn.Module, samples: torch.Tensor, family: ModelFamily, device: torch.device, batch_size: int,
    dense_dtype: torch.dtype, step: LayerStep, desc: str, progress: bool = True,
    on_layer: Callable[[int, nn.Module], None] | None = None,
) -> None:  # fmt: skip
    """Capture the first layer's inputs, then ``hidden = step(index, layer, hidden, kwargs)`` for every decoder layer
    in order, the layer on ``device`` in the calibration dtype. Afterwards the layer's dense leftovers (norms) are
    rounded to ``dense_dtype`` (what a checkpoint stores) and go back to the model's dtype, the layer to the model's
    device, and ``on_layer(index, layer)`` sees it. The model is in eval mode meanwhile, its own mode afterwards."""
    model_dtype = next(model.parameters()).dtype
    work = calibration_dtype(model_dtype, device)
    home = next(model.parameters()).device
    was_training = model.training
    model.eval()
    inputs = capture_layer_inputs(model, samples, family, batch_size, device, work)
    layers = decoder_layers(model, family)
    hidden = inputs.hidden
    for idx in tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress):
        layer = layers[idx].to(device=device, dtype=work)
        hidden = step(idx, layer, hidden, inputs.kwargs[idx])
        round_dense_(layer, dense_dtype)
        for p in layer.parameters():
            p.data = p.data.to(model_dtype)
        layers[idx] = layer.to(home)
        if on_layer is not None:
            on_layer(idx, layers[idx])
    model.train(was_training)
