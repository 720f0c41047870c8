"""Packed weight formats. A layout is a small object: name, shape rules, ``pack`` and ``unpack``.

Conversion between any two layouts goes through the unpacked :class:`QuantizedWeight`
(``dst.pack(src.unpack(...))``), see :func:`convert`.

=============  =========================================================================================
``awq_gemm``   AutoAWQ "GEMM" checkpoints: ``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/G, N/8],
               ``scales`` [K/G, N]. Inside each int32, nibble ``i`` holds column ``8j + AWQ_ORDER[i]``.
``quick``      The paper's layout for ``mma.sync.m16n8k16``: the weight is the **B** operand; blocks of
               k16 x n64; thread ``lane`` gets its B registers of 8 n8k16 tiles with one 16-byte load.
               ``qweight`` int32 [K/16, 2N]; ``scales``/``zeros`` [K/G, N], columns reordered so a thread's 8
               fragment columns are contiguous.
``quick_sm90`` Hopper: the weight is the **A** operand of ``wgmma`` from registers (transposed product).
               Blocks of n16 (one warp's m16 rows) x k64; one 16-byte load = the A registers of 4 k16 steps.
               ``qweight`` int32 [K/64, 8N]; ``scales``/``zeros`` [K/G, N], columns reordered in blocks of 16.
=============  =========================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quick.packing import interleave as il
from quick.quant.primitives import SUPPORTED_DTYPES, QuantizedWeight, resolve_group_size

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class LayoutError(ValueError):
    """Shapes or tensors that a packed layout cannot hold or does not recognise."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: the scale dtype (float16 or bfloat16)


@dataclass
class Layout:
    """Base class; subclasses fill in the block shape and the three methods."""

    name: str
    k_multiple: int
    n_multiple: int
    description: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def check(self, k: int, n: int, group_size: int) -> int:
        """Validate a ``[K, N]`` weight for this layout; returns the resolved group size."""
        g = resolve_group_size(group_size, k)
        if k % self.k_multiple or n % self.n_multiple:
            raise LayoutError(
                f"layout '{self.name}' needs in_features K % {self.k_multiple} == 0 and out_features "
                f"N % {self.n_multiple} == 0, got K={k}, N={n}"
            )
        return g

    def tensor_specs(self, k: int, n: int, group_size: int) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(self, tensors: dict[str, torch.Tensor], k: int, n: int, group_size: int) -> QuantizedWeight:
        raise NotImplementedError

    def validate(self, tensors: dict[str, torch.Tensor], k: int, n: int, group_size: int, where: str = "") -> None:
        """Raise a :class:`LayoutError` naming the tensor if shapes or dtypes do not match the layout."""
        for name, spec in self.tensor_specs(k, n, group_size).items():
            t = tensors.get(name)
            label = f"{where}.{name}" if where else name
            if t is None:
                raise LayoutError(f"missing tensor '{label}' for layout '{self.name}'")
            if tuple(t.shape) != spec.shape:
                raise LayoutError(
                    f"tensor '{label}' has shape {tuple(t.shape)}, layout '{self.name}' with K={k}, N={n}, "
                    f"group_size={group_size} needs {spec.shape}"
                )
            ok = t.dtype in SUPPORTED_DTYPES if spec.dtype is None else t.dtype == spec.dtype
            if not ok:
                want = "float16/bfloat16" if spec.dtype is None else str(spec.dtype)
                raise LayoutError(f"tensor '{label}' has dtype {t.dtype}, expected {want}")


