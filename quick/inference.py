"""Fast generation through transformers: a static KV cache and a CUDA graph of the decode step.

Eager decoding of a 7B model at batch 1 spends most of its time launching ~10 kernels per linear layer;
capturing one decode step in a CUDA graph and replaying it removes that overhead, so the time per token
is the kernels' own. The cache is transformers' ``StaticCache`` (fixed shapes, so the graph is valid for
every step); the step's inputs live in static buffers that are updated in place before each replay.

A graph removes launch latency but not the kernels themselves: HF's norms, rotary embedding and residual
adds are ~30 small kernels per layer (~2.5 ms per 7B decode step on an H100). ``compile`` fuses them with
``torch.compile`` (inductor without its own CUDA graphs; our capture then records the fused kernels):
``"step"`` compiles the whole decode step (one compile per batch size, the biggest fusion), ``"regions"``
compiles only each decoder layer's norms, MLP and rotary embedding (small graphs shared by every layer, fast
to compile; attention, cache writes and residual adds stay eager), ``"fast"`` replaces transformers' decode step
by :class:`quick.models.decoder.FastDecoder` (llama-like families: residual add + norm, rotary + cache writes +
attention, and the MLP activation as three compiled functions shared by every layer; the prefill stays
transformers').
The quantized linears are first pinned to their ``torch.library`` ops (:func:`bind_kernels`), because the
dispatcher's Python checks (``data_ptr``, nvcc lookup) would split the compiled graph at every linear.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quick.nn.linear import QuickLinear

COMPILE_MODES = ("none", "step", "regions", "fast")
# torch.compile backend; tests switch it to "eager" to check tracing (graph breaks) without inductor's build.
COMPILE_BACKEND = "inductor"


class KernelQuickLinear(QuickLinear):
    """A CUDA ``QuickLinear`` bound once to one kernel op: its forward is that op and nothing else.

    Made by :func:`bind_kernels` (class swap; same buffers, same ``state_dict``). ``_bound`` names the op
    (an entry of :data:`BOUND_OPS`)."""

    _bound: str = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"input dtype {x.dtype} != layer dtype {self.dtype} (cast the input or the layer)")
        if x.shape[-1] != self.in_features:
            if x.shape[-1] != self.logical_in_features:
                raise ValueError(f"input last dim {x.shape[-1]} != in_features {self.logical_in_features}")
            x = F.pad(x, (0, self.in_features - x.shape[-1]))
        lead = x.shape[:-1]
        out = BOUND_OPS[self._bound][1](self, x.reshape(-1, self.in_features).contiguous())
        out = out.reshape(*lead, self.out_features)
        return out + self.bias if self.bias is not None else out


def _quick_ok(mod: QuickLinear, probe: torch.Tensor) -> bool:
    from quick.kernels import (
        mma,
        ops,  # noqa: F401 - importing ops defines torch.ops.quick.gemm_w4a16
    )

    return mod.layout_name == "quick" and mma.is_available(probe)


def _quick_call(mod: QuickLinear, x2: torch.Tensor) -> torch.Tensor:
    return torch.ops.quick.gemm_w4a16(x2, mod.qweight, mod.scales, mod.zeros, mod.group_size)


def _sm90_ok(mod: QuickLinear, probe: torch.Tensor) -> bool:
    from quick.kernels import dispatch

    if mod.layout_name != "quick_sm90" or mod.in_features % 64 or mod.out_features % 64:
        return False  # the kernel needs K, N multiples of 64; other layers keep the dispatcher's fallback
    entries = [e for e in dispatch.registered("quick_sm90") if e.name == "quick_sm90"]
    return bool(entries) and entries[0].available(probe) and hasattr(torch.ops.quick, "gemm_w4a16_sm90")


def _sm90_call(mod: QuickLinear, x2: torch.Tensor) -> torch.Tensor:
    return torch.ops.quick.gemm_w4a16_sm90(x2, mod.qweight, mod.scales, mod.zeros, None, mod.group_size)


# name -> (applies(module, probe input), call(module, x2d) -> out2d). The hook for further kernels (e.g. a
# W4A8 layout): add an entry; the first entry that applies to a layer is bound.
BOUND_OPS: dict[str, tuple[Callable[[QuickLinear, torch.Tensor], bool], Callable]] = {
    "quick_sm90": (_sm90_ok, _sm90_call),
    "quick": (_quick_ok, _quick_call),
}


def bind_kernels(model: nn.Module) -> int:
    """Swap every ``QuickLinear`` (backend ``auto``/``kernel``) that a :data:`BOUND_OPS` entry applies to (the
    built-in ones: CUDA tensors with a kernel) for a :class:`KernelQuickLinear` bound to that op; returns how
    many were bound. Layers with no op stay as they are (dispatcher, reference path)."""
    bound = 0
    for mod in model.modules():
        if type(mod) is not QuickLinear or mod.backend == "reference" or mod.perm is not None:
            continue  # a permuted-input layer keeps its forward (which applies the permutation)
        probe = torch.empty(1, mod.in_features, dtype=mod.dtype, device=mod.qweight.device)
        for name, (applies, _call) in BOUND_OPS.items():
            if applies(mod, probe):
                mod.__class__ = KernelQuickLinear
                mod._bound = name
                bound += 1
                break
    return bound


# Module name -> (original, compiled) rotary function replaced by compile_regions. Kept here, not as an attribute
# of the compiled function: transformers >= 5.2x wraps apply_rotary_pos_emb in an object that forwards attribute
# writes to the function it wraps, so an attribute on the compiled wrapper landed on the original (a cycle).
_COMPILED_ROTARY: dict[str, tuple] = {}


def compile_regions(model: nn.Module, dynamic: bool | None = None) -> int:
    """``torch.compile`` each decoder layer's norms and MLP in place, and the family's rotary-embedding function
    (no cache state inside any of them, so one compiled graph serves every layer). Returns how many modules
    were compiled. The rotary function is a module global of the transformers model file: it is replaced for
    every model of that family in this process until :func:`uncompile_regions`."""
    import sys

    from quick.models.families import decoder_layers, get_family

    n = 0
    for layer in decoder_layers(model, get_family(model.config)):
        for name, child in layer.named_children():
            if ("norm" in name.lower() or name == "mlp") and getattr(child, "_compiled_call_impl", None) is None:
                child.compile(dynamic=dynamic, backend=COMPILE_BACKEND)
                n += 1
        attn = getattr(layer, "self_attn", None)
        src = sys.modules.get(type(attn).__module__) if attn is not None else None
        rotary = getattr(src, "apply_rotary_pos_emb", None)
        if rotary is not None and src.__name__ not in _COMPILED_ROTARY:
            compiled = torch.compile(rotary, dynamic=dynamic, backend=COMPILE_BACKEND)
            _COMPILED_ROTARY[src.__name__] = (rotary, compiled)
            src.apply_rotary_pos_emb = compiled
    return n


def uncompile_regions(model: nn.Module) -> None:
    """Undo :func:`compile_regions` (benchmarks compare variants on one loaded model)."""
    import sys

    for mod in model.modules():
        if getattr(mod, "_compiled_call_impl", None) is not None:
            mod._compiled_call_impl = None
        src = sys.modules.get(type(mod).__module__)
        entry = _COMPILED_ROTARY.get(getattr(src, "__name__", None))
        if entry is not None and getattr(src, "apply_rotary_pos_emb", None) is entry[1]:
            src.apply_rotary_pos_emb = entry[0]
            del _COMPILED_ROTARY[src.__name__]


DECODE_ATTENTION = "quick_decode_sdpa"


def _decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA over the static cache for one-token queries, grouped-query heads folded into the query length.

    transformers' own SDPA does this fold only outside ``torch.compile``; traced, it falls back to
    ``repeat_kv``, which copies the whole cache ``num_key_value_groups`` times per layer and step. Every other
    case (prefill, biases, soft-capping, a sliding window shorter than the cache) goes to transformers' SDPA
    unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = query.shape[2] == 1 and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    plain = plain and (not window or window >= key.shape[2]) and (dropout == 0.0 or not module.training)
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    if not (plain and mask_ok):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    b, h, _, d = query.shape
    q = query.reshape(b, h // groups, groups, d)  # [B, KV heads, queries per KV head, D]
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_decode_attention(model: nn.Module) -> bool:
    """Switch a model that uses transformers' ``sdpa`` to :func:`_decode_sdpa` (registered under
    :data:`DECODE_ATTENTION`); returns whether it did (other implementations are left alone).

    Written for several transformers versions: older ones keep attention functions in a plain dict and have
    no ``set_attn_implementation``; some always ``repeat_kv`` at decode, which this also replaces."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) == DECODE_ATTENTION:
        return True
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    if hasattr(ALL_ATTENTION_FUNCTIONS, "register"):
        ALL_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, _decode_sdpa)
    else:
        ALL_ATTENTION_FUNCTIONS[DECODE_ATTENTION] = _decode_sdpa
    try:  # masks: built like sdpa's (we hand in 4-D masks, so this is a formality)
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)
    except (ImportError, AttributeError):
        pass
    try:
        model.set_attn_implementation(DECODE_ATTENTION)
    except Exception:  # noqa: BLE001 - no such method, or a version that validates names strictly
        pass
    if getattr(cfg, "_attn_implementation", None) != DECODE_ATTENTION:
        try:
            cfg._attn_implementation = DECODE_ATTENTION
        except Exception:  # noqa: BLE001
            return False
    return getattr(cfg, "_attn_implementation", None) == DECODE_ATTENTION


