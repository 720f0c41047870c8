"""4-bit experts of a mixture-of-experts block: every expert's packed weights stacked along a leading expert dim.

:class:`QuickExpertStack` holds ``E`` weights of one shape ``[K, N]`` in one packed layout (the same layouts and
pack functions as :class:`~quick.nn.linear.QuickLinear`), each tensor of the layout with a leading ``[E]`` dim, so
expert ``e``'s tensors are ``t[e]`` -- contiguous, at a fixed stride, as a grouped kernel indexes them.
:class:`QuickMoEExperts` replaces transformers' experts module of one MoE block (same call signature): gate|up
stacked as one ``[H, 2I]`` weight per expert (gate columns first, as ``QuickLinear.forward_gated`` reads them) and
down as ``[I, H]``; transformers' own block keeps routing. :func:`build_plan` sorts the routed (token, slot) pairs
by expert, padded per expert to a block size (vLLM's ``moe_align_block_size``), the input of a grouped kernel;
:meth:`QuickMoEExperts.forward_planned` consumes such a plan block by block, the contract a kernel must meet.
Design and status: docs/moe.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quick.formats.layouts import Layout, LayoutError, get_layout
from quick.formats.weights import SUPPORTED_DTYPES, QuantizationError, QuantizedWeight, quantize
from quick.kernels.moe import ACTIVATIONS, plan_capacity
from quick.nn.linear import BACKENDS, PackedModule, check_dims, padded_in_features, positive_int


class QuickExpertStack(PackedModule):
    """``num_experts`` packed 4-bit weights ``[K, N]`` (``y_e = x @ dequant(W_e)``) in one layout.

    Buffers are the layout's tensors with a leading expert dim (``qweight [E, ...]``, ``scales [E, K/G, N]``, ...), so
    ``state_dict`` is the checkpoint format. K is zero-padded to whole groups and layout blocks as in
    :class:`~quick.nn.linear.QuickLinear` (``logical_in_features`` is the real K).
    """

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, group_size: int = 128, layout: str = "quick",
        dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
        logical_in_features: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        dims = {"num_experts": num_experts, "in_features": in_features, "out_features": out_features}
        self.logical_in_features = check_dims("QuickExpertStack", dtype, dims, logical_in_features)
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.group_size, self.layout_name, self.dtype = group_size, layout, dtype
        lay = self.layout
        lay.check(in_features, out_features, group_size)
        for name, spec in lay.tensor_specs(in_features, out_features, group_size).items():
            shape = (num_experts, *spec.shape)
            self.register_buffer(name, torch.zeros(shape, dtype=spec.dtype or dtype, device=device))
        self._ref_cache: tuple | None = None

    @property
    def layout(self) -> Layout:
        return get_layout(self.layout_name)

    def tensor_names(self) -> list[str]:
        return list(self.layout.tensor_specs(self.in_features, self.out_features, self.group_size))

    def packed(self) -> dict[str, torch.Tensor]:
        """The stacked layout tensors ``{name: [E, ...]}``."""
        return {n: getattr(self, n) for n in self.tensor_names()}

    def expert(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s layout tensors (views), what ``QuickLinear.packed()`` holds for one linear."""
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} out of range [0, {self.num_experts})")
        return {n: t[e] for n, t in self.packed().items()}

    def unpack(self, e: int) -> QuantizedWeight:
        return self.layout.unpack(self.expert(e), self.in_features, self.out_features, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weights in ``nn.Linear`` orientation ``[E, N, logical K]``."""
        dt = dtype or self.dtype
        ws = [self.unpack(e).dequantize(dt).t()[:, : self.logical_in_features] for e in range(self.num_experts)]
        return torch.stack(ws)

    def reference_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`dequantized_weight`, cached on CPU until a packed buffer changes (as QuickLinear's reference)."""
        if self.qweight.device.type != "cpu":
            return self.dequantized_weight(dtype)
        key = (dtype, *[(b.data_ptr(), b._version) for b in self.packed().values()])
        if self._ref_cache is None or self._ref_cache[0] != key:
            self._ref_cache = (key, self.dequantized_weight(dtype))
        return self._ref_cache[1]

    def tensors_in(self, layout: str) -> dict[str, torch.Tensor]:
        """The stacked tensors in ``layout`` (each expert repacked exactly when it is not the stack's own)."""
        if layout == self.layout_name:
            return self.packed()
        dst = get_layout(layout)
        dst.check(self.in_features, self.out_features, self.group_size)
        per_expert = [dst.pack(self.unpack(e)) for e in range(self.num_experts)]
        return {n: torch.stack([p[n] for p in per_expert]) for n in per_expert[0]}

    def repacked(self, layout: str) -> QuickExpertStack:
        """The same experts packed in ``layout`` (a new stack; exact)."""
        new = QuickExpertStack(self.num_experts, self.in_features, self.out_features, self.group_size, layout,
                               self.dtype, "meta", self.logical_in_features)  # fmt: skip
        for name, t in self.tensors_in(layout).items():
            new.register_buffer(name, t.contiguous())
        return new

    @classmethod
    def from_quantized(
        cls, qws: Sequence[QuantizedWeight], layout: str = "quick", logical_in_features: int | None = None
    ) -> QuickExpertStack:
        """Pack one :class:`QuantizedWeight` per expert (all of one shape, group size and scale dtype)."""
        if not qws:
            raise ValueError("need at least one expert weight")
        first = qws[0]
        for e, qw in enumerate(qws):
            if qw.shape != first.shape or qw.group_size != first.group_size or qw.scales.dtype != first.scales.dtype:
                raise ValueError(
                    f"expert {e}: shape {qw.shape}, group size {qw.group_size}, scales {qw.scales.dtype} differ from "
                    f"expert 0's {first.shape}, {first.group_size}, {first.scales.dtype}"
                )
        k, n = first.shape
        dev = first.q.device
        mod = cls(len(qws), k, n, first.group_size, layout, first.scales.dtype, dev, logical_in_features)
        lay = mod.layout
        for e, qw in enumerate(qws):
            for name, t in lay.pack(qw).items():
                getattr(mod, name)[e].copy_(t)
        return mod

    @classmethod
    def from_weights(
        cls, weight: torch.Tensor, group_size: int = 128, layout: str = "quick", zero_point: bool = True,
        dtype: torch.dtype | None = None,
    ) -> QuickExpertStack:  # fmt: skip
        """Round-to-nearest each expert of ``weight [E, N, K]`` (``nn.Linear`` orientation per expert) and pack."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"expert weights must be a 3-D tensor [experts, out, in], got {shape}")
        dtype = dtype or (weight.dtype if weight.dtype in SUPPORTED_DTYPES else torch.float16)
        k = weight.shape[2]
        kp = padded_in_features(k, group_size, layout)
        w = F.pad(weight.detach(), (0, kp - k)) if kp != k else weight.detach()
        return cls.from_quantized(
            [quantize(w[e], group_size, zero_point=zero_point, dtype=dtype) for e in range(len(w))], layout, k
        )

    def extra_repr(self) -> str:
        pad = f" (padded from {self.logical_in_features})" if self.logical_in_features != self.in_features else ""
        return (
            f"experts={self.num_experts}, in_features={self.in_features}{pad}, out_features={self.out_features}, "
            f"group_size={self.group_size}, layout={self.layout_name}, dtype={self.dtype}"
        )


# ------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MoEPlan:
    """The routed (token, slot) pairs of one batch sorted by expert, as a grouped kernel consumes them.

    ``sorted_ids [capacity]`` int32: flat slot ids ``token * top_k + slot`` grouped by expert in increasing order,
    each expert's run padded with ``pad_id`` (= ``num_tokens * top_k``) to a multiple of ``block_size``; expert ``e``
    owns ``sorted_ids[offsets[e]:offsets[e + 1]]``, ``counts[e]`` of them real. ``block_experts [capacity /
    block_size]`` int32: the expert of each block of ``block_size`` rows, ``-1`` for blocks past ``num_padded``
    (a kernel launched over the capacity skips them). ``num_padded [1]`` int32 stays a tensor, so that a kernel reads
    it on the device without a host sync. Slots routed to expert id ``num_experts`` (transformers' marker of a
    dropped slot) appear nowhere. Experts with no token own no block.
    """

    sorted_ids: torch.Tensor
    block_experts: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    num_padded: torch.Tensor
    num_tokens: int
    top_k: int
    block_size: int

    @property
    def pad_id(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def num_experts(self) -> int:
        return self.counts.numel()


def build_plan(
    top_k_index: torch.Tensor, num_experts: int, block_size: int = 16, static: bool = False, check: bool = True
) -> MoEPlan:
    """Sort the slots of ``top_k_index [T, k]`` by expert, padding each expert's run to ``block_size`` rows.

    ``static``: size ``sorted_ids`` and ``block_experts`` by :func:`plan_capacity` (shapes independent of the
    routing, as a CUDA graph needs) instead of the exact padded length. A static plan is built without reading
    anything back to the host (CUDA-graph capturable) when ``check`` is False: ids are then not validated, and ids
    outside ``[0, num_experts]`` count as dropped slots."""
    if not isinstance(top_k_index, torch.Tensor):
        raise TypeError(f"top_k_index must be a torch.Tensor, got {type(top_k_index).__name__}")
    if top_k_index.dim() != 2 or top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise ValueError(
            f"top_k_index must be an integer tensor [tokens, top_k], got {top_k_index.dtype} {tuple(top_k_index.shape)}"
        )
    positive_int("num_experts", num_experts)
    positive_int("block_size", block_size)
    t, k = top_k_index.shape
    dev = top_k_index.device
    flat = top_k_index.reshape(-1).long()
    if check and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > num_experts):
        raise ValueError(
            f"expert ids must lie in [0, {num_experts}) ({num_experts} marks a dropped slot), got "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    if not check:  # unchecked ids must still index the count buffers safely
        flat = torch.where((flat < 0) | (flat > num_experts), num_experts, flat)
    counts_all = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    counts = counts_all[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=dev)
    offsets[1:] = padded.cumsum(0)
    total = offsets[-1]
    capacity = plan_capacity(t, k, num_experts, block_size) if static else int(total)
    order = torch.sort(flat, stable=True).indices
    expert_of = flat[order]  # dropped slots (expert id num_experts) sort last and go to a discarded extra row
    run_start = counts_all.cumsum(0) - counts_all  # unpadded start of each expert's run within `order`
    rank = torch.arange(order.numel(), device=dev) - run_start[expert_of]
    dest = torch.where(expert_of < num_experts, offsets[expert_of] + rank, capacity)
    sorted_ids = torch.full((capacity + 1,), t * k, dtype=torch.int32, device=dev)
    sorted_ids = sorted_ids.scatter_(0, dest, order.to(torch.int32))[:capacity]
    block_starts = torch.arange(0, capacity, block_size, device=dev)
    block_experts = torch.searchsorted(offsets[1:], block_starts, right=True).to(torch.int32)
    block_experts = torch.where(block_starts >= total, -1, block_experts).to(torch.int32)
    return MoEPlan(
        sorted_ids=sorted_ids,
        block_experts=block_experts,
        offsets=offsets.to(torch.int32),
        counts=counts.to(torch.int32),
        num_padded=total.reshape(1).to(torch.int32),
        num_tokens=t,
        top_k=k,
        block_size=block_size,
    )


def static_plan(top_k_index: torch.Tensor, num_experts: int, block_size: int) -> MoEPlan:
    """``build_plan(top_k_index, num_experts, block_size, static=True, check=False)``: one kernel launch where the
    plan kernel takes the ids (CUDA, decode-sized batches), else the PyTorch ops. Capturable in a CUDA graph."""
    from quick.kernels import moe as qmoe

    t, k = top_k_index.shape
    if not qmoe.plan_kernel_takes(top_k_index, num_experts):
        return build_plan(top_k_index, num_experts, block_size, static=True, check=False)
    from quick.kernels import ops  # noqa: F401  (registers torch.ops.quick.moe_plan)

    capacity = plan_capacity(t, k, num_experts, block_size)
    sorted_ids, block_experts, offsets, counts, num_padded = torch.ops.quick.moe_plan(
        top_k_index, num_experts, block_size, capacity
    )
    return MoEPlan(sorted_ids, block_experts, offsets, counts, num_padded, t, k, block_size)


def routing_facts(idx: torch.Tensor, num_experts: int) -> tuple[int, int, bool]:
    """``(min id, max id, distinct)`` of ``idx [T, k]`` (non-empty) in one host synchronisation; ``distinct``: no row
    names one expert twice (dropped slots, id ``num_experts``, aside)."""
    dup = torch.zeros((), dtype=torch.bool, device=idx.device)
    if idx.shape[1] > 1:
        s = idx.sort(dim=1).values
        dup = ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] < num_experts)).any()
    lo, hi, d = torch.stack([idx.min().long(), idx.max().long(), dup.long()]).tolist()
    return lo, hi, not d


# ---------------------------------------------------------------------------------------------- the experts


class QuickMoEExperts(nn.Module):
    """All experts of one MoE block, 4-bit, as a drop-in for transformers' experts module.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``: for each token the sum
    over its ``k`` slots of ``weight * down_e(act(gate_e(x)) * up_e(x))``, exactly what transformers' experts module
    computes; the router (the family's softmax / top-k / renormalisation) stays in transformers' block. The products
    see what a half-precision kernel sees: inputs and outputs of each product rounded to the packed dtype, math in
    fp32 (CPU) or that dtype (GPU); the weighted sum is accumulated in fp32 and returned in the input's dtype.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act: str = "silu",
        group_size: int = 128,
        layout: str = "quick",
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported expert activation {act!r}; supported: {sorted(ACTIVATIONS)}")
        positive_int("hidden_size", hidden_size)
        positive_int("intermediate_size", intermediate_size)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.act = act
        self.backend = "auto"

        def stack(k: int, n: int) -> QuickExpertStack:
            kp = padded_in_features(k, group_size, layout)
            return QuickExpertStack(num_experts, kp, n, group_size, layout, dtype, device, k)

        self.gate_up = stack(hidden_size, 2 * intermediate_size)
        self.down = stack(intermediate_size, hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up.dtype

    @property
    def layout_name(self) -> str:
        return self.gate_up.layout_name

    @property
    def group_size(self) -> int:
        return self.gate_up.group_size

    def repack_(self, layout: str) -> bool:
        """Repack both stacks into ``layout`` (exact) where it holds their shapes; False, unchanged, where not."""
        if layout == self.layout_name:
            return True
        lay = get_layout(layout)
        try:
            for st in (self.gate_up, self.down):
                lay.check(st.in_features, st.out_features, st.group_size)
        except (LayoutError, QuantizationError):
            return False
        self.gate_up, self.down = self.gate_up.repacked(layout), self.down.repacked(layout)
        return True

    @classmethod
    def from_stacks(cls, gate_up: QuickExpertStack, down: QuickExpertStack, act: str = "silu") -> QuickMoEExperts:
        """Wrap two packed stacks (``gate_up``: ``[H, 2I]`` per expert, gate columns first; ``down``: ``[I, H]``)."""
        e, h, two_i = gate_up.num_experts, gate_up.logical_in_features, gate_up.out_features
        if two_i % 2 or down.num_experts != e or down.logical_in_features != two_i // 2 or down.out_features != h:
            raise ValueError(
                f"gate_up ({e} experts, {h} -> {two_i}) and down ({down.num_experts} experts, "
                f"{down.logical_in_features} -> {down.out_features}) are not one gated MLP per expert"
            )
        if (down.dtype, down.layout_name, down.group_size) != (gate_up.dtype, gate_up.layout_name, gate_up.group_size):
            raise ValueError("gate_up and down must share dtype, layout and group size")
        mod = cls(e, h, two_i // 2, act, gate_up.group_size, gate_up.layout_name, gate_up.dtype, "meta")
        mod.gate_up, mod.down = gate_up, down
        return mod

    @classmethod
    def from_weights(
        cls,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        act: str = "silu",
        group_size: int = 128,
        layout: str = "quick",
        zero_point: bool = True,
        dtype: torch.dtype | None = None,
    ) -> QuickMoEExperts:
        """Round-to-nearest transformers' fused expert weights ``gate_up [E, 2I, H]`` and ``down [E, H, I]``."""
        gu = QuickExpertStack.from_weights(gate_up, group_size, layout, zero_point, dtype)
        dn = QuickExpertStack.from_weights(down, group_size, layout, zero_point, gu.dtype)
        return cls.from_stacks(gu, dn, act)

    def dequantized_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [E, 2I, H], down [E, H, I])``: transformers' fused parameters holding the 4-bit values."""
        return self.gate_up.dequantized_weight(dtype), self.down.dequantized_weight(dtype)

    def plan(self, top_k_index: torch.Tensor, block_size: int = 16, static: bool = False) -> MoEPlan:
        """The sorted-token plan of this routing (:func:`build_plan`), the input of a grouped kernel."""
        return build_plan(top_k_index, self.num_experts, block_size, static)

    def _check(
        self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate and flatten to ``[T, H]``, ``[T, k]``, ``[T, k]``."""
        for name, t in (("hidden_states", x), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [..., {self.hidden_size}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"hidden_states must be floating point, got {x.dtype}")
        if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
            raise TypeError(f"top_k_index must hold integer expert ids, got {top_k_index.dtype}")
        if not top_k_weights.is_floating_point():
            raise TypeError(f"top_k_weights must be floating point, got {top_k_weights.dtype}")
        lead = tuple(x.shape[:-1])
        if top_k_index.dim() != len(lead) + 1 or tuple(top_k_index.shape[:-1]) != lead:
            raise ValueError(f"top_k_index {tuple(top_k_index.shape)} does not match hidden_states {tuple(x.shape)}")
        if top_k_weights.shape != top_k_index.shape:
            raise ValueError(
                f"top_k_weights {tuple(top_k_weights.shape)} and top_k_index {tuple(top_k_index.shape)} differ"
            )
        for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
            if t.device != x.device:
                raise ValueError(f"{name} on {t.device} but hidden_states on {x.device}")
        if x.device != self.gate_up.qweight.device:
            raise ValueError(f"hidden_states on {x.device} but the expert weights on {self.gate_up.qweight.device}")
        k = top_k_index.shape[-1]
        return x.reshape(-1, self.hidden_size), top_k_index.reshape(-1, k), top_k_weights.reshape(-1, k)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        x, idx, w = self._check(hidden_states, top_k_index, top_k_weights)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {BACKENDS}")
        if self.backend != "reference":
            why = self.kernel_unavailable(x, idx.shape[-1])
            if why is None:
                return self.kernel_forward(x, idx, w).reshape(hidden_states.shape)
            if self.backend == "kernel":  # asked for a kernel explicitly: never fall back silently
                raise RuntimeError(
                    f"no grouped 4-bit MoE kernel is available for layout '{self.layout_name}' on {x.device}: {why} "
                    "(the reference path runs with backend 'auto' or 'reference')"
                )
        return self.reference_forward(x, idx, w).reshape(hidden_states.shape)

    def _problems(self, x: torch.Tensor, top_k: int) -> tuple:
        """The two grouped products (gate|up with the activation, down) of ``x [T, H]`` as selection problems."""
        from quick.kernels import moe as qmoe
        from quick.kernels.select import MoEProblem

        t, e, gu, dn = x.shape[0], self.num_experts, self.gate_up, self.down
        bs = qmoe.block_size_for(t, top_k, e, self.layout_name, self.group_size)
        g_gu = gu.in_features if gu.group_size == -1 else gu.group_size
        g_dn = dn.in_features if dn.group_size == -1 else dn.group_size
        p_gu = MoEProblem(self.layout_name, t, top_k, e, gu.out_features, gu.in_features, g_gu, bs, self.dtype,
                          x.device, self.act)  # fmt: skip
        p_dn = MoEProblem(self.layout_name, t * top_k, 1, e, dn.out_features, dn.in_features, g_dn, bs, self.dtype,
                          x.device)  # fmt: skip
        return p_gu, p_dn

    def kernel_unavailable(self, x: torch.Tensor, top_k: int) -> str | None:
        """None if the grouped kernels can run this block on ``x``'s device, else the reason."""
        if x.device.type != "cuda":
            return "the grouped kernel runs on CUDA tensors"
        from quick.kernels import select

        for p in self._problems(x, top_k):
            if not select.moe_available(p):
                return "; ".join(f"{n}: {why}" for n, why in select.moe_reasons(p)) or f"no kernel for {p.layout}"
        return None

    @torch.no_grad()
    def kernel_forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The grouped kernels on ``x [T, H]``: a static plan (no host sync), then at decode sizes the decode
        kernel over experts (gate|up plain, down staging ``act(gate) * up``, slot weights in its epilogue), else the
        grouped GEMM (gate|up with ``act(gate) * up`` in its epilogue, down with the slot weights), as
        ``select.moe_mlp_kernel`` picks; then the sum over each token's ``top_k`` rows in fp32. Nothing reads back to
        the host while a CUDA graph is captured (ids are validated only outside capture)."""
        t, k = idx.shape
        distinct = True  # inside a graph capture: as every top-k router gives
        if not torch.cuda.is_current_stream_capturing() and idx.numel():
            lo, hi, distinct = routing_facts(idx, self.num_experts)
            self._check_range(lo, hi)
        plan = static_plan(idx, self.num_experts, self.plan_block_size(t, k))
        return self.kernel_forward_planned(x, plan, w, distinct=distinct)

    def plan_block_size(self, tokens: int, top_k: int) -> int:
        """The plan block size the grouped kernels take for ``tokens`` routed ``top_k`` times."""
        from quick.kernels import moe as qmoe

        return qmoe.block_size_for(tokens, top_k, self.num_experts, self.layout_name, self.group_size)

    @torch.no_grad()
    def kernel_forward_planned(
        self, x: torch.Tensor, plan: MoEPlan, w: torch.Tensor, all_routed: bool = False, sum_slots: bool = True,
        distinct: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """:meth:`kernel_forward` from a static ``plan`` of block size :meth:`plan_block_size` already built (by the
        route kernel, say) and the slot weights ``w [T, k]``; the caller has checked :meth:`kernel_unavailable`.
        ``all_routed``: every slot names an expert (no dropped slot), so the down product needs no zero fill.
        ``sum_slots`` False: return the weighted slot rows ``[T, k, H]`` unsummed (in the packed dtype).
        ``distinct``: no token names an expert twice (the decode kernel sizes its rows by the token count; otherwise
        the grouped GEMM runs)."""
        from quick.kernels import moe as qmoe
        from quick.kernels import select
        from quick.kernels.mma import _dense_rows

        t, k = plan.num_tokens, plan.top_k
        p_gu, p_dn = self._problems(x, k)
        if plan.block_size != p_gu.block_size or x.shape[0] != t:
            raise ValueError(
                f"plan of {plan.num_tokens} tokens in blocks of {plan.block_size} for {x.shape[0]} tokens that the "
                f"kernels run in blocks of {p_gu.block_size}"
            )
        ids = (plan.sorted_ids, plan.block_experts, plan.num_padded)
        gu, dn = self.gate_up, self.down
        xq = x.to(self.dtype)
        if gu.in_features != xq.shape[1]:  # K zero-padded to whole groups and layout blocks
            xq = F.pad(xq, (0, gu.in_features - xq.shape[1]))
        xq = _dense_rows(xq)
        path = select.moe_mlp_kernel(p_gu, p_dn)
        lay = self.layout_name
        if distinct and path == "dec":  # decode sizes: gate|up plain, down staging act(gate) * up
            dec = torch.ops.quick.moe_dec_w4a16
            h = dec(xq, gu.qweight, gu.scales, gu.zeros, gu.group_size, *ids, k, t, None, "", False, lay)
            y = dec(h, dn.qweight, dn.scales, dn.zeros, dn.group_size, *ids, 1, t, w.reshape(-1), self.act,
                    not all_routed, lay)  # fmt: skip
        elif lay == "quick_sm90":  # gate|up and down in plan order (no gather between), act(gate) * up between
            mm = torch.ops.quick.moe_gemm_w4a16_sm90
            h = mm(xq, gu.qweight, gu.scales, gu.zeros, gu.group_size, *ids, k, None, -1, False, True, False)
            a = qmoe.gated(h, self.act)
            if dn.in_features != a.shape[1]:
                a = F.pad(a, (0, dn.in_features - a.shape[1]))
            y = mm(a, dn.qweight, dn.scales, dn.zeros, dn.group_size, *ids, 1, w.reshape(-1), t * k, True, False,
                   not all_routed)  # fmt: skip
        else:
            mm = torch.ops.quick.moe_gemm_w4a16
            h = mm(xq, gu.qweight, gu.scales, gu.zeros, gu.group_size, *ids, k, None, self.act)
            if dn.in_features != h.shape[1]:
                h = F.pad(h, (0, dn.in_features - h.shape[1]))
            y = mm(h, dn.qweight, dn.scales, dn.zeros, dn.group_size, *ids, 1, w.reshape(-1), "")
        y = y.view(t, k, self.hidden_size)
        if not sum_slots:
            return y
        # a 16-bit sum accumulates in fp32 and rounds once: one kernel
        return y.sum(1).to(x.dtype)

    def _work(self, device: torch.device) -> torch.dtype:
        return torch.float32 if device.type == "cpu" else self.dtype

    def _weights(self, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up.reference_weight(work), self.down.reference_weight(work)

    def _expert_mlp(self, xe: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor) -> torch.Tensor:
        """``down(act(gate(x)) * up(x))`` of one expert on rows ``xe`` (already rounded to the packed dtype)."""
        work = xe.dtype
        gu = F.linear(xe, w_gu).to(self.dtype).to(work)
        gate, up = gu.split(self.intermediate_size, dim=-1)
        h = (ACTIVATIONS[self.act](gate) * up).to(self.dtype).to(work)
        return F.linear(h, w_d).to(self.dtype).to(work)

    def _check_ids(self, idx: torch.Tensor) -> None:
        if idx.numel():
            self._check_range(int(idx.min()), int(idx.max()))

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < 0 or hi > self.num_experts:
            raise ValueError(
                f"expert ids must lie in [0, {self.num_experts}) ({self.num_experts} marks a dropped slot), got "
                f"[{lo}, {hi}]"
            )

    @torch.no_grad()
    def reference_forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per expert: gather its tokens, dequantize-then-matmul, scale by the slot weights, add (``x [T, H]``)."""
        self._check_ids(idx)
        work = self._work(x.device)
        w_gu, w_d = self._weights(work)
        xq = x.to(self.dtype).to(work)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(idx).tolist():
            if e == self.num_experts:  # transformers' marker of a dropped slot
                continue
            tok, pos = torch.where(idx == e)
            y = self._expert_mlp(xq[tok], w_gu[e], w_d[e])
            out.index_add_(0, tok, y.float() * w[tok, pos, None].float())
        return out.to(x.dtype)

    @torch.no_grad()
    def forward_planned(self, hidden_states: torch.Tensor, plan: MoEPlan, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts' output computed from ``plan`` the way a grouped kernel does: block by block of
        ``plan.block_size`` sorted rows, each block one expert's product on the tokens ``sorted_ids // top_k``
        (padding rows skipped), the slot weight applied to the down product's rows, then the ``top_k`` rows of each
        token summed. Equal to :meth:`reference_forward` up to the order of the fp32 additions."""
        t, k = plan.num_tokens, plan.top_k
        if hidden_states.dim() != 2 or hidden_states.shape != (t, self.hidden_size):
            raise ValueError(
                f"hidden_states must be [{t}, {self.hidden_size}] for this plan, got {tuple(hidden_states.shape)}"
            )
        if top_k_weights.shape != (t, k):
            raise ValueError(f"top_k_weights must be [{t}, {k}] for this plan, got {tuple(top_k_weights.shape)}")
        work = self._work(hidden_states.device)
        w_gu, w_d = self._weights(work)
        xq = hidden_states.to(self.dtype).to(work)
        slot_out = torch.zeros(t * k, self.hidden_size, dtype=torch.float32, device=xq.device)
        flat_w = top_k_weights.reshape(-1).float()
        b = plan.block_size
        for blk in range(int(plan.num_padded) // b):
            e = int(plan.block_experts[blk])
            rows = plan.sorted_ids[blk * b : (blk + 1) * b].long()
            real = rows[rows < plan.pad_id]
            if real.numel() == 0:
                continue
            y = self._expert_mlp(xq[real // k], w_gu[e], w_d[e])
            slot_out[real] = y.float() * flat_w[real, None]
        return slot_out.view(t, k, self.hidden_size).sum(1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"act={self.act}, group_size={self.group_size}, layout={self.layout_name}, dtype={self.dtype}"
        )


__all__ = [
    "ACTIVATIONS",
    "MoEPlan",
    "QuickExpertStack",
    "QuickMoEExperts",
    "build_plan",
    "plan_capacity",
    "routing_facts",
]
