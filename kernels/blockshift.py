"""Per-block shifts as branch-free element loops (helpers of the block kernels).

Within one block every element is shifted by the same amount, so the rounding of
:func:`bbct.kernels.formats.shift_round` can be written as one add and one arithmetic shift
whose constants depend on the shift and the mode only (:func:`rshift_consts`); the element
loop then has no branch and vectorizes. :func:`shift_block` is that loop, which the align
kernel calls per block; :func:`shift_el` is one element of it with a left or right shift,
which the add kernel uses for both operands in one loop. Values are bit-identical to
``shift_round`` (tests).
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, inline="always")
def bitlen(x: np.int64) -> np.int64:
    """Bits of ``x``, 0 <= x < 2**63: :func:`bit_length` by a six-step binary search."""
    n = np.int64(0)
    if x >= np.int64(1) << 32:
        x >>= 32
        n += 32
    if x >= 1 << 16:
        x >>= 16
        n += 16
    if x >= 1 << 8:
        x >>= 8
        n += 8
    if x >= 1 << 4:
        x >>= 4
        n += 4
    if x >= 1 << 2:
        x >>= 2
        n += 2
    if x >= 2:
        x >>= 1
        n += 1
    return n + x


@nb.njit(cache=True, inline="always")
def rshift_consts(s: np.int64, mode: np.int64) -> tuple[np.int64, np.int64, np.int64, np.int64]:
    """Constants of :func:`shift_round` by ``s`` (1..62) as one add and one arithmetic shift:
    ``(v + c + (sign & t) + (sign & 1) * u + ((v >> s) & odd)) >> s`` with ``sign = v >> 63``.
    TRN adds nothing; TRN_ZERO adds ``2**s - 1`` to negatives; RND adds the half; RND_ZERO
    the half minus 1, plus 1 for negatives (ties toward zero); RND_INF the half, minus 1 for
    negatives (ties away); RND_CONV the half minus 1, plus 1 when the truncated quotient is
    odd (ties to even). No branch per element, so the loop vectorizes; |v| < 2**62 keeps
    every sum below 2**63."""
    half = np.int64(1) << (s - 1)
    if mode == 0:
        return np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    if mode == 1:
        return np.int64(0), (half << 1) - 1, np.int64(0), np.int64(0)
    if mode == 2:
        return half, np.int64(0), np.int64(0), np.int64(0)
    if mode == 3:
        return half - 1, np.int64(0), np.int64(1), np.int64(0)
    if mode == 4:
        return half, np.int64(0), np.int64(-1), np.int64(0)
    return half - 1, np.int64(0), np.int64(0), np.int64(1)


@nb.njit(cache=True, inline="always")
def shift_block(x, s, mode, out):
    """``out[j] = x[j] >>r s`` over the 1-D views ``x``, ``out`` of one block (``shift_round``,
    shifts beyond 62 taken as 62); a shift ``s <= 0`` is a left shift the caller has proven
    exact. Zero-based loops over views keep the loads and stores contiguous (vectorized)."""
    if s <= 0:
        for j in range(x.size):
            out[j] = np.int64(x[j]) << (-s)
        return
    if s > 62:
        s = 62
    c, t, u, odd = rshift_consts(s, mode)
    for j in range(x.size):
        v = np.int64(x[j])
        sg = v >> 63
        out[j] = (v + c + (sg & t) + (sg & 1) * u + ((v >> s) & odd)) >> s


@nb.njit(cache=True, inline="always")
def shift_consts(s: np.int64, mode: np.int64) -> tuple[np.int64, np.int64, np.int64, np.int64, np.int64, np.int64]:
    """``(ls, s', c, t, u, odd)`` for :func:`shift_el`: a shift ``s <= 0`` is the left shift
    ``ls = -s`` (exact, as the caller proves) and a right shift by 0; ``s`` in 1..62 (beyond
    62 taken as 62) is ``ls = 0`` and :func:`rshift_consts`. One element loop serves both."""
    if s <= 0:
        z = np.int64(0)
        return -s, z, z, z, z, z
    if s > 62:
        s = 62
    c, t, u, odd = rshift_consts(s, mode)
    return np.int64(0), s, c, t, u, odd


@nb.njit(cache=True, inline="always")
def shift_el(v: np.int64, k: tuple) -> np.int64:
    """``shift_round(v, s, mode)`` with ``k = shift_consts(s, mode)``; branch-free."""
    ls, s, c, t, u, odd = k
    w = v << ls
    sg = w >> 63
    return (w + c + (sg & t) + (sg & 1) * u + ((w >> s) & odd)) >> s
