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

from bbct.kernels.formats import EXP_MIN, EXP_ZERO, FormatError, IntFormat, Rounding, Saturation, ScaleKind
from bbct.kernels.quantize import block_exponents, quantize, quantize_ref
from bbct.kernels.testing import assert_qtensor_equal, float_arrays, int_formats, rounding_modes, shapes_and_blocks

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
    from bbct.kernels.blocks import rows_view

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
            if e == EXP_ZERO:  # flushed: its scale would be below EXP_MIN, and codes are 0
                top = fmt.qmax * (2 * lo if mr is not None else 1)
                assert amax < math.ldexp(top, EXP_MIN)
                assert not rows_view(q.data, axis)[0][r, b * bs : (b + 1) * bs].any()
                continue
            if mr is None:  # smallest e with amax <= qmax * 2**e
                assert amax <= math.ldexp(fmt.qmax, e) and amax > math.ldexp(fmt.qmax, e - 1)
            else:
                m = int(mr[r, b])
                prev = math.ldexp(fmt.qmax * (m - 1), e) if m > lo else math.ldexp(fmt.qmax * (2 * lo - 1), e - 1)
                assert lo <= m < 2 * lo and amax <= math.ldexp(fmt.qmax * m, e) and amax > prev


@pytest.mark.parametrize("scale", [ScaleKind.POW2, ScaleKind.MULT])
def test_blocks_below_the_exponent_floor_flush_to_zero(scale):
    """A block's scale never goes below 2**EXP_MIN, so it cannot collide with EXP_ZERO:
    subnormal and near-subnormal blocks become zero blocks; one step above the floor stays."""
    fmt = IntFormat(8, True, block_axis=-1, block_size=2, scale=scale)
    # the smallest block that keeps a real exponent: scale exactly 2**EXP_MIN (POW2) or
    # mant * 2**EXP_MIN with mant = 2**(mant_bits-1) (MULT)
    lo = 1 << (fmt.mant_bits - 1) if scale == ScaleKind.MULT else 1
    keep = math.ldexp(fmt.qmax * lo, EXP_MIN)
    x = np.array([[5e-324, -5e-324, 1e-300, 0.0, keep, -keep / 2, keep / 2.5, 0.0]])
    for q in (quantize(x, fmt), quantize_ref(x, fmt)):
        assert q.exp.tolist() == [[EXP_ZERO, EXP_ZERO, EXP_MIN, EXP_ZERO]]
        assert q.data[0, :4].tolist() == [0, 0, 0, 0] and q.data[0, 6:].tolist() == [0, 0]
        assert q.data[0, 4:6].tolist() == [127, -64] and q.meta["overflow"] == 0
    assert_qtensor_equal(quantize(x, fmt), quantize_ref(x, fmt))


@settings(max_examples=60, deadline=None)
@given(rounding_modes(), st.sampled_from(list(Saturation)), st.integers(-8, 8))
@example(Rounding.RND_CONV, Saturation.SAT, 0)
def test_every_midpoint_rounds_per_the_table(mode, sat, e):
    """k + 0.5 at exponent e for k in -9..8: the float path rounds like the integer shift."""
    from bbct.kernels.formats import shift_round_ref

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
    x[np.abs(x) < 2.0**-900] = 0.0  # below EXP_MIN blocks flush to zero (tested above)
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


@SETTINGS
@given(st.data(), st.integers(2, 8), shapes_and_blocks(), st.integers(0, 3))
def test_mse_exponents_pick_the_least_squared_error_per_block(data, bits, sb, search):
    """Brute force per block: among the max-based exponent e and e-1 .. e-search, the pick
    has the least squared error of round-to-nearest-even codes clipped to the format (ties
    keep the larger exponent); all-zero blocks keep EXP_ZERO; search=0 is block_exponents."""
    from bbct.kernels.blocks import rows_view
    from bbct.kernels.quantize import mse_exponents

    shape, axis, block = sb
    fmt = IntFormat(bits, True, block_axis=axis, block_size=block, scale=ScaleKind.POW2)
    x = data.draw(float_arrays(shape, max_abs=1e3))
    x[np.abs(x) < 2.0**-900] = 0.0
    best = mse_exponents(x, fmt, search)
    base, _ = block_exponents(x, fmt)
    if search == 0:
        np.testing.assert_array_equal(best, base)
    rows = rows_view(x, axis)[0]
    bs = rows.shape[1] if block == 0 or block >= rows.shape[1] else block
    er, br = rows_view(base, axis)[0], rows_view(best, axis)[0]
    for r in range(rows.shape[0]):
        for b in range(er.shape[1]):
            v = rows[r, b * bs : (b + 1) * bs]
            e0 = int(er[r, b])
            if e0 == EXP_ZERO:
                assert br[r, b] == EXP_ZERO
                continue

            def sse(e: int, v: np.ndarray = v) -> float:
                q = np.clip(np.rint(np.ldexp(v, -e)), fmt.qmin, fmt.qmax)
                return float(((np.ldexp(q, e) - v) ** 2).sum())

            errs = [sse(e0 - k) for k in range(search + 1)]
            k_best = min(range(search + 1), key=lambda k: (errs[k], k))  # first minimum: larger e
            assert br[r, b] == e0 - k_best


