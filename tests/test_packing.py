"""Packing layouts: exact round trips, hand-derived expectations, and emulation of the fragment loads."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quick.formats import interleave as il
from quick.formats.layouts import AWQ_GEMM, LAYOUTS, QUICK, QUICK_SM90, LayoutError, convert, get_layout
from quick.formats.weights import QuantizationError, QuantizedWeight
from quick.testing import random_quantized

SHAPES = [(64, 64), (128, 192), (256, 128), (192, 320), (1024, 576)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip(layout, k, n, group_size, dtype):
    lay = get_layout(layout)
    if k % 64 and layout == "quick_sm90":
        pytest.skip("K not a multiple of 64")
    if group_size != -1 and k % group_size:
        pytest.skip("K not a multiple of the group")
    qw = random_quantized(k, n, group_size, dtype, generator=_gen(k * n + group_size))
    packed = lay.pack(qw)
    lay.validate(packed, k, n, group_size)
    back = lay.unpack(packed, k, n, group_size)
    assert torch.equal(back.q, qw.q)
    assert torch.equal(back.scales, qw.scales)
    assert torch.equal(back.zeros, qw.zeros)
    assert back.scales.dtype == dtype


@settings(max_examples=25, deadline=None)
@given(
    kb=st.integers(1, 6),
    nb=st.integers(1, 5),
    group=st.sampled_from([32, 64, -1]),
    layout=st.sampled_from(sorted(LAYOUTS)),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_fuzz(kb, nb, group, layout, seed):
    k, n = 64 * kb, 64 * nb
    qw = random_quantized(k, n, group, torch.float16, generator=_gen(seed))
    lay = get_layout(layout)
    back = lay.unpack(lay.pack(qw), k, n, group)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros) and torch.equal(back.scales, qw.scales)


@pytest.mark.parametrize("src", sorted(LAYOUTS))
@pytest.mark.parametrize("dst", sorted(LAYOUTS))
def test_convert_between_layouts(src, dst):
    qw = random_quantized(256, 128, 64, generator=_gen(7))
    out = convert(get_layout(src).pack(qw), src, dst, 256, 128, 64)
    back = get_layout(dst).unpack(out, 256, 128, 64)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)


def test_pack_is_vectorized():
    """Packing issues the same number of torch ops for 64 and 4096 columns: no Python loop over columns or rows
    (the original QUICK packer loops over columns). Counted, not timed, so a busy machine cannot fail it."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    def ops(lay, k: int, n: int) -> int:
        qw = random_quantized(k, n, 128, generator=_gen(0))
        with Count() as c:
            lay.pack(qw)
        return c.calls

    for lay in (QUICK, QUICK_SM90, AWQ_GEMM):
        small = ops(lay, 256, 64)
        assert ops(lay, 256, 4096) == small, lay.name
        assert ops(lay, 2048, 64) == small, lay.name


# ----------------------------------------------------------------- AutoAWQ format, hand-derived


def test_awq_word_hand_derived():
    """Columns 0..7 holding codes 1..8 pack to 0x86427531: nibble i holds column AWQ_ORDER[i] = 0,2,4,6,1,3,5,7."""
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8).repeat(32, 1)
    qw = QuantizedWeight(q, torch.ones(1, 8, dtype=torch.float16), torch.zeros(1, 8, dtype=torch.uint8), 32)
    words = AWQ_GEMM.pack(qw)["qweight"]
    assert words.shape == (32, 1) and words.dtype == torch.int32
    assert (words == 0x86427531 - 2**32).all()