def _raise_recompile_limit(limit: int = 1024) -> None:
    """Every batch size (and every generator) is a new specialisation of the decode step; the default limit
    of 8 would silently fall back to eager after the 8th."""
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, key) and getattr(cfg, key) < limit:
            setattr(cfg, key, limit)


def _decode_forward(gen: StaticGenerator, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The decode step as a plain function, so that its compiled form holds no reference to the generator
    (a bound method would make a cycle, and the generator's cache would outlive it until a gc pass)."""
    return gen._forward(ids, pos)


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

    def __init__(
        self,
        model: nn.Module,
        batch: int,
        max_len: int,
        use_graph: bool | None = None,
        compile: str = "none",  # noqa: A002 - the natural name for the option
        decode_attention: bool = True,
        dynamic: bool | None = None,
        graph_prefill: bool = False,
    ) -> None:
        """``dynamic``: torch.compile's flag. ``None`` (automatic): the first batch size compiles static, the
        next one recompiles with the batch dimension symbolic and every later batch size reuses that graph
        (2 builds per model instead of one per batch size); ``False``: one static build per batch size.
        ``graph_prefill``: replay the prefill from a CUDA graph too (see :meth:`prefill`; needs ``use_graph``)."""
        from transformers import StaticCache

        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        self.model = model
        self.device = next(model.parameters()).device
        self.batch, self.max_len = batch, max_len
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.compile = compile
        self.graph_prefill = bool(graph_prefill and self.use_graph)
        self._pgraph: torch.cuda.CUDAGraph | None = None
        self._pids = self._ppos = self._plogits = None
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None
        self._mask_dtype = model.dtype if model.dtype.is_floating_point else torch.float32
        self._compiled: Callable | None = None  # a compiled module-level function: no reference cycle to self
        self._fast = None  # FastDecoder, made at the first decode step (it needs the prefilled cache's tensors)
        self._dynamic = dynamic
        if compile == "fast":
            from quick.models.decoder import check_supported

            check_supported(model, max_len)
        if decode_attention:
            use_decode_attention(model)
        if compile != "none":
            _raise_recompile_limit()
            bind_kernels(model)
            if compile == "regions":
                compile_regions(model, dynamic)
            elif compile == "step":
                self._compiled = torch.compile(_decode_forward, dynamic=dynamic, backend=COMPILE_BACKEND)

    def _mask(self, pos: torch.Tensor) -> torch.Tensor:
        """Additive 4-D mask ``[B, 1, T, max_len]``: query t sees cache slots ``<= pos[t]``.

        Computed from the position tensor on the device, so a graph replay recomputes it for each step. Without
        it, transformers drops the mask for one-token queries and attends to every static slot (also the
        empty ones), and some versions read Python-side state that a captured graph would freeze."""
        dtype = self._mask_dtype
        seen = torch.arange(self.max_len, device=pos.device)[None, :] <= pos[:, None]
        mask = torch.zeros(seen.shape, dtype=dtype, device=pos.device).masked_fill(~seen, torch.finfo(dtype).min)
        return mask[None, None].expand(self.batch, 1, *seen.shape)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # explicit positions: models that derive them from the attention mask and state left by an earlier generate
        # (Qwen-VL's rope deltas) would otherwise read this 4-D additive mask as a padding mask
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask(pos),
            position_ids=pos.view(1, -1).expand(ids.shape[0], -1),
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

    def _prefill_eager(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        set_stance = getattr(torch.compiler, "set_stance", None)
        if self.compile == "regions" and set_stance is not None:
            with set_stance("force_eager"):  # prompt shapes are not worth a build each
                return self._forward(ids, pos)
        return self._forward(ids, pos)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the last prompt position; fills the cache. Never compiled (each prompt shape would be a
        build). With ``graph_prefill`` the forward is captured once per prompt shape and replayed, so a
        benchmark times the GPU work rather than the Python launch of ~1,000 kernels (eager, a 7B prefill of
        128 tokens at batch 1 measured 26 ms for fp16 and 116 ms for quick_sm90 on the H100)."""
        pos = torch.arange(input_ids.shape[1], device=self.device)
        if not self.graph_prefill:
            return self._prefill_eager(input_ids, pos)
        if self._pgraph is None or tuple(self._pids.shape) != tuple(input_ids.shape):
            self._capture_prefill(input_ids)
        self._pids.copy_(input_ids)
        self._pgraph.replay()
        return self._plogits

    def _capture_prefill(self, input_ids: torch.Tensor) -> None:
        self._pids = input_ids.clone()
        self._ppos = torch.arange(input_ids.shape[1], device=self.device)
        snap = self._counters()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: also allocates the cache tensors (lazily, on first update)
            self._prefill_eager(self._pids, self._ppos)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._restore(snap)
        snap = self._counters()  # the lazy allocation replaced the counter tensors by device ones
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._plogits = self._prefill_eager(self._pids, self._ppos)
        self._restore(snap)
        self._pgraph = graph

    def _capture(self) -> None:
        snap = self._counters()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up outside the graph (allocator, lazy kernel compilation)
            for _ in range(2):
                self._step(self._ids, self._pos)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._restore(snap)  # the warm-up steps must not count as decoded tokens
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._step(self._ids, self._pos)
        self._restore(snap)  # capture ran the Python side once more (it executed no kernels)

    def _step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.compile == "fast":
            if self._fast is None:
                from quick.models.decoder import FastDecoder

                self._fast = FastDecoder(
                    self.model, self.cache, self.max_len, backend=COMPILE_BACKEND, dynamic=self._dynamic
                )
            return self._fast(ids, pos, self._mask(pos))
        return self._forward(ids, pos) if self._compiled is None else self._compiled(self, ids, pos)

    @torch.inference_mode()
    def decode_step(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Logits for one new token per sequence at cache position ``position``."""
        self._ids.copy_(ids.view(self.batch, 1))
        self._pos.fill_(position)
        if not self.use_graph:
            return self._step(self._ids, self._pos)
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
        # each call starts from an empty cache: transformers 5.x's static layers write the prompt at their own
        # token counter, so without this a second call would append its prompt after the first call's tokens
        self.cache.reset()
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
