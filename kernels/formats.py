"""Integer number formats and the rounding/saturation primitives every kernel shares.

A value in bbct is an integer array plus the format that says what its bits mean.
The format is a frozen, hashable type (:class:`IntFormat`); the per-block scale values
that go with one concrete tensor travel beside the integers in a :class:`QTensor`.

Real value of element ``i`` in block ``b``::

    POW2 scale:  x_real = q[i] * 2**exp[b]
    MULT scale:  x_real = q[i] * mant[b] * 2**exp[b]      (mant: unsigned, ``mant_bits`` wide)

Blocks run along ``IntFormat.block_axis`` in runs of ``block_size`` elements; the last
block may be short when ``block_size`` does not divide the dimension. ``block_size == 0``
means one block spans the whole axis. ``exp``/``mant`` have the tensor's shape with the
block axis replaced by the number of blocks, or any shape that broadcasts to it (a static,
calibrated scale is shared by every token and has size 1 on the token axes).

Rounding modes (hardware vocabulary, after ap_fixed), shown on a value exactly halfway::

    mode       2.5 -> 1.5 -> -1.5 -> -2.5 ->   rule
    TRN         2      1      -2      -3       floor (drop bits; two's complement truncation)
    TRN_ZERO    2      1      -1      -2       truncate toward zero
    RND         3      2      -1      -2       half up (toward +inf); add half then floor
    RND_ZERO    2      1      -1      -2       half toward zero
    RND_INF     3      2      -2      -3       half away from zero
    RND_CONV    2      2      -2      -2       half to even (convergent)

Non-midpoint values round to nearest in every RND* mode.
The same modes round an integer division (:func:`div_round`): ``x / n`` with floor
quotient ``q`` and remainder ``r`` (``0 <= r < n``) is a midpoint exactly when ``2 r == n``.

Saturation modes: SAT clips to [min, max] of the width; SAT_SYM clips a signed value to
[-max, max] (the most negative code is never produced); WRAP keeps the low ``bits`` bits
(two's complement wrap-around, what a plain adder does).

Every primitive has a plain-Python reference (``*_ref``, Python ints, no numpy integer
overflow possible) and a Numba twin; tests prove them equal bit for bit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numba as nb
import numpy as np

__all__ = [
    "EXP_ZERO",
    "EXP_MIN",
    "Rounding",
    "Saturation",
    "ScaleKind",
    "IntFormat",
    "QTensor",
    "FormatError",
    "require_int",
    "int_range",
    "shift_round_ref",
    "div_round_ref",
    "saturate_ref",
    "shift_round",
    "div_round",
    "saturate",
    "shift_round_array",
    "saturate_array",
    "sat_bounds",
    "bit_length",
    "bit_length_ref",
    "num_blocks",
    "block_index",
    "expand_blocks",
]


# Exponent given to an all-zero block: far below any real exponent, so aligning to a
# block maximum never picks it, yet sums of two stay well inside int32.
EXP_ZERO = -1024
# Smallest real block exponent. quantize flushes a block whose scale would fall below it to
# zero (codes 0, EXP_ZERO): only magnitudes under ~2**-960 (float64 subnormals and their
# neighbours), never met in a model, so a real exponent can never collide with EXP_ZERO.
EXP_MIN = -960


class FormatError(ValueError):
    """A number format or a value that does not fit its format."""


class Rounding(enum.IntEnum):
    """Rounding of a right shift. Integer codes are what Numba kernels receive."""

    TRN = 0
    TRN_ZERO = 1
    RND = 2
    RND_ZERO = 3
    RND_INF = 4
    RND_CONV = 5


class Saturation(enum.IntEnum):
    """Overflow handling when a value is narrowed to ``bits``."""

    SAT = 0
    SAT_SYM = 1
    WRAP = 2


class ScaleKind(enum.IntEnum):
    """How a block's scale is stored: a shared power-of-two exponent, or multiplier + exponent."""

    POW2 = 0
    MULT = 1