class AwqGemmLayout(Layout):
    """AutoAWQ's GEMM format (also what transformers' AWQ integration reads and writes)."""

    def __init__(self) -> None:
        super().__init__("awq_gemm", k_multiple=1, n_multiple=8, description="AutoAWQ GEMM checkpoint format")
        self.order = torch.tensor(AWQ_ORDER, dtype=torch.int64)

    def tensor_specs(self, k, n, group_size):
        g = resolve_group_size(group_size, k)
        return {
            "qweight": TensorSpec((k, n // 8), torch.int32),
            "qzeros": TensorSpec((k // g, n // 8), torch.int32),
            "scales": TensorSpec((k // g, n), None),
        }

    def _pack_cols(self, codes: torch.Tensor) -> torch.Tensor:
        return il.pack_nibbles(il.permute_columns(codes, self.order))

    def _unpack_cols(self, words: torch.Tensor) -> torch.Tensor:
        return il.unpermute_columns(il.unpack_nibbles(words), self.order)

    def pack(self, qw):
        k, n = qw.shape
        self.check(k, n, qw.group_size)
        return {
            "qweight": self._pack_cols(qw.q),
            "qzeros": self._pack_cols(qw.zeros),
            "scales": qw.scales.contiguous(),
        }

    def unpack(self, tensors, k, n, group_size):
        self.check(k, n, group_size)
        self.validate(tensors, k, n, group_size)
        return QuantizedWeight(
            q=self._unpack_cols(tensors["qweight"]),
            scales=tensors["scales"],
            zeros=self._unpack_cols(tensors["qzeros"]),
            group_size=group_size,
        )


class FragmentLayout(Layout):
    """A register-fragment layout: codes interleaved by a block permutation, scales/zeros by a column one."""

    def __init__(self, name, bk, bn, words_per_thread, coords, scale_bn, scale_coords, description=""):
        super().__init__(name, k_multiple=bk, n_multiple=max(bn, scale_bn), description=description)
        self.bk, self.bn = bk, bn
        self.perm = il.build_permutation(bk, bn, words_per_thread, coords)
        self.scale_cols = il.column_permutation(scale_bn, scale_coords)

    def tensor_specs(self, k, n, group_size):
        g = resolve_group_size(group_size, k)
        return {
            "qweight": TensorSpec((k // self.bk, (n // self.bn) * self.bk * self.bn // 8), torch.int32),
            "scales": TensorSpec((k // g, n), None),
            "zeros": TensorSpec((k // g, n), None),
        }

    def pack(self, qw):
        k, n = qw.shape
        self.check(k, n, qw.group_size)
        return {
            "qweight": il.apply_permutation(qw.q, self.perm, self.bk, self.bn),
            "scales": il.permute_columns(qw.scales, self.scale_cols),
            # Zero points are small integers, exact in fp16/bf16; storing them in the scale dtype lets the
            # kernel form (magic + zero) with one add and no integer unpacking.
            "zeros": il.permute_columns(qw.zeros.to(qw.scales.dtype), self.scale_cols),
        }

    def unpack(self, tensors, k, n, group_size):
        self.check(k, n, group_size)
        self.validate(tensors, k, n, group_size)
        zeros = il.unpermute_columns(tensors["zeros"], self.scale_cols)
        return QuantizedWeight(
            q=il.invert_permutation(tensors["qweight"], self.perm, k, n, self.bk, self.bn),
            scales=il.unpermute_columns(tensors["scales"], self.scale_cols),
            zeros=zeros.float().round().to(torch.uint8),
            group_size=group_size,
        )


def _mma_b_coords(lane, word, pair, half):
    """mma.sync.m16n8k16 B fragment (PTX ISA, "Matrix Fragments for mma.m16n8k16", .f16/.bf16 B):
    register b_r (r = 0, 1) of lane holds B[k = 2*(lane%4) + 8*r + {0,1}][n = lane/4] of one n8k16 tile.
    One thread's 16 bytes cover 8 tiles side by side along n (a k16 x n64 block): word w feeds tiles
    2w (pairs 0, 1 -> b0, b1) and 2w+1 (pairs 2, 3 -> b0, b1)."""
    tile = 2 * word + pair // 2
    reg = pair % 2
    return 2 * (lane % 4) + 8 * reg + half, 8 * tile + lane // 4


def _mma_b_scale_cols(slot):
    """Thread lane needs the scales of columns 8j + lane/4 (j = 0..7): store them at slots 8*(lane/4) + j."""
    return 8 * (slot % 8) + slot // 8


def _wgmma_a_coords(lane, word, pair, half):
    """wgmma / mma.m16n8k16 A fragment (row = output channel n, col = k), one warp's m16 slice:
    a_r (r = 0..3) holds A[row = lane/4 + 8*(r%2)][k = 2*(lane%4) + 8*(r/2) + {0,1}].
    One thread's 16 bytes cover 4 consecutive k16 steps (an n16 x k64 block): word w = step w."""
    row = lane // 4 + 8 * (pair % 2)
    k = 16 * word + 2 * (lane % 4) + 8 * (pair // 2) + half
    return k, row


def _wgmma_a_scale_cols(slot):
    """Thread lane needs rows lane/4 and lane/4 + 8 of its m16 slice: store them at slots 2*(lane/4) + {0,1}."""
    return slot // 2 + 8 * (slot % 2)


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    LAYOUTS[layout.name] = layout
    return layout


AWQ_GEMM = register_layout(AwqGemmLayout())
QUICK = register_layout(
    FragmentLayout("quick", 16, 64, 4, _mma_b_coords, 64, _mma_b_scale_cols, "QUICK, mma.sync B fragment")
)
QUICK_SM90 = register_layout(
    FragmentLayout("quick_sm90", 64, 16, 4, _wgmma_a_coords, 16, _wgmma_a_scale_cols, "QUICK, wgmma A fragment")
)


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise LayoutError(f"unknown layout '{name}'; known: {sorted(LAYOUTS)}") from None


def convert(tensors: dict[str, torch.Tensor], src: str, dst: str, k: int, n: int, group_size: int) -> dict:
    """Repack between any two layouts through the unpacked codes (exact, no requantization)."""
    return get_layout(dst).pack(get_layout(src).unpack(tensors, k, n, group_size))
