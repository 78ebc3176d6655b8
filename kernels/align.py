"""align: expand a block-scaled tensor to one exponent per group, for the MAC array.

Block floating point is a storage format; a dot product needs its operands on one grid.
For every group (the positions that share their indices on the axes *not* in
``reduce_axes``), with ``e[i]`` the exponent of element i's block:

    e_ref = max over the group of e[i], minus ``guard``   (EXP_ZERO blocks never win
            unless the whole group is zero)
    wide[i] = (q[i] * mant[i]) >>r (e_ref - e[i])         (mant = 1 for POW2)

A block within ``guard`` exponent steps of the group's largest is shifted left: exact.
Blocks further below lose their low bits with rounding mode ``r`` (a right shift; shifts
beyond 62 are taken as 62). ``wide`` needs ``bits + guard (+ mant_bits)`` bits: int64.
Returns ``(wide, e_ref)``, ``e_ref`` int32 with the reduced axes kept as size 1.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from kernels.formats import QTensor, Rounding, expand_blocks, shift_round, shift_round_ref


def _expand(q: QTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    e = expand_blocks(np.asarray(q.exp, np.int64), q.shape, q.fmt.block_axis, q.fmt.block_size)
    m = None
    if q.mant is not None:
        m = expand_blocks(np.asarray(q.mant, np.int64), q.shape, q.fmt.block_axis, q.fmt.block_size)
    return e, np.asarray(q.data), m


def _e_ref(e: np.ndarray, reduce_axes: tuple[int, ...], guard: int) -> np.ndarray:
    axes = tuple(sorted({a % e.ndim for a in reduce_axes}))
    return (np.max(e, axis=axes, keepdims=True) - guard).astype(np.int32)


@nb.njit(cache=True)
def _align_flat(x, m, s, mode, out):
    for i in range(x.size):
        v = np.int64(x[i])
        if m is not None:
            v = v * m[i]
        sh = s[i]
        if sh > 62:
            sh = 62
        out[i] = shift_round(v, sh, mode)


def align(q: QTensor, reduce_axes: tuple[int, ...], guard: int, rounding: Rounding) -> tuple[np.ndarray, np.ndarray]:
    """Numba kernel; see the module docstring for the contract."""
    if not 0 <= guard <= 30:
        raise ValueError(f"align: guard={guard} must be in 0..30")
    e, x, m = _expand(q)
    e_ref = _e_ref(e, reduce_axes, guard)
    s = np.ascontiguousarray(np.broadcast_to(e_ref, x.shape) - e).ravel()
    out = np.empty(x.size, np.int64)
    mf = None if m is None else np.ascontiguousarray(m).ravel()
    _align_flat(np.ascontiguousarray(x).ravel(), mf, s, int(rounding), out)
    return out.reshape(x.shape), e_ref


def align_ref(
    q: QTensor, reduce_axes: tuple[int, ...], guard: int, rounding: Rounding
) -> tuple[np.ndarray, np.ndarray]:
    """Plain-Python twin of :func:`align`."""
    e, x, m = _expand(q)
    e_ref = _e_ref(e, reduce_axes, guard)
    eb = np.broadcast_to(e_ref, x.shape)
    out = np.empty(x.shape, np.int64)
    for idx in np.ndindex(*x.shape):
        v = int(x[idx]) * (1 if m is None else int(m[idx]))
        out[idx] = shift_round_ref(v, min(62, int(eb[idx]) - int(e[idx])), rounding)
    return out, e_ref
