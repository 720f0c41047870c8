"""Fast generation through transformers: a static KV cache and a CUDA graph of the decode step.

Eager decoding of a 7B model at batch 1 spends most of its time launching ~10 kernels per linear layer;
capturing one decode step in a CUDA graph and replaying it removes that overhead, so the time per token
is the kernels' own. The cache is transformers' ``StaticCache`` (fixed shapes, so the graph is valid for
every step); the step's inputs live in static buffers that are updated in place before each replay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GenerationStats:
    prefill_s: float
    decode_s: float
    batch: int
    prompt_len: int
    new_tokens: int

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        return self.batch * max(self.new_tokens - 1, 1) / max(self.decode_s, 1e-12)


class StaticGenerator:
    """Greedy generation with a static cache; the decode step replays a captured CUDA graph on GPU."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, use_graph: bool | None = None) -> None:
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.batch, self.max_len = batch, max_len
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None

    def _mask(self, pos: torch.Tensor) -> torch.Tensor:
        """Additive 4-D mask ``[B, 1, T, max_len]``: query t sees cache slots ``<= pos[t]``.

        Computed from the position tensor on the device, so a graph replay recomputes it for each step. Without
        it, transformers drops the mask for one-token queries and attends to every static slot (also the
        empty ones), and some versions read Python-side state that a captured graph would freeze."""
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        seen = torch.arange(self.max_len, device=pos.device)[None, :] <= pos[:, None]
        mask = torch.zeros(seen.shape, dtype=dtype, device=pos.device).masked_fill(~seen, torch.finfo(dtype).min)
        return mask[None, None].expand(self.batch, 1, *seen.shape)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask(pos),
            past_key_values=self.cache,
            cache_position=pos,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def _counters(self) -> list[tuple[object, str, object]]:
        """Snapshot of the cache's own position counters (transformers 5.x static layers keep one, a device
        scalar in some versions, a Python int in others); warm-up forwards must not advance them."""
        snap = []
        for layer in getattr(self.cache, "layers", []):
            for name, v in vars(layer).items():
                if isinstance(v, torch.Tensor) and v.dim() == 0:
                    snap.append((layer, name, v.clone()))
                elif isinstance(v, int) and not isinstance(v, bool) and "length" in name and "max" not in name:
                    snap.append((layer, name, v))
        return snap

    @staticmethod
    def _restore(snap: list[tuple[object, str, object]]) -> None:
        for layer, name, v in snap:
            if isinstance(v, torch.Tensor):
                getattr(layer, name).copy_(v)
            else:
                setattr(layer, name, v)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=self.device)
        return self._forward(input_ids, pos)

    def _capture(self) -> None:
        snap = self._counters()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up outside the graph (allocator, lazy kernel compilation)
            for _ in range(2):
                self._forward(self._ids, self._pos)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._restore(snap)  # the warm-up steps must not count as decoded tokens
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._forward(self._ids, self._pos)
        self._restore(snap)  # capture ran the Python side once more (it executed no kernels)

    @torch.inference_mode()
    def decode_step(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Logits for one new token per sequence at cache position ``position``."""
        self._ids.copy_(ids.view(self.batch, 1))
        self._pos.fill_(position)
        if not self.use_graph:
            return self._forward(self._ids, self._pos)
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, GenerationStats]:
        """Greedy decode exactly ``max_new_tokens`` tokens (no early stop: benchmarks need full length)."""
        b, t = input_ids.shape
        if b != self.batch or t + max_new_tokens > self.max_len:
            raise ValueError(f"batch {b} / length {t + max_new_tokens} do not fit ({self.batch}, {self.max_len})")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        nxt = self.prefill(input_ids).argmax(-1)
        sync()
        t1 = time.perf_counter()
        out = [nxt]
        for i in range(max_new_tokens - 1):
            nxt = self.decode_step(nxt, t + i).argmax(-1)
            out.append(nxt)
        sync()
        t2 = time.perf_counter()
        tokens = torch.stack(out, dim=1)
        return tokens, GenerationStats(t1 - t0, t2 - t1, b, t, max_new_tokens)
