"""THE INTERLEAVE: where QUICK's offline weight reordering is defined, applied and inverted.

A *fragment layout* stores a ``[K, N]`` matrix of 4-bit codes as a stream of int32 words such that each
GPU thread reads, with one 16-byte load, exactly the weights that the tensor-core instruction wants in
its operand registers, already in the order that the in-register dequantization produces them.

Three functions do all the work, everything else is data:

* :func:`build_permutation` turns a per-thread description of the operand fragment into a permutation
  ``perm`` of one block: stream position ``s`` holds block element ``perm[s]`` (flat ``k * bn + n``).
* :func:`apply_permutation` packs a ``[K, N]`` code matrix with it (vectorized gather + nibble packing).
* :func:`invert_permutation` undoes it (vectorized scatter), so ``unpack(pack(q)) == q`` by construction.

Stream positions are ``s = (lane * words_per_thread + word) * 8 + nibble``: thread ``lane``'s words are
contiguous (one 16-byte load for 4 words) and a warp's 32 loads are one contiguous 512-byte segment.

**Dequantization-aware order.** The kernels turn one int32 ``w`` of 8 nibbles into four 16-bit pairs with
the magic-number trick ``(w >> 4*i) & 0x000f000f | 0x6400_6400`` (fp16, value ``1024 + q``; bf16 uses
``0x4300``, value ``128 + q``). Pair ``i`` (``i = 0..3``) therefore holds nibble ``i`` in its low half and
nibble ``i + 4`` in its high half. A 32-bit operand register of an ``mma``/``wgmma`` fragment holds two
consecutive-k values (low half = even k). So a layout maps ``(lane, word, pair, half)`` to ``(k, n)`` and
puts that element at nibble ``pair + 4 * half`` of the word. With that, the four pairs come out of the
dequantization as finished operand registers, with no shuffles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NIBBLES_PER_WORD = 8
WARP = 32

# coords(lane, word, pair, half) -> (k, n) inside one block; all arguments are int64 tensors.
CoordFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_permutation(bk: int, bn: int, words_per_thread: int, coords: CoordFn) -> torch.Tensor:
    """Permutation of one ``bk x bn`` block: ``perm[s]`` = flat index ``k * bn + n`` stored at stream slot ``s``.

    Raises if ``coords`` does not cover every block element exactly once (a layout bug, caught at import).
    """
    size = bk * bn
    if size != WARP * words_per_thread * NIBBLES_PER_WORD:
        raise ValueError(f"block {bk}x{bn} does not match 32 threads x {words_per_thread} words")
    s = torch.arange(size, dtype=torch.int64)
    nibble = s % NIBBLES_PER_WORD
    word = (s // NIBBLES_PER_WORD) % words_per_thread
    lane = s // (NIBBLES_PER_WORD * words_per_thread)
    k, n = coords(lane, word, nibble % 4, nibble // 4)
    perm = k * bn + n
    if not torch.equal(torch.sort(perm).values, s):
        raise ValueError("fragment coordinates are not a bijection onto the block")
    return perm


def _blocks(q: torch.Tensor, bk: int, bn: int) -> torch.Tensor:
    """View ``[K, N]`` as ``[K/bk, N/bn, bk*bn]`` (block rows major, each block flattened row-major)."""
    k, n = q.shape
    return q.reshape(k // bk, bk, n // bn, bn).permute(0, 2, 1, 3).reshape(k // bk, n // bn, bk * bn)


def _unblocks(b: torch.Tensor, k: int, n: int, bk: int, bn: int) -> torch.Tensor:
    return b.reshape(k // bk, n // bn, bk, bn).permute(0, 2, 1, 3).reshape(k, n)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack the last dim (multiple of 8, values 0..15) into int32 words; element ``8w + i`` -> bits ``4i``.

    Works through bytes (two nibbles each) reinterpreted as little-endian int32: two vectorized passes.
    """
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 2)
    packed_bytes = (c[..., 0] | (c[..., 1] << 4)).contiguous()
    return packed_bytes.view(torch.int32)


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: int32 ``[..., W]`` -> uint8 ``[..., 8W]``."""
    b = words.contiguous().view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*words.shape[:-1], -1)


def apply_permutation(q: torch.Tensor, perm: torch.Tensor, bk: int, bn: int) -> torch.Tensor:
    """Interleave codes ``q`` [K, N] block by block: int32 ``[K/bk, (N/bn) * bk*bn/8]``."""
    k, n = q.shape
    stream = _blocks(q, bk, bn)[..., perm.to(q.device)]
    return pack_nibbles(stream).reshape(k // bk, -1)


def invert_permutation(packed: torch.Tensor, perm: torch.Tensor, k: int, n: int, bk: int, bn: int) -> torch.Tensor:
    """Undo :func:`apply_permutation`: back to uint8 codes ``[K, N]``."""
    stream = unpack_nibbles(packed.reshape(k // bk, n // bn, -1))
    inverse = torch.argsort(perm).to(packed.device)  # gather with the inverse: faster than a scatter
    return _unblocks(stream[..., inverse], k, n, bk, bn)


def column_permutation(bn: int, coords: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Column order of per-column data (scales, zeros) inside a block of ``bn`` columns.

    ``coords(slot)`` gives the column stored at ``slot``; used so that each thread reads the scales of its
    own fragment columns with one contiguous load.
    """
    slots = torch.arange(bn, dtype=torch.int64)
    cols = coords(slots)
    if not torch.equal(torch.sort(cols).values, slots):
        raise ValueError("column permutation is not a bijection")
    return cols


def permute_columns(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Reorder the columns of ``x`` [R, N] inside every block of ``len(cols)`` columns."""
    r, n = x.shape
    bn = cols.numel()
    return x.reshape(r, n // bn, bn).index_select(-1, cols.to(x.device)).reshape(r, n).contiguous()


def unpermute_columns(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    r, n = x.shape
    bn = cols.numel()
    out = torch.empty_like(x).reshape(r, n // bn, bn)
    out[..., cols.to(x.device)] = x.reshape(r, n // bn, bn)
    return out.reshape(r, n)
