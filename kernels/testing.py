"""Hypothesis strategies and oracles for testing integer kernels — bbct's and your own.

Typical use, proving a fast kernel equal to its reference to the bit::

    from hypothesis import given
    from bbct.kernels.testing import int_formats, int_arrays, assert_bit_equal

    @given(int_formats(max_bits=12), int_arrays(shape=(4, 33), bits=20))
    def test_my_kernel(fmt, x):
        assert_bit_equal(my_kernel(x, fmt), my_kernel_ref(x, fmt))

``edge_ints`` gives the values hardware bugs live at (type min/max, 0, +-1, +-2**k +-1);
pin them with ``@example`` or mix them in with ``int_arrays(..., edges=True)``.

Strategies: :func:`rounding_modes`, :func:`saturation_modes`, :func:`int_formats`,
:func:`shapes`, :func:`shapes_and_blocks`, :func:`int_arrays`, :func:`float_arrays`,
:func:`qtensors`. Oracles: :func:`assert_bit_equal` (with :func:`first_mismatch`'s
first/last index, both values and their bits), :func:`assert_qtensor_equal`.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bbct.kernels.formats import EXP_ZERO, IntFormat, QTensor, Rounding, Saturation, ScaleKind, expand_blocks, int_range


def rounding_modes() -> st.SearchStrategy[Rounding]:
    """Every :class:`Rounding` mode (TRN .. RND_CONV)."""
    return st.sampled_from(list(Rounding))


def saturation_modes() -> st.SearchStrategy[Saturation]:
    """Every :class:`Saturation` mode (SAT, SAT_SYM, WRAP)."""
    return st.sampled_from(list(Saturation))


def edge_ints(bits: int, signed: bool = True) -> list[int]:
    """Type min/max, 0, +-1 and +-2**k +-1 inside the range of ``bits``."""
    lo, hi = int_range(bits, signed)
    vals = {lo, hi, 0, 1, -1, lo + 1, hi - 1}
    for k in range(1, bits):
        for v in (1 << k, (1 << k) - 1, (1 << k) + 1):
            vals.update({v, -v})
    return sorted(v for v in vals if lo <= v <= hi)


@st.composite
def int_formats(
    draw: st.DrawFn,
    min_bits: int = 2,
    max_bits: int = 16,
    scale: ScaleKind | None = ScaleKind.POW2,
    max_block: int = 9,
) -> IntFormat:
    """Formats over widths, signedness, block sizes (0 = whole axis; 1..max_block, often not
    dividing the axis), rounding and saturation modes."""
    return IntFormat(
        bits=draw(st.integers(min_bits, max_bits)),
        signed=draw(st.booleans()),
        block_axis=-1,
        block_size=draw(st.integers(0, max_block)),
        scale=scale if scale is not None else draw(st.sampled_from(list(ScaleKind))),
        mant_bits=draw(st.integers(2, 10)),
        rounding=draw(rounding_modes()),
        saturation=draw(saturation_modes()),
    )


def shapes(max_rows: int = 4, max_cols: int = 40) -> st.SearchStrategy[tuple[int, int]]:
    """2-D shapes (rows, cols), cols often not a multiple of a block size."""
    return st.tuples(st.integers(1, max_rows), st.integers(1, max_cols))


@st.composite
def shapes_and_blocks(
    draw: st.DrawFn, max_dims: int = 3, max_side: int = 12, max_block: int = 9
) -> tuple[tuple[int, ...], int, int]:
    """``(shape, block_axis, block_size)``: 1..max_dims dims, any axis (as a negative index),
    block sizes 0 (whole axis), 1, ones that do not divide the axis, and ones longer than it."""
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=1, max_size=max_dims)))
    axis = draw(st.integers(-len(shape), -1))
    return shape, axis, draw(st.integers(0, max_block))


@st.composite
def int_arrays(
    draw: st.DrawFn, shape: tuple[int, ...], bits: int, signed: bool = True, edges: bool = True
) -> np.ndarray:
    """int64 arrays of ``shape`` with values of ``bits``; with ``edges`` half the draws mix in edge values."""
    lo, hi = int_range(bits, signed)
    elems = st.integers(lo, hi)
    if edges:
        elems = st.one_of(elems, st.sampled_from(edge_ints(bits, signed)))
    return draw(hnp.arrays(np.int64, shape, elements=elems))


@st.composite
def float_arrays(draw: st.DrawFn, shape: tuple[int, ...], max_abs: float = 1e3) -> np.ndarray:
    """Finite float64 arrays, including exact zeros, ties like 2.5 and tiny/huge magnitudes."""
    special = st.sampled_from([0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 1e-30, -max_abs, max_abs])
    base = st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, width=64)
    return draw(hnp.arrays(np.float64, shape, elements=st.one_of(base, special)))


@st.composite
def qtensors(
    draw: st.DrawFn,
    fmt: IntFormat,
    shape: tuple[int, ...],
    exp_range: tuple[int, int] = (-20, 10),
    zero_blocks: bool = True,
) -> QTensor:
    """A QTensor in ``fmt`` with random codes (edge values mixed in) and per-block exponents;
    with ``zero_blocks`` some blocks are all zero with exponent ``EXP_ZERO``, as quantize
    and requantize produce them."""
    from bbct.kernels.blocks import blocks_shape

    lo, hi = fmt.qmin, fmt.qmax
    edges = [v for v in edge_ints(fmt.bits, fmt.signed) if lo <= v <= hi]
    data = draw(hnp.arrays(np.int64, shape, elements=st.one_of(st.integers(lo, hi), st.sampled_from(edges))))
    bshape = blocks_shape(shape, fmt.block_axis, fmt.block_size)
    exp = draw(hnp.arrays(np.int32, bshape, elements=st.integers(*exp_range)))
    if zero_blocks:
        zero = draw(hnp.arrays(np.bool_, bshape, elements=st.booleans()))
        zero &= draw(st.booleans())
        if zero.any():
            exp = np.where(zero, EXP_ZERO, exp).astype(np.int32)
            data = np.where(expand_blocks(zero, shape, fmt.block_axis, fmt.block_size), 0, data)
    mant = None
    if fmt.scale == ScaleKind.MULT:
        mant = draw(
            hnp.arrays(np.int32, bshape, elements=st.integers(1 << (fmt.mant_bits - 1), (1 << fmt.mant_bits) - 1))
        )
    return QTensor(data.astype(fmt.dtype), fmt, exp, mant)


def first_mismatch(a: np.ndarray, b: np.ndarray) -> str:
    """Where two integer arrays differ: first and last index, both values and their bits."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return f"shapes differ: {a.shape} vs {b.shape}"
    bad = np.argwhere(a != b)
    if not len(bad):
        return "equal"
    parts = [f"{len(bad)} of {a.size} elements differ"]
    for idx in (bad[0], bad[-1]):
        i = tuple(int(v) for v in idx)
        x, y = int(a[i]), int(b[i])
        parts.append(f"at {i}: {x} (0b{x & ((1 << 64) - 1):b}) vs {y} (0b{y & ((1 << 64) - 1):b})")
    return "; ".join(parts)


def assert_bit_equal(a: np.ndarray, b: np.ndarray) -> None:
    """Equal to the bit, or an AssertionError that says where and how (with bit patterns)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not np.array_equal(a.astype(np.int64), b.astype(np.int64)):
        raise AssertionError(first_mismatch(a, b))


def assert_qtensor_equal(a: QTensor, b: QTensor) -> None:
    """Codes, exponents, multipliers and ``meta['overflow']`` equal to the bit."""
    assert_bit_equal(a.data, b.data)
    assert_bit_equal(np.broadcast_to(a.exp, b.exp.shape) if a.exp.shape != b.exp.shape else a.exp, b.exp)
    if (a.mant is None) != (b.mant is None):
        raise AssertionError("one tensor has multipliers, the other not")
    if a.mant is not None:
        assert_bit_equal(a.mant, b.mant)
    if a.meta.get("overflow", 0) != b.meta.get("overflow", 0):
        raise AssertionError(f"overflow counts differ: {a.meta.get('overflow')} vs {b.meta.get('overflow')}")
