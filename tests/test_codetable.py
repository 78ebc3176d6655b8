"""code_table: a unary region over given codes as one table. Kernel equal to its reference
under hypothesis (codes at both ends of the table), a hand golden, errors."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bbct.kernels.codetable import code_table, code_table_ref
from bbct.kernels.testing import assert_bit_equal


@st.composite
def _case(draw):
    n = draw(st.integers(1, 300))
    c_lo = draw(st.integers(-40000, 40000))
    table = np.array(draw(st.lists(st.integers(-(1 << 20), 1 << 20), min_size=n, max_size=n)), np.int64)
    codes = st.one_of(st.integers(c_lo, c_lo + n - 1), st.sampled_from([c_lo, c_lo + n - 1]))
    c = np.array(draw(st.lists(codes, min_size=0, max_size=40)), np.int64)
    return c, table, c_lo


@settings(max_examples=200, deadline=None)
@given(case=_case())
@example(case=(np.array([-128, 127]), np.arange(256, dtype=np.int64), -128))  # both ends of an s8 table
def test_code_table_twins(case):
    c, table, c_lo = case
    got, ev = code_table(c, table, c_lo)
    want, ev_ref = code_table_ref(c, table, c_lo)
    assert_bit_equal(got, want)
    assert ev == ev_ref == 0


def test_code_table_hand_golden():
    # codes -2..2 of an input (c_lo = -2) mapped by table [5, 6, 7, 8, 9]: code -2 is entry 0
    # (5), code 0 entry 2 (7), code 2 entry 4 (9)
    y, ev = code_table(np.array([[-2, 0], [2, 1]]), np.array([5, 6, 7, 8, 9]), -2)
    assert y.tolist() == [[5, 7], [9, 8]] and ev == 0


def test_code_table_errors():
    with pytest.raises(ValueError, match="code 3 outside the table's -2..2"):
        code_table(np.array([0, 3]), np.arange(5, dtype=np.int64), -2)
    with pytest.raises(ValueError, match="1-D and non-empty"):
        code_table(np.array([0]), np.zeros((0,), np.int64), 0)


def test_code_table_node_validates_width_and_entries():
    """The IR node checks its declared output width (2..62) and that every entry fits it."""
    from bbct.simulator.errors import LoweringError
    from bbct.simulator.ir import CodeTable

    CodeTable(name="t", inputs=("c",), table=np.array([-8, 7]), bits=4)
    with pytest.raises(LoweringError, match=r"node t \(code_table\): table entries that fit s4"):
        CodeTable(name="t", inputs=("c",), table=np.array([-9, 7]), bits=4)
    with pytest.raises(LoweringError, match=r"node t \(code_table\): bits=1 must be in 2..62"):
        CodeTable(name="t", inputs=("c",), table=np.array([0]), bits=1)