def test_mse_exponents_clip_an_outlier_when_it_pays():
    """A lone large value among many small ones: clipping it (one exponent lower) halves
    the step for the other 127 values and wins; a flat block keeps the max-based exponent.

    Block of 128, 4-bit (qmax 7), values uniform in [-1, 1] and one 4.0, so e = 0 (4 <= 7).
    Expected squared error: e = 0 (step 1) ~127/12 = 10.6; e = -1 (step 1/2, 4.0 clips to 3.5)
    ~127/48 + 0.25 = 2.9; e = -2 (step 1/4, clips to 1.75, and the tails of [-1, 1] too) > 5.
    """
    from bbct.kernels.quantize import mse_exponents

    fmt = IntFormat(4, True, block_axis=-1, block_size=128, scale=ScaleKind.POW2)
    rng = np.random.default_rng(0)
    spiky = rng.uniform(-1, 1, 128)
    spiky[5] = 4.0
    flat = np.full(128, 7.0)
    x = np.stack([spiky, flat])
    base, _ = block_exponents(x, fmt)
    assert base.ravel().tolist() == [0, 0]
    assert mse_exponents(x, fmt, 2).ravel().tolist() == [-1, 0]


def _correlated(rng, n: int, k: int) -> np.ndarray:
    return rng.normal(size=(n, k)) @ rng.normal(size=(k, k)) * 0.1


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_a_diagonal_hessian_is_plain_rounding(act_order):
    """No cross terms, nothing to feed forward: GPTQ codes and exponents are quantize's, for
    max-based and least-MSE exponents alike (a short last block included), in either order."""
    from bbct.kernels.quantize import gptq, mse_exponents

    rng = np.random.default_rng(1)
    w = rng.normal(size=(300, 24)) * 0.05
    fmt = IntFormat(4, True, block_axis=0, block_size=128, scale=ScaleKind.POW2)
    h = np.diag(rng.uniform(0.5, 2.0, 300))
    assert_qtensor_equal(gptq(w, fmt, h, act_order=act_order), quantize(w, fmt))
    want = quantize(w, fmt, mse_exponents(w, fmt, 2))
    assert_qtensor_equal(gptq(w, fmt, h, search=2, act_order=act_order), want)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_on_correlated_inputs(act_order):
    """Second oracle, in float: for inputs X whose second moments built the hessian, and for
    held-out inputs from the same distribution, ||X (w - deq)||^2 is well below rounding to
    nearest with the same exponent rule (measured: about half)."""
    from bbct.kernels.quantize import gptq, mse_exponents

    rng = np.random.default_rng(0)
    k, n = 256, 64
    w = rng.normal(size=(k, n)) * 0.05
    mix = rng.normal(size=(k, k))
    x, held = (rng.normal(size=(m, k)) @ mix * 0.1 for m in (4000, 1000))
    fmt = IntFormat(4, True, block_axis=0, block_size=64, scale=ScaleKind.POW2)
    q = gptq(w, fmt, x.T @ x, search=2, act_order=act_order)
    rtn = quantize(w, fmt, mse_exponents(w, fmt, 2))
    assert q.data.dtype == fmt.dtype and q.data.min() >= fmt.qmin and q.data.max() <= fmt.qmax
    for data in (x, held):
        e_gptq = np.sum((data @ (w - q.dequantize())) ** 2)
        e_rtn = np.sum((data @ (w - rtn.dequantize())) ** 2)
        assert e_gptq < 0.7 * e_rtn


def test_gptq_dead_inputs_and_bad_arguments():
    from bbct.kernels.quantize import gptq

    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 3))
    fmt = IntFormat(4, True, block_axis=0, block_size=4, scale=ScaleKind.POW2)
    x = rng.normal(size=(50, 8))
    x[:, 5] = 0.0  # input 5 never active: its weights do not matter and become 0
    q = gptq(w, fmt, x.T @ x)
    assert not q.data[5].any()
    with pytest.raises(FormatError, match=r"hessian must be a finite \(8, 8\)"):
        gptq(w, fmt, np.eye(7))
    with pytest.raises(FormatError, match="POW2 blocks along axis 0"):
        gptq(w, IntFormat(4, True, block_axis=1, block_size=4, scale=ScaleKind.POW2), np.eye(8))


def test_exponent_window_raises_only_the_smallest_exponents():
    from bbct.kernels.quantize import exponent_window

    e = np.array([[3, -20, EXP_ZERO, -12, 0, -13]], np.int32)
    # 4 bits: 16 values, window [3 - 15, 3] = [-12, 3]
    assert exponent_window(e, 4).tolist() == [[3, -12, EXP_ZERO, -12, 0, -12]]
    assert exponent_window(e, 8).tolist() == e.tolist()
    assert exponent_window(np.full((2, 2), EXP_ZERO, np.int32), 1).tolist() == [[EXP_ZERO] * 2] * 2
    # raising an exponent never clips: quantizing with the window saturates nothing
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 64)) * np.exp2(rng.integers(-20, 4, size=(8, 1)))
    fmt = IntFormat(4, True, block_axis=0, block_size=2, scale=ScaleKind.POW2)
    q = quantize(w, fmt, exponent_window(block_exponents(w, fmt)[0], 2))
    assert q.meta["overflow"] == 0 and np.ptp(q.exp[q.exp != EXP_ZERO]) <= 3


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_exponents_in_their_storage_window(act_order):
    from bbct.kernels.quantize import gptq

    rng = np.random.default_rng(4)
    w = rng.normal(size=(64, 16)) * np.exp2(rng.integers(-12, 2, size=(64, 1)))
    fmt = IntFormat(4, True, block_axis=0, block_size=8, scale=ScaleKind.POW2)
    x = rng.normal(size=(500, 64))
    top = int(block_exponents(w, fmt)[0].max())
    q = gptq(w, fmt, x.T @ x, search=1, act_order=act_order, exp_bits=2)
    real = q.exp[q.exp != EXP_ZERO]
    assert real.min() >= top - 3 and real.max() <= top
