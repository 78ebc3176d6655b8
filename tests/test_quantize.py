"""quantize / block_exponents: reference vs Numba to the bit, exactness of the block scales,
ONNX blocked QuantizeLinear as an independent oracle, float error bounds, hand goldens."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from kernels.formats import EXP_ZERO, FormatError, IntFormat, Rounding, Saturation, ScaleKind
from kernels.quantize import block_exponents, quantize, quantize_ref
from kernels.testing import assert_qtensor_equal, float_arrays, int_formats, rounding_modes, shapes_and_blocks

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _fmt(base: IntFormat, axis: int, block: int) -> IntFormat:
    d = base.to_dict() | {"block_axis": axis, "block_size": block}
    return IntFormat.from_dict(d)


@SETTINGS
@given(st.data(), int_formats(scale=None), shapes_and_blocks())
def test_quantize_twins_dynamic_and_static(data, fmt, sb):
    shape, axis, block = sb
    fmt = _fmt(fmt, axis, block)
    x = data.draw(float_arrays(shape))
    assert_qtensor_equal(quantize(x, fmt), quantize_ref(x, fmt))
    # static exponents two steps too small: the largest values saturate (and are counted)
    exp, mant = block_exponents(x, fmt)
    exp = np.where(exp == EXP_ZERO, 0, exp - 2).astype(np.int32)
    a, b = quantize(x, fmt, exp, mant), quantize_ref(x, fmt, exp, mant)
    assert_qtensor_equal(a, b)


@SETTINGS
@given(st.data(), int_formats(scale=None, max_bits=24), shapes_and_blocks())
def test_block_scales_are_the_smallest_that_fit(data, fmt, sb):
    shape, axis, block = sb
    fmt = _fmt(fmt, axis, block)
    x = data.draw(float_arrays(shape, max_abs=1e6))
    q = quantize(x, fmt)
    if fmt.signed:
        assert q.meta["overflow"] == 0  # dynamic scales fit by construction
    exp, mant = block_exponents(x, fmt)
    lo = 1 << (fmt.mant_bits - 1)
    from kernels.blocks import rows_view

    rows, _ = rows_view(np.abs(x), axis)
    bs = rows.shape[1] if block == 0 or block >= rows.shape[1] else block
    er = rows_view(exp, axis)[0]
    mr = None if mant is None else rows_view(mant, axis)[0]
    for r in range(rows.shape[0]):
        for b in range(er.shape[1]):
            amax = float(rows[r, b * bs : (b + 1) * bs].max())
            e = int(er[r, b])
            if amax == 0:
                assert e == EXP_ZERO
                continue
            if mr is None:  # smallest e with amax <= qmax * 2**e
                assert amax <= math.ldexp(fmt.qmax, e) and amax > math.ldexp(fmt.qmax, e - 1)
            else:
                m = int(mr[r, b])
                prev = math.ldexp(fmt.qmax * (m - 1), e) if m > lo else math.ldexp(fmt.qmax * (2 * lo - 1), e - 1)
                assert lo <= m < 2 * lo and amax <= math.ldexp(fmt.qmax * m, e) and amax > prev


@settings(max_examples=60, deadline=None)
@given(rounding_modes(), st.sampled_from(list(Saturation)), st.integers(-8, 8))
@example(Rounding.RND_CONV, Saturation.SAT, 0)
def test_every_midpoint_rounds_per_the_table(mode, sat, e):
    """k + 0.5 at exponent e for k in -9..8: the float path rounds like the integer shift."""
    from kernels.formats import shift_round_ref

    ks = np.arange(-9, 9)
    x = np.ldexp(ks + 0.5, e)[None, :]
    fmt = IntFormat(bits=6, rounding=mode, saturation=sat)
    q = quantize(x, fmt, np.full((1, 1), e, np.int32))
    want = [shift_round_ref(2 * int(k) + 1, 1, mode) for k in ks]
    assert q.data.tolist() == [want]
    assert_qtensor_equal(q, quantize_ref(x, fmt, np.full((1, 1), e, np.int32)))


@SETTINGS
@given(st.data(), int_formats(min_bits=3, max_bits=16, scale=None), shapes_and_blocks())
def test_float_error_bound(data, fmt, sb):
    """Dynamic scales never saturate a signed format: |x - deq| <= step/2 (RND*), < step (TRN*;
    checked as <= because the float64 difference itself may round up to a full step)."""
    shape, axis, block = sb
    fmt = _fmt(IntFormat.from_dict(fmt.to_dict() | {"signed": True}), axis, block)
    x = data.draw(float_arrays(shape))
    x[np.abs(x) < 2.0**-1000] = 0.0  # keep every scale 2**e a float64 (the test's own arithmetic)
    q = quantize(x, fmt)
    step = q.scale_array()
    err = np.abs(q.dequantize() - x)
    assert q.meta["overflow"] == 0
    if fmt.rounding in (Rounding.TRN, Rounding.TRN_ZERO):
        assert np.all(err <= step)
    else:
        assert np.all(err <= step / 2)


def test_quantize_hand_golden():
    # block [0.3, -1.0, 0.7]: amax 1.0, qmax 127: smallest e with 1.0 <= 127*2**e is -6
    # (127/64 = 1.98 >= 1 > 127/128); codes: 0.3*64 = 19.2 -> 19, -64, 0.7*64 = 44.8 -> 45
    q = quantize(np.array([[0.3, -1.0, 0.7]]), IntFormat(bits=8))
    assert q.exp.tolist() == [[-6]] and q.data.tolist() == [[19, -64, 45]]
    # ties at exponent 0: 2.5 -> 2 with RND_CONV, 3 with RND_INF; -2.5 -> -2 / -3
    e = np.zeros((1, 1), np.int32)
    assert quantize(np.array([[2.5, -2.5]]), IntFormat(bits=8), e).data.tolist() == [[2, -2]]
    assert quantize(np.array([[2.5, -2.5]]), IntFormat(bits=8, rounding="RND_INF"), e).data.tolist() == [[3, -3]]
    # static exponent 0 with 200.0 in s8: saturates to 127 (SAT), -127 for -200 (SAT_SYM), counted
    q = quantize(np.array([[200.0, -200.0]]), IntFormat(bits=8, saturation="SAT_SYM"), e)
    assert q.data.tolist() == [[127, -127]] and q.meta["overflow"] == 2
    # an all-zero block gets EXP_ZERO and zeros; blocks of 2 over 5 elements: 3 blocks
    z = quantize(np.zeros((1, 5)), IntFormat(bits=4, block_size=2))
    assert z.exp.tolist() == [[EXP_ZERO] * 3] and not z.data.any()
    # MULT, 4-bit mantissa: amax 1.0, qmax 7: scale >= 1/7 = 0.1428..; 9 * 2**-6 = 0.1406 is too
    # small, 10 * 2**-6 = 0.15625 is the smallest; 1.0 / 0.15625 = 6.4 -> 6
    m = quantize(np.array([[1.0]]), IntFormat(bits=4, scale=ScaleKind.MULT, mant_bits=4))
    assert (m.exp.tolist(), m.mant.tolist(), m.data.tolist()) == ([[-6]], [[10]], [[6]])


def test_quantize_errors():
    with pytest.raises(ValueError, match="non-finite value nan at index"):
        quantize(np.array([1.0, np.nan]), IntFormat())
    with pytest.raises(ValueError, match="non-finite value inf"):
        quantize_ref(np.array([np.inf]), IntFormat())
    with pytest.raises(FormatError, match="MULT format needs mant"):
        quantize(np.ones((1, 2)), IntFormat(scale=ScaleKind.MULT), np.zeros((1, 1), np.int32))
    with pytest.raises(FormatError, match="wider than float64"):
        quantize(np.ones(3), IntFormat(bits=60))


@pytest.mark.parametrize("block", [2, 5, 16])
@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_matches_onnx_blocked_quantize_linear(block, axis):
    """Independent oracle: QuantizeLinear with block_size (opset 21), as onnxruntime runs it
    (the ONNX reference evaluator when this onnxruntime lacks blocked quantization)."""
    rng = np.random.default_rng(block + 10 * axis)
    x = (rng.normal(size=(16, 16)) * np.exp(rng.normal(size=(16, 1)) * 3)).astype(np.float32)
    x[0, :3] = [0.5, 1.5, -2.5]  # ties: RND_CONV rounds them to even
    fmt = IntFormat(bits=8, block_axis=axis, block_size=block, rounding="RND_CONV", saturation="SAT")
    q = quantize(x.astype(np.float64), fmt)
    scale = np.ldexp(1.0, q.exp).astype(np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=axis, block_size=block)
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.INT8, x.shape)],
        [onnx.numpy_helper.from_array(scale, "s"), onnx.numpy_helper.from_array(np.zeros_like(scale, np.int8), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x})[0]
    except Exception:
        from onnx.reference import ReferenceEvaluator

        y = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(q.data, y)
