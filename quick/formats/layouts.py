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
``w4a8``       W4A8 (:mod:`quick.formats.w4a8`), the weight is the **B** operand of the int8
               ``mma.sync.m16n8k32``: blocks of k32 x n32, one 16-byte load = the B registers of 4 n8k32
               tiles. Not a :class:`Layout` (other number format): :func:`pack_w4a8` / :func:`unpack_w4a8`,
               registry :data:`W4A8_LAYOUTS`.
=============  =========================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quick.formats import interleave as il
from quick.formats.w4a8 import SUPPORTED_W4A8_GROUPS, W4A8Weight
from quick.formats.weights import SUPPORTED_DTYPES, QuantizedWeight, check_quantized, resolve_group_size

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
            if not isinstance(t, torch.Tensor):
                raise LayoutError(f"'{label}' must be a torch.Tensor, got {type(t).__name__}")
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
        k, n, _ = check_quantized(qw)
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
        k, n, _ = check_quantized(qw)
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


# ---------------------------------------------------------------------------------------------------------
# W4A8: int4 weights for the int8 tensor cores (mma.sync.m16n8k32.s32.s8.s8.s32)
# ---------------------------------------------------------------------------------------------------------
#
# A nibble holds q in 4-bit two's complement. The kernel turns one int32 word of 8 nibbles into the two int8
# B registers of one n8k32 tile with two masks and no sign handling:
#     b0 = (w << 4) & 0xF0F0F0F0   (byte j = 16 * nibble 2j)
#     b1 =  w       & 0xF0F0F0F0   (byte j = 16 * nibble 2j+1)
# i.e. every int8 is 16 * q (exact, in [-128, 112]); the kernel divides the exact int32 sums by 16.
# PTX ISA, "Matrix Fragments for mma.m16n8k32" (.s8 B): b_r holds B[k = 4*(lane%4) + 16*r + byte][n = lane/4].
W4A8_BK = 32
W4A8_BN = 32
W4A8_WORDS = 4  # one 16-byte load per lane and k32 x n32 block: word t = n8 tile t


def _w4a8_b_coords(lane, word, pair, half):
    """Nibble i = pair + 4*half of word ``word`` -> register r = i % 2, byte j = i // 2 of n8 tile ``word``."""
    i = pair + 4 * half
    return 4 * (lane % 4) + 16 * (i % 2) + i // 2, 8 * word + lane // 4