def _awq_unpack_published(qweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's documented unpacking, written independently: shift out 8 nibbles per int32, then undo the
    interleave with the reverse order [0, 4, 1, 5, 2, 6, 3, 7]."""
    shifts = torch.arange(0, 32, 4)
    nib = (qweight[:, :, None] >> shifts[None, None, :]) & 0xF
    nib = nib.reshape(qweight.shape[0], -1)
    reverse = torch.arange(nib.shape[-1]).reshape(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    return nib[:, reverse].to(torch.uint8)


def test_awq_matches_published_unpacking():
    qw = random_quantized(256, 136, 128, generator=_gen(3))
    packed = AWQ_GEMM.pack(qw)
    assert torch.equal(_awq_unpack_published(packed["qweight"]), qw.q)
    assert torch.equal(_awq_unpack_published(packed["qzeros"]), qw.zeros)
    assert packed["scales"].shape == (2, 136)


# ----------------------------------------------------------------- QUICK (mma.sync B fragment)


def _block_codes() -> torch.Tensor:
    """A 16 x 64 block whose codes identify position mod 16 in a way every nibble slot can tell apart."""
    k = torch.arange(16)[:, None]
    n = torch.arange(64)[None, :]
    return ((k * 7 + n * 3) % 16).to(torch.uint8)


def _nibbles(words: torch.Tensor) -> list[int]:
    return [(int(words) >> (4 * i)) & 0xF for i in range(8)]


def test_quick_hand_derived_words():
    """Lane 0, word 0: pairs (b0, b1 of tile 0; b0, b1 of tile 1), halves k and k+1:
    nibbles = q[0,0], q[8,0], q[0,8], q[8,8], q[1,0], q[9,0], q[1,8], q[9,8].
    Lane 5 (lane%4 = 1, lane/4 = 1), word 2 (tiles 4, 5): rows 2, 10 (+1), columns 33 and 41."""
    q = _block_codes()
    qw = QuantizedWeight(q, torch.ones(1, 64, dtype=torch.float16), torch.zeros(1, 64, dtype=torch.uint8), -1)
    words = QUICK.pack(qw)["qweight"].reshape(32, 4)
    want0 = [q[0, 0], q[8, 0], q[0, 8], q[8, 8], q[1, 0], q[9, 0], q[1, 8], q[9, 8]]
    assert _nibbles(words[0, 0]) == [int(v) for v in want0]
    want5 = [q[2, 33], q[10, 33], q[2, 41], q[10, 41], q[3, 33], q[11, 33], q[3, 41], q[11, 41]]
    assert _nibbles(words[5, 2]) == [int(v) for v in want5]


def _dequant_pairs(word: int) -> list[tuple[int, int]]:
    """What the kernel's magic-number dequantization yields: pair i = (nibble i, nibble i + 4)."""
    return [((word >> (4 * i)) & 0xF, (word >> (4 * i + 16)) & 0xF) for i in range(4)]


def test_quick_emulated_mma_b_fragment():
    """Emulate every lane: the 16 bytes it loads, dequantized into register pairs, must equal the B fragment
    of mma.m16n8k16 (PTX ISA: b_r = B[2*(lane%4) + 8r + {0,1}][lane/4] of each n8 tile) for 8 tiles."""
    k, n = 32, 128
    qw = random_quantized(k, n, 32, generator=_gen(11))
    words = QUICK.pack(qw)["qweight"].reshape(k // 16, n // 64, 32, 4)
    for kb in range(k // 16):
        for nb in range(n // 64):
            for lane in range(32):
                regs = []
                for w in range(4):
                    regs += _dequant_pairs(int(words[kb, nb, lane, w]) & 0xFFFFFFFF)
                for tile in range(8):
                    for r in range(2):
                        kk = kb * 16 + 2 * (lane % 4) + 8 * r
                        nn = nb * 64 + 8 * tile + lane // 4
                        expect = (int(qw.q[kk, nn]), int(qw.q[kk + 1, nn]))
                        assert regs[tile * 2 + r] == expect, (kb, nb, lane, tile, r)


def test_quick_scale_slots():
    """Lane's scales for columns 8j + lane/4 sit at slots 8*(lane/4) + j (one 16-byte load)."""
    scales = torch.arange(64, dtype=torch.float16)[None, :]
    qw = QuantizedWeight(torch.zeros(64, 64, dtype=torch.uint8), scales, torch.zeros(1, 64, dtype=torch.uint8), -1)
    stored = QUICK.pack(qw)["scales"][0]
    for lane in range(32):
        for j in range(8):
            assert stored[8 * (lane // 4) + j] == 8 * j + lane // 4


# ----------------------------------------------------------------- QUICK-sm90 (wgmma A fragment)


def test_sm90_emulated_wgmma_a_fragment():
    """Per warp (m16 rows of output channels), word w of a lane = k16 step w; dequantized pairs are
    a_r = A[row = lane/4 + 8*(r%2)][k = 2*(lane%4) + 8*(r/2) + {0,1}] with A = W^T (PTX ISA wgmma A layout)."""
    k, n = 128, 32
    qw = random_quantized(k, n, 64, generator=_gen(5))
    words = QUICK_SM90.pack(qw)["qweight"].reshape(k // 64, n // 16, 32, 4)
    for kb in range(k // 64):
        for nb in range(n // 16):
            for lane in range(32):
                for w in range(4):
                    pairs = _dequant_pairs(int(words[kb, nb, lane, w]) & 0xFFFFFFFF)
                    for r in range(4):
                        row = nb * 16 + lane // 4 + 8 * (r % 2)
                        kk = kb * 64 + 16 * w + 2 * (lane % 4) + 8 * (r // 2)
                        assert pairs[r] == (int(qw.q[kk, row]), int(qw.q[kk + 1, row]))


def test_sm90_scale_slots():
    scales = torch.arange(32, dtype=torch.float16)[None, :]
    qw = QuantizedWeight(torch.zeros(64, 32, dtype=torch.uint8), scales, torch.zeros(1, 32, dtype=torch.uint8), -1)
    stored = QUICK_SM90.pack(qw)["scales"][0].reshape(2, 16)
    for lane in range(32):
        for r in range(2):
            assert stored[0, 2 * (lane // 4) + r] == lane // 4 + 8 * r


# ----------------------------------------------------------------- errors and building blocks


def test_build_permutation_rejects_non_bijection():
    with pytest.raises(ValueError, match="bijection"):
        il.build_permutation(16, 64, 4, lambda lane, word, pair, half: (lane % 16, word))


@pytest.mark.parametrize(
    "k,n,layout", [(100, 64, "quick"), (64, 60, "quick"), (64, 12, "awq_gemm"), (96, 16, "quick_sm90")]
)
def test_bad_shapes_raise(k, n, layout):
    with pytest.raises((LayoutError, QuantizationError)):
        get_layout(layout).check(k, n, 32)


def test_validate_names_the_tensor():
    qw = random_quantized(128, 64, 64, generator=_gen(1))
    packed = QUICK.pack(qw)
    packed["scales"] = packed["scales"][:1]
    with pytest.raises(LayoutError, match="layers.0.q_proj.scales"):
        QUICK.validate(packed, 128, 64, 64, where="layers.0.q_proj")
    packed = QUICK.pack(qw)
    packed["qweight"] = packed["qweight"].to(torch.int64)
    with pytest.raises(LayoutError, match="dtype"):
        QUICK.validate(packed, 128, 64, 64)
    with pytest.raises(LayoutError, match="missing"):
        QUICK.validate({}, 128, 64, 64)


def test_unknown_layout():
    with pytest.raises(LayoutError, match="unknown layout"):
        get_layout("nope")


def test_nibble_pack_known_values():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    word = il.pack_nibbles(codes)
    assert word.item() == 0xF7654321 - 2**32
    assert torch.equal(il.unpack_nibbles(word), codes)
