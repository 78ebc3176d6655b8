"""Block layout helpers shared by the kernels: views of a tensor as (rows, n) along the block axis.

These move data and broadcast per-block parameters; they do no arithmetic on values.
"""

from __future__ import annotations

import numpy as np

from bbct.kernels.formats import FormatError, num_blocks


def rows_view(x: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` with ``axis`` moved last and flattened to (rows, n); returns it and the moved shape."""
    axis = axis % x.ndim
    moved = np.moveaxis(x, axis, -1)
    return np.ascontiguousarray(moved).reshape(-1, moved.shape[-1]), moved.shape


def rows_restore(y: np.ndarray, moved_shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Inverse of :func:`rows_view` for an array whose last dimension may have changed."""
    axis = axis % len(moved_shape)
    return np.moveaxis(y.reshape(moved_shape[:-1] + (y.shape[-1],)), -1, axis)


def blocks_shape(shape: tuple[int, ...], axis: int, block_size: int) -> tuple[int, ...]:
    """Shape of the per-block parameter array of a tensor."""
    axis = axis % len(shape)
    s = list(shape)
    s[axis] = num_blocks(shape[axis], block_size)
    return tuple(s)


def block_rows(p: np.ndarray | None, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray | None:
    """Per-block parameters broadcast to the blocks shape and laid out as (rows, nblocks)."""
    if p is None:
        return None
    bshape = blocks_shape(shape, axis, block_size)
    p = np.asarray(p)
    if p.ndim != len(shape):
        p = p.reshape((1,) * (len(shape) - p.ndim) + p.shape)
    try:
        full = np.broadcast_to(p, bshape)
    except ValueError:
        raise FormatError(f"per-block array of shape {p.shape} does not broadcast to blocks {bshape}") from None
    return rows_view(full, axis)[0]


def effective_block(n: int, block_size: int) -> int:
    """Block size in elements along an axis of length n (0 means the whole axis)."""
    return n if block_size <= 0 or block_size >= n else block_size