def _w4a8_scale_cols(slot):
    """Accumulator c_{2h+e} of lane sits at column 8t + 2*(lane%4) + e of tile t: lane's 8 columns of a
    32-column block (t = 0..3, e = 0, 1) go to slots 8*(lane%4) + 2t + e, one 8-byte load."""
    return 8 * ((slot % 8) // 2) + 2 * (slot // 8) + slot % 2


class W4A8Layout:
    """Packed W4A8 weights for the mma.sync int8 kernel (quick/kernels/w4a8_mma.py).

    ``qweight`` int32 [K/32, 4N] (k32 row-blocks; per block of 32 columns, 32 lanes x 4 words),
    ``channel_scale`` float32 [N] in natural column order (read once, in the epilogue),
    ``group_scale`` int8 [K/G, N] (values 1..127), columns reordered in blocks of 32 so a lane reads its 8
    columns with one 8-byte load; absent for per-channel weights.
    """

    name = "w4a8"
    k_multiple = W4A8_BK  # the block: k_multiple x n_multiple codes, words_per_lane int32 per lane
    n_multiple = W4A8_BN
    words_per_lane = W4A8_WORDS

    def __init__(self) -> None:
        self.perm = il.build_permutation(self.k_multiple, self.n_multiple, self.words_per_lane, self._coords)
        self.scale_cols = il.column_permutation(self.n_multiple, self._scale_cols)

    # the fragment maps of the kernel's operand: (lane, word, pair, half) -> (k, n) codes, scale slot -> column
    _coords = staticmethod(_w4a8_b_coords)
    _scale_cols = staticmethod(_w4a8_scale_cols)

    def check(self, k: int, n: int, group_size: int) -> None:
        if group_size not in SUPPORTED_W4A8_GROUPS:
            raise LayoutError(f"layout '{self.name}' supports group_size in {SUPPORTED_W4A8_GROUPS}, got {group_size}")
        if k % self.k_multiple or n % self.n_multiple or (group_size > 0 and k % group_size):
            raise LayoutError(
                f"layout '{self.name}' needs K % {max(self.k_multiple, group_size)} == 0 and "
                f"N % {self.n_multiple} == 0, got K={k}, N={n}"
            )

    def tensor_specs(self, k: int, n: int, group_size: int) -> dict[str, TensorSpec]:
        specs = {  # 8 nibbles per int32: a k_multiple-row block of N columns is k_multiple * N / 8 words
            "qweight": TensorSpec((k // self.k_multiple, self.k_multiple * n // 8), torch.int32),
            "channel_scale": TensorSpec((n,), torch.float32),
        }
        if group_size > 0:
            specs["group_scale"] = TensorSpec((k // group_size, n), torch.int8)
        return specs

    def validate(self, tensors: dict[str, torch.Tensor], k: int, n: int, group_size: int, where: str = "") -> None:
        """Raise a :class:`LayoutError` naming the tensor if shapes or dtypes do not match the layout."""
        self.check(k, n, group_size)
        for name, spec in self.tensor_specs(k, n, group_size).items():
            t = tensors.get(name)
            label = f"{where}.{name}" if where else name
            if t is None:
                raise LayoutError(f"missing tensor '{label}' for layout '{self.name}'")
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                raise LayoutError(
                    f"tensor '{label}' is {t.dtype} {tuple(t.shape)}, layout '{self.name}' with K={k}, N={n}, "
                    f"group_size={group_size} needs {spec.dtype} {spec.shape}"
                )
        if group_size < 0 and tensors.get("group_scale") is not None:
            raise LayoutError(f"per-channel W4A8 (group_size=-1) takes no 'group_scale' (layout '{self.name}')")

    def pack(self, w: W4A8Weight) -> dict[str, torch.Tensor]:
        n, k = w.q.shape
        self.check(k, n, w.group_size)
        codes = (w.q.t().to(torch.int16) & 0xF).to(torch.uint8)  # [K, N] two's complement nibbles
        out = {
            "qweight": il.apply_permutation(codes, self.perm, self.k_multiple, self.n_multiple),
            "channel_scale": w.channel_scale.to(torch.float32).contiguous(),
        }
        if w.group_scale is not None:
            out["group_scale"] = il.permute_columns(w.group_scale.to(torch.int8), self.scale_cols)
        return out

    def unpack(self, tensors: dict[str, torch.Tensor], group_size: int) -> W4A8Weight:
        qweight = tensors["qweight"]
        k, n = qweight.shape[0] * self.k_multiple, qweight.shape[1] * 8 // self.k_multiple
        self.validate(tensors, k, n, group_size)
        codes = il.invert_permutation(qweight, self.perm, k, n, self.k_multiple, self.n_multiple).to(torch.int16)
        q = ((codes ^ 8) - 8).t().contiguous().to(torch.int8)
        gs = tensors.get("group_scale")
        group_scale = None if gs is None else il.unpermute_columns(gs, self.scale_cols).to(torch.int16)
        return W4A8Weight(q, tensors["channel_scale"].clone(), group_scale, group_size)


W4A8_LAYOUTS: dict[str, W4A8Layout] = {}
W4A8 = W4A8_LAYOUTS.setdefault("w4a8", W4A8Layout())


def pack_w4a8(w: W4A8Weight) -> dict[str, torch.Tensor]:
    """Pack W4A8 weights into layout ``w4a8`` (see :class:`W4A8Layout`)."""
    return W4A8.pack(w)


def unpack_w4a8(packed: dict[str, torch.Tensor], group_size: int) -> W4A8Weight:
    """Exact inverse of :func:`pack_w4a8` (K and N are read off ``qweight``)."""
    return W4A8.unpack(packed, group_size)


# ---------------------------------------------------------------------------------------------------------
# W4A8 on Hopper: int4 weights as the register A operand of wgmma.m64nNk32.s32.s8.s8 (transposed product)
# ---------------------------------------------------------------------------------------------------------
#
# Same nibble code and in-register conversion as ``w4a8`` (two's complement nibbles; (w << 4) & 0xF0F0F0F0 and
# w & 0xF0F0F0F0 give int8 16*q), but the fragment is wgmma's A (PTX ISA, "Register Fragments" for
# wgmma .m64nNk32 A with .s8/.u8; CUTLASS ALayout_64x32): register r (0..3) of a lane holds
# A[row = 16*warp + lane/4 + 8*(r%2)][k = 4*(lane%4) + 16*(r/2) + byte]. Rows are output channels n.
# A lane's two words per k32 step give registers (lo, hi) of word 0 -> r = 0, 1 and of word 1 -> r = 2, 3, so
# nibble i of a word is row lane/4 + 8*(i%2), byte i//2. Blocks of n16 (one warp's 16 rows) x k128: 8 words
# per lane (two 16-byte loads, 1 KB contiguous per warp) = the A registers of 4 k32 steps = one TMA stage.
W4A8_SM90_BK = 128
W4A8_SM90_BN = 16
W4A8_SM90_WORDS = 8


def _w4a8_sm90_a_coords(lane, word, pair, half):
    """Nibble i = pair + 4*half of word w: k32 step w//2, register r = 2*(w%2) + i%2, byte i//2."""
    i = pair + 4 * half
    k = 32 * (word // 2) + 16 * (word % 2) + 4 * (lane % 4) + i // 2
    return k, lane // 4 + 8 * (i % 2)


class W4A8Sm90Layout(W4A8Layout):
    """Packed W4A8 weights for the Hopper wgmma kernel (quick/kernels/w4a8_wgmma.py).

    ``qweight`` int32 [K/128, 16N] (k128 row-blocks; per block of 16 columns, 32 lanes x 8 words),
    ``channel_scale`` float32 [N] in natural order, ``group_scale`` int8 [K/G, N] (G = 128), columns reordered
    in blocks of 16 exactly like ``quick_sm90``'s scales (slots 2*(c%8) + c//8: a lane's rows lane/4 and
    lane/4 + 8 are adjacent bytes, one 2-byte load per group); absent for per-channel weights.
    """

    name = "w4a8_sm90"
    k_multiple = W4A8_SM90_BK
    n_multiple = W4A8_SM90_BN
    words_per_lane = W4A8_SM90_WORDS

    _coords = staticmethod(_w4a8_sm90_a_coords)
    _scale_cols = staticmethod(_wgmma_a_scale_cols)


W4A8_SM90 = W4A8_LAYOUTS.setdefault("w4a8_sm90", W4A8Sm90Layout())


def pack_w4a8_sm90(w: W4A8Weight) -> dict[str, torch.Tensor]:
    """Pack W4A8 weights into layout ``w4a8_sm90`` (see :class:`W4A8Sm90Layout`)."""
    return W4A8_SM90.pack(w)


def unpack_w4a8_sm90(packed: dict[str, torch.Tensor], group_size: int) -> W4A8Weight:
    """Exact inverse of :func:`pack_w4a8_sm90` (K and N are read off ``qweight``)."""
    return W4A8_SM90.unpack(packed, group_size)
