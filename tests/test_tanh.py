"""tanh LUT: kernel equal to its reference over the whole int16 domain, error bound against
float tanh, a hand-derived golden."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bbct.kernels.tanh import make_tanh_lut, tanh_lut, tanh_lut_ref
from bbct.kernels.testing import assert_bit_equal, int_arrays

INT16 = np.arange(-(1 << 15), 1 << 15, dtype=np.int64)


@pytest.mark.parametrize("e_in,addr_bits", [(-12, 10), (-10, 8), (-13, 6)])
def test_tanh_lut_exhaustive_int16(e_in, addr_bits):
    p = make_tanh_lut(e_in, 16, addr_bits, 16)
    y = tanh_lut(INT16, p)
    assert_bit_equal(y, tanh_lut_ref(INT16, p))
    err = np.abs(y * 2.0**p.e_out - np.tanh(INT16 * 2.0**e_in)).max()
    half = 2.0 ** (p.addr_bits + p.frac_bits - 1 + e_in)
    h = 2 * half / 2**addr_bits
    # interpolation h**2/8 * max|tanh''| (< 0.77), the tail 1 - tanh(R) < 2 exp(-2R) (0 when
    # the table covers the whole domain), 1.5 output steps (entry + interpolation rounding)
    tail = 0.0 if p.frac_bits + addr_bits == 16 else 2 * np.exp(-2 * half)
    assert err < h**2 / 8 * 0.77 + tail + 1.5 * 2.0**p.e_out, err
    if e_in >= -12:  # the domain reaches +-8: +1.0 saturates to 32767, -1.0 is exactly -32768
        assert y.max() == 2**15 - 1 and y.min() == -(2**15)
    assert np.all(np.diff(y) >= 0)  # monotone


def test_tanh_hand_golden():
    # e_in = -12 (4096 is 1.0), 10 address bits: the chosen range is the whole domain [-8, 8),
    # so frac_bits = 6 and the address of x is (x + 32768) >> 6.
    # x = 4096: address 576, fraction 0: T[576] = round(tanh(1) * 2**15) = round(24955.6) = 24956.
    # x = 4128: fraction 32 (midpoint): T[577] = round(tanh(1.015625) * 2**15) = round(25167.7)
    #   = 25168, y = 24956 + ((25168 - 24956) * 32) >>RND 6 = 24956 + 106 = 25062.
    # x = 4097: fraction 1: (212 * 1) >>RND 6 = 3.31 -> 3, y = 24959.
    # x = -32768 (-8.0): T[0] = round(-0.99999977 * 2**15) = -32768 (exactly -1.0 at 2**-15).
    p = make_tanh_lut(-12, 16, 10, 16)
    assert (p.q_lo, p.frac_bits, p.e_out) == (-32768, 6, -15)
    assert p.table[576:578].tolist() == [24956, 25168]
    assert tanh_lut(np.array([4096, 4128, 4097, 0, -32768, 32767]), p).tolist() == [
        24956,
        25062,
        24959,
        0,
        -32768,
        32767,
    ]


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(-14, -4), st.integers(4, 20), st.integers(4, 20), st.booleans())
def test_tanh_twins(data, e_in, in_bits, out_bits, interp):
    addr = data.draw(st.integers(2, min(in_bits, 10)))
    p = make_tanh_lut(e_in, in_bits, addr, out_bits, interp=interp)
    x = data.draw(int_arrays((data.draw(st.integers(1, 3)), data.draw(st.integers(1, 17))), in_bits))
    assert_bit_equal(tanh_lut(x, p), tanh_lut_ref(x, p))