def _enum(cls: type[enum.IntEnum], value: Any, field_name: str) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        try:
            return cls(int(value))
        except ValueError:
            pass
    if isinstance(value, str):
        try:
            return cls[value.upper()]
        except KeyError:
            pass
    raise FormatError(f"{field_name}={value!r} is not one of {', '.join(m.name for m in cls)}")


@dataclass(frozen=True)
class IntFormat:
    """What the bits of an integer tensor mean.

    Attributes:
        bits: total width in bits (including the sign bit when signed): 2..32 for stored
            tensors, up to 62 for accumulators and aligned (widened) operands.
        signed: two's complement if True, unsigned otherwise.
        block_axis: axis along which scale blocks run (negative counts from the end).
        block_size: elements per block along ``block_axis``; 0 = one block for the whole axis.
        scale: POW2 (shared exponent per block) or MULT (multiplier + exponent per block).
        mant_bits: width of the unsigned per-block multiplier for MULT scales (1..31: bbct's
            own weights take 1..16, a model's given float scales up to 31).
        rounding: rounding used when a value is produced in this format.
        saturation: overflow handling when a value is produced in this format.
    """

    bits: int = 8
    signed: bool = True
    block_axis: int = -1
    block_size: int = 0
    scale: ScaleKind = ScaleKind.POW2
    mant_bits: int = 8
    rounding: Rounding = Rounding.RND_CONV
    saturation: Saturation = Saturation.SAT

    def __post_init__(self) -> None:
        if not isinstance(self.bits, (int, np.integer)) or not 2 <= int(self.bits) <= 62:
            raise FormatError(f"bits={self.bits!r} must be an integer in 2..62")
        if not isinstance(self.block_size, (int, np.integer)) or int(self.block_size) < 0:
            raise FormatError(f"block_size={self.block_size!r} must be an integer >= 0")
        if not 1 <= int(self.mant_bits) <= 31:
            raise FormatError(f"mant_bits={self.mant_bits!r} must be in 1..31")
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "block_size", int(self.block_size))
        object.__setattr__(self, "block_axis", int(self.block_axis))
        object.__setattr__(self, "mant_bits", int(self.mant_bits))
        object.__setattr__(self, "signed", bool(self.signed))
        object.__setattr__(self, "scale", _enum(ScaleKind, self.scale, "scale"))
        object.__setattr__(self, "rounding", _enum(Rounding, self.rounding, "rounding"))
        object.__setattr__(self, "saturation", _enum(Saturation, self.saturation, "saturation"))

    @property
    def qmin(self) -> int:
        """Smallest code this format produces (SAT_SYM excludes the most negative code)."""
        lo, hi = int_range(self.bits, self.signed)
        if self.signed and self.saturation == Saturation.SAT_SYM:
            return -hi
        return lo

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed)[1]

    @property
    def dtype(self) -> np.dtype:
        """Smallest numpy integer dtype that holds every code of this format."""
        for dt in (np.int8, np.int16, np.int32, np.int64) if self.signed else (np.uint8, np.uint16, np.uint32):
            if np.iinfo(dt).bits >= self.bits:
                return np.dtype(dt)
        return np.dtype(np.int64)  # unsigned wider than 32 bits: int64 holds up to 62 bits

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "signed": self.signed,
            "block_axis": self.block_axis,
            "block_size": self.block_size,
            "scale": self.scale.name,
            "mant_bits": self.mant_bits,
            "rounding": self.rounding.name,
            "saturation": self.saturation.name,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IntFormat:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise FormatError(f"unknown format field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def short(self) -> str:
        """Compact text, e.g. ``s8 b32@-1 pow2 RND_CONV/SAT``."""
        blk = f"b{self.block_size}@{self.block_axis}" if self.block_size else f"b*@{self.block_axis}"
        sc = "pow2" if self.scale == ScaleKind.POW2 else f"mult{self.mant_bits}"
        return f"{'s' if self.signed else 'u'}{self.bits} {blk} {sc} {self.rounding.name}/{self.saturation.name}"


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(min, max) of a two's complement (signed) or unsigned integer of ``bits`` bits."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def require_int(name: str, a: Any) -> np.ndarray:
    """Return ``a`` as an integer ndarray in native byte order; a float (or bool/object)
    array is a TypeError.

    Kernels call this on every input: floats become integers once, at lowering.
    """
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: integer array expected, got dtype {arr.dtype}")
    if not arr.dtype.isnative:  # big-endian data (from a file): the compiled kernels read native
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def num_blocks(n: int, block_size: int) -> int:
    """Number of blocks covering ``n`` elements (the last block may be short)."""
    if block_size <= 0 or block_size >= n:
        return 1 if n > 0 else 0
    return -(-n // block_size)


def block_index(n: int, block_size: int) -> np.ndarray:
    """Block number of every position 0..n-1 along the block axis."""
    if block_size <= 0:
        return np.zeros(n, dtype=np.int64)
    return np.arange(n, dtype=np.int64) // block_size


def expand_blocks(s: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """Broadcast a per-block array ``s`` (block axis of length nblocks or 1) to ``shape``."""
    axis = axis % len(shape)
    s = np.asarray(s)
    if s.ndim != len(shape):
        raise FormatError(f"scale array has {s.ndim} dims, tensor has {len(shape)}")
    if s.shape[axis] == 1:
        return np.broadcast_to(s, shape)
    idx = block_index(shape[axis], block_size)
    return np.broadcast_to(np.take(s, idx, axis=axis), shape)


@dataclass(frozen=True, eq=False)
class QTensor:
    """An integer tensor with its format and its per-block scale values.

    ``data`` holds the codes (``fmt.dtype`` or wider signed ints); ``exp`` the per-block
    exponents (int32); ``mant`` the per-block unsigned multipliers for MULT formats
    (int32), None for POW2.
    """

    data: np.ndarray
    fmt: IntFormat
    exp: np.ndarray
    mant: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_int("QTensor.data", self.data)
        require_int("QTensor.exp", self.exp)
        if self.mant is not None:
            require_int("QTensor.mant", self.mant)
        if (self.mant is None) != (self.fmt.scale == ScaleKind.POW2):
            raise FormatError("mant must be given exactly when the format's scale is MULT")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def scale_array(self) -> np.ndarray:
        """Per-element real scale (float64, a read-only broadcast view) — for comparison and dumps
        only, never for kernels."""
        # per block first, then broadcast: the same float64 per element (ldexp and the product
        # are exact or rounded alike), computed once per block instead of once per element
        s = np.ldexp(1.0, np.asarray(self.exp, np.int64))
        if self.mant is not None:
            s = s * self.mant
        return expand_blocks(s, self.shape, self.fmt.block_axis, self.fmt.block_size)

    def dequantize(self) -> np.ndarray:
        """Real values as float64 (exact for widths <= 32 and exponents in float64 range)."""
        return self.data.astype(np.float64) * self.scale_array()


# ---------------------------------------------------------------------------------------
# Reference primitives: plain Python ints, exact for any magnitude.


def shift_round_ref(x: int, s: int, mode: Rounding | int) -> int:
    """Round ``x / 2**s`` to an integer with ``mode`` (s > 0); ``x * 2**-s`` exactly if s <= 0.

    Contract: exact for any Python int. Midpoints follow the table in the module docstring.
    """
    x, s, mode = int(x), int(s), int(mode)
    if s <= 0:
        return x << (-s)
    q = x >> s  # floor
    r = x - (q << s)  # 0 <= r < 2**s
    half = 1 << (s - 1)
    if mode == Rounding.TRN:
        return q
    if mode == Rounding.TRN_ZERO:
        return q + 1 if (x < 0 and r != 0) else q
    if r < half:
        return q
    if r > half:
        return q + 1
    # exactly halfway between q and q + 1
    if mode == Rounding.RND:
        return q + 1
    if mode == Rounding.RND_ZERO:
        return q + 1 if x < 0 else q
    if mode == Rounding.RND_INF:
        return q if x < 0 else q + 1
    if mode == Rounding.RND_CONV:
        return q + (q & 1)
    raise FormatError(f"unknown rounding mode {mode}")


def div_round_ref(x: int, n: int, mode: Rounding | int) -> int:
    """Round ``x / n`` to an integer with ``mode`` (``n > 0``): an integer divider's quotient.

    ``q = floor(x / n)`` and the remainder ``r = x - q n`` (``0 <= r < n``); the quotient is
    exactly halfway between ``q`` and ``q + 1`` when ``2 r == n``, above it when ``2 r > n``.
    Midpoints follow the table in the module docstring (``div_round_ref(x, 2**s, mode) ==
    shift_round_ref(x, s, mode)``). Exact for any Python ints.
    """
    x, n, mode = int(x), int(n), int(mode)
    if n <= 0:
        raise ValueError(f"div_round: divisor n={n} must be > 0")
    q, r = divmod(x, n)  # floor quotient, 0 <= r < n
    if mode == Rounding.TRN:
        return q
    if mode == Rounding.TRN_ZERO:
        return q + 1 if (x < 0 and r != 0) else q
    if 2 * r < n:
        return q
    if 2 * r > n:
        return q + 1
    if mode == Rounding.RND:
        return q + 1
    if mode == Rounding.RND_ZERO:
        return q + 1 if x < 0 else q
    if mode == Rounding.RND_INF:
        return q if x < 0 else q + 1
    if mode == Rounding.RND_CONV:
        return q + (q & 1)
    raise FormatError(f"unknown rounding mode {mode}")


def saturate_ref(x: int, bits: int, signed: bool, mode: Saturation | int) -> tuple[int, bool]:
    """Narrow ``x`` to ``bits``; returns (value, overflowed).

    ``overflowed`` is True when ``x`` was outside the mode's range (SAT/SAT_SYM clip it,
    WRAP keeps the low bits).
    """
    x, mode = int(x), int(mode)
    lo, hi = int_range(bits, signed)
    if mode == Saturation.SAT_SYM and signed:
        lo = -hi
    if lo <= x <= hi:
        return x, False
    if mode == Saturation.WRAP:
        lo_w = -(1 << (bits - 1)) if signed else 0
        return ((x - lo_w) % (1 << bits)) + lo_w, True
    return (lo if x < lo else hi), True


def bit_length_ref(x: int) -> int:
    """Bits needed for |x| (0 for 0): a leading-zero count in hardware, ``64 - clz(|x|)``."""
    return abs(int(x)).bit_length()


# ---------------------------------------------------------------------------------------
# Numba twins. Scalar functions are inlined into every kernel that calls them.
# Contract: |x| < 2**62 and 0 <= s <= 62 (shift_round), so nothing overflows int64.


@nb.njit(cache=True, inline="always")
def shift_round(x: np.int64, s: np.int64, mode: np.int64) -> np.int64:
    """Numba twin of :func:`shift_round_ref` for int64 with |x| < 2**62, -62 <= s <= 62."""
    if s <= 0:
        return x << (-s)
    q = x >> s
    if mode == 0:  # TRN
        return q
    r = x - (q << s)
    if mode == 1:  # TRN_ZERO
        if x < 0 and r != 0:
            return q + 1
        return q
    half = np.int64(1) << (s - 1)
    if r < half:
        return q
    if r > half:
        return q + 1
    if mode == 2:  # RND
        return q + 1
    if mode == 3:  # RND_ZERO
        return q + 1 if x < 0 else q
    if mode == 4:  # RND_INF
        return q if x < 0 else q + 1
    return q + (q & 1)  # RND_CONV


@nb.njit(cache=True, inline="always")
def div_round(x: np.int64, n: np.int64, mode: np.int64) -> np.int64:
    """Numba twin of :func:`div_round_ref` for int64 with |x| < 2**62 and 0 < n < 2**61.

    One truncating hardware division gives ``q`` and ``r``; the floor quotient is
    ``q - 1``, ``r + n`` when the remainder is negative. The tie test ``2 r == n`` is one
    comparison of the remainder shifted left by one with the divisor.
    """
    q = x // n  # Numba follows Python: floor division for integers
    r = x - q * n  # 0 <= r < n
    if mode == 0:  # TRN
        return q
    if mode == 1:  # TRN_ZERO
        if x < 0 and r != 0:
            return q + 1
        return q
    r2 = r << 1
    if r2 < n:
        return q
    if r2 > n:
        return q + 1
    if mode == 2:  # RND
        return q + 1
    if mode == 3:  # RND_ZERO
        return q + 1 if x < 0 else q
    if mode == 4:  # RND_INF
        return q if x < 0 else q + 1
    return q + (q & 1)  # RND_CONV


@nb.njit(cache=True, inline="always")
def saturate(x: np.int64, lo: np.int64, hi: np.int64, wrap: bool, bits: np.int64) -> np.int64:
    """Numba twin of :func:`saturate_ref`'s value; caller passes the mode's (lo, hi).

    For WRAP, ``lo`` must be the format's true minimum (``-2**(bits-1)`` or 0).
    Overflow is ``result != x``.
    """
    if lo <= x <= hi:
        return x
    if wrap:
        m = np.int64(1) << bits
        return ((x - lo) & (m - 1)) + lo
    return lo if x < lo else hi


def sat_bounds(bits: int, signed: bool, mode: Saturation | int) -> tuple[int, int, bool]:
    """(lo, hi, wrap) to pass to :func:`saturate` for a format."""
    lo, hi = int_range(bits, signed)
    mode = Saturation(int(mode))
    if mode == Saturation.SAT_SYM and signed:
        lo = -hi
    return lo, hi, mode == Saturation.WRAP


@nb.njit(cache=True, inline="always")
def extent(x):
    """(max, min) of the 1-D integer ``x`` and 0, as int64: one vectorizable pass (the range
    checks of the kernels, read in the pass that also does their work)."""
    mx = np.int64(0)
    mn = np.int64(0)
    for j in range(x.size):
        v = np.int64(x[j])
        mx = max(mx, v)
        mn = min(mn, v)
    return mx, mn


@nb.njit(cache=True, inline="always")
def bit_length(x: np.int64) -> np.int64:
    """Numba twin of :func:`bit_length_ref` for |x| < 2**63."""
    if x < 0:
        x = -x
    n = np.int64(0)
    while x > 0:
        x >>= 1
        n += 1
    return n


@nb.njit(cache=True)
def _shift_round_array(x: np.ndarray, s: np.ndarray, mode: int) -> np.ndarray:
    out = np.empty(x.size, dtype=np.int64)
    xf = x.ravel()
    sf = s.ravel()
    for i in range(xf.size):
        out[i] = shift_round(np.int64(xf[i]), np.int64(sf[i]), mode)
    return out


def shift_round_array(x: np.ndarray, s: np.ndarray | int, mode: Rounding | int) -> np.ndarray:
    """Elementwise :func:`shift_round` on int arrays (``s`` broadcasts to ``x``); int64 out."""
    x = require_int("x", x).astype(np.int64, copy=False)
    s = np.broadcast_to(require_int("s", np.asarray(s)).astype(np.int64), x.shape)
    return _shift_round_array(np.ascontiguousarray(x), np.ascontiguousarray(s), int(mode)).reshape(x.shape)


@nb.njit(cache=True)
def _saturate_array(x: np.ndarray, lo: int, hi: int, wrap: bool, bits: int) -> tuple[np.ndarray, int]:
    out = np.empty(x.size, dtype=np.int64)
    xf = x.ravel()
    n = 0
    for i in range(xf.size):
        v = np.int64(xf[i])
        y = saturate(v, lo, hi, wrap, bits)
        if y != v:
            n += 1
        out[i] = y
    return out, n


def saturate_array(x: np.ndarray, bits: int, signed: bool, mode: Saturation | int) -> tuple[np.ndarray, int]:
    """Elementwise :func:`saturate` on an int array; returns (int64 values, overflow count)."""
    x = require_int("x", x).astype(np.int64, copy=False)
    lo, hi, wrap = sat_bounds(bits, signed, mode)
    out, n = _saturate_array(np.ascontiguousarray(x), lo, hi, wrap, bits)
    return out.reshape(x.shape), int(n)
