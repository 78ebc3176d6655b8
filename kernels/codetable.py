"""code_table: a unary function of given codes as a table over every input code.

When a model gives the codes of a unary region's input and output (and of every tensor inside
it, as onnxruntime's ``quantize_static`` does around a GELU: the ``Erf`` output, ``1 + erf``,
``x * (1 + erf)``), the output code is a function of the input code alone: an 8-bit input has
256 codes, so the region is one table, made once at lowering by evaluating the region on
every input code with each inner quantization applied. This kernel only looks up.

Contract of :func:`code_table`:

* ``c``: int64 centered input codes ``q - zp_in`` in ``c_lo .. c_lo + len(table) - 1``
  (checked, ValueError naming the first code outside);
* ``table``: int64 centered output codes ``q - zp_out``, one per input code from ``c_lo``,
  already inside the output range (made so at lowering), so nothing saturates here;
* returns ``(table[c - c_lo], 0)``.

RTL idiom: a ROM of ``len(table)`` words addressed by the input code minus ``c_lo``.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from bbct.kernels.formats import require_int


def _setup(c: np.ndarray, table: np.ndarray, c_lo: int) -> tuple[np.ndarray, np.ndarray]:
    c = require_int("code_table: c", c).astype(np.int64, copy=False)
    table = require_int("code_table: table", table).astype(np.int64, copy=False)
    if table.ndim != 1 or not table.size:
        raise ValueError(f"code_table: table must be 1-D and non-empty, got shape {table.shape}")
    bad = (c < c_lo) | (c >= c_lo + table.size)
    if bad.any():
        raise ValueError(
            f"code_table: code {int(c[bad].ravel()[0])} outside the table's {c_lo}..{c_lo + table.size - 1}"
        )
    return np.ascontiguousarray(c), np.ascontiguousarray(table)


def code_table_ref(c: np.ndarray, table: np.ndarray, c_lo: int) -> tuple[np.ndarray, int]:
    """Plain-Python reference of :func:`code_table` (one element at a time)."""
    c, table = _setup(c, table, c_lo)
    out = np.empty(c.shape, np.int64)
    flat, res = c.reshape(-1), out.reshape(-1)
    for i in range(flat.size):
        res[i] = int(table[int(flat[i]) - c_lo])
    return out, 0


@nb.njit(cache=True)
def _lookup(c, table, c_lo, out):
    for i in range(c.size):
        out[i] = table[c[i] - c_lo]


def code_table(c: np.ndarray, table: np.ndarray, c_lo: int) -> tuple[np.ndarray, int]:
    """``table[c - c_lo]`` (Numba); same contract as :func:`code_table_ref`."""
    c, table = _setup(c, table, c_lo)
    out = np.empty(c.size, np.int64)
    _lookup(c.reshape(-1), table, np.int64(c_lo), out)
    return out.reshape(c.shape), 0
