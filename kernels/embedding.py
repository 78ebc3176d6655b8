"""embedding: gather rows of a block-scaled table by integer ids.

Contract: ``table`` is a (V, H) QTensor with blocks along H (exp/mant of shape (V, nb));
the result has shape ``ids.shape + (H,)`` with each row's codes and block scales copied
unchanged (no arithmetic). Ids outside ``0..V-1`` are an error that names the first one.
"""

from __future__ import annotations

import dataclasses

import numba as nb
import numpy as np

from bbct.kernels.formats import FormatError, QTensor, require_int


def _check(table: QTensor, ids: np.ndarray) -> np.ndarray:
    ids = require_int("embedding: ids", ids)
    if table.data.ndim != 2:
        raise FormatError(f"embedding: table must be 2-D, got shape {table.shape}")
    if table.fmt.block_axis % 2 != 1:
        raise FormatError("embedding: table blocks must run along the hidden axis (block_axis=-1)")
    v = table.shape[0]
    bad = (ids < 0) | (ids >= v)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"embedding: id {int(ids[pos])} at position {pos} is outside the table's 0..{v - 1} (V={v})")
    return ids.astype(np.int64)


def _per_row(a: np.ndarray, v: int) -> np.ndarray:
    a = np.asarray(a)
    return np.broadcast_to(a, (v, a.shape[1]))


@nb.njit(cache=True)
def _gather(table, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for j in range(table.shape[1]):
            out[i, j] = table[r, j]


def _run(table: QTensor, ids: np.ndarray, gather) -> QTensor:
    ids = _check(table, ids)
    flat = ids.ravel()
    v, h = table.shape

    def take(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        out = np.empty((flat.size, a.shape[1]), a.dtype)
        gather(a, flat, out)
        return out.reshape(ids.shape + (a.shape[1],))

    data = take(table.data)
    exp = take(_per_row(table.exp, v))
    mant = None if table.mant is None else take(_per_row(table.mant, v))
    # blocks run along the last (hidden) axis of the gathered rows too
    return QTensor(data, dataclasses.replace(table.fmt, block_axis=-1), exp, mant)


def _gather_ref(table, ids, out):
    for i, r in enumerate(ids.tolist()):
        out[i, :] = [table[r, j] for j in range(table.shape[1])]


def embedding(table: QTensor, ids: np.ndarray) -> QTensor:
    """Gather rows of the (V, H) table for int ``ids`` of any shape (Numba).

    Returns a QTensor of shape ``ids.shape + (H,)`` in the table's format (blocks along the
    last axis), codes and per-block exponents/multipliers copied bit for bit; no rounding,
    no saturation. An id outside ``0..V-1`` is a ValueError naming it, its position and V.
    """
    return _run(table, ids, _gather)


def embedding_ref(table: QTensor, ids: np.ndarray) -> QTensor:
    """Plain-Python twin of :func:`embedding`."""
    return _run(table, ids, _gather_ref)
