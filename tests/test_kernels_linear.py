"""quantize, requantize, align, gemm, add, embedding: reference vs Numba to the bit, independent
oracles (onnxruntime MatMulInteger, ONNX blocked QuantizeLinear) and hand-derived goldens."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from kernels.add import add, add_ref
from kernels.align import align, align_ref
from kernels.embedding import embedding, embedding_ref
from kernels.formats import EXP_ZERO, FormatError, IntFormat, QTensor, Rounding, Saturation, ScaleKind
from kernels.gemm import EXACT_F64, gemm, gemm_ref
from kernels.quantize import block_exponents, quantize, quantize_ref
from kernels.requantize import quantize_multiplier, requantize, requantize_mult, requantize_mult_ref, requantize_ref
from kernels.testing import assert_bit_equal, float_arrays, int_arrays, int_formats, qtensors, shapes

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _same(a: QTensor, b: QTensor) -> None:
    assert_bit_equal(a.data, b.data)
    assert_bit_equal(a.exp, b.exp)
    if a.mant is not None:
        assert_bit_equal(a.mant, b.mant)
    assert a.meta.get("overflow", 0) == b.meta.get("overflow", 0)


# -- quantize ----------------------------------------------------------------------------------
@SETTINGS
@given(st.data(), int_formats(scale=None), shapes())
def test_quantize_twins(data, fmt, shape):
    x = data.draw(float_arrays(shape))
    _same(quantize(x, fmt), quantize_ref(x, fmt))
    # static exponents that force saturation on some blocks
    exp, mant = block_exponents(x, fmt)
    exp = np.where(exp == EXP_ZERO, 0, exp - 2).astype(np.int32)
    _same(quantize(x, fmt, exp, mant), quantize_ref(x, fmt, exp, mant))


def test_quantize_hand_golden():
    # block [0.3, -1.0, 0.7]: amax 1.0, qmax 127: smallest e with 1.0 <= 127*2**e is -6
    # (127/64 = 1.98 >= 1 > 127/128); codes: 0.3*64 = 19.2 -> 19, -64, 0.7*64 = 44.8 -> 45
    q = quantize(np.array([[0.3, -1.0, 0.7]]), IntFormat(bits=8))
    assert q.exp.tolist() == [[-6]] and q.data.tolist() == [[19, -64, 45]]
    # ties at exponent 0: 2.5 -> 2 with RND_CONV, 3 with RND_INF; -2.5 -> -2 / -3
    e = np.zeros((1, 1), np.int32)
    assert quantize(np.array([[2.5, -2.5]]), IntFormat(bits=8), e).data.tolist() == [[2, -2]]
    assert quantize(np.array([[2.5, -2.5]]), IntFormat(bits=8, rounding="RND_INF"), e).data.tolist() == [[3, -3]]
    # an all-zero block gets EXP_ZERO and zeros
    z = quantize(np.zeros((1, 4)), IntFormat(bits=4, block_size=2))
    assert z.exp.tolist() == [[EXP_ZERO, EXP_ZERO]] and not z.data.any()
    with pytest.raises(ValueError, match="non-finite value nan at index"):
        quantize(np.array([1.0, np.nan]), IntFormat())


def test_quantize_mult_scale_is_tight():
    x = np.random.default_rng(1).normal(size=(6, 40))
    fmt = IntFormat(bits=8, block_size=8, scale=ScaleKind.MULT, mant_bits=8)
    q = quantize(x, fmt)
    assert q.meta["overflow"] == 0
    assert np.all((q.mant >= 128) & (q.mant < 256))
    # MULT scales sit within a factor 1+2**-7 of amax/qmax: error <= half a step
    step = q.scale_array()
    assert np.all(np.abs(q.dequantize() - x) <= step / 2 + 1e-15)


@pytest.mark.parametrize("block", [2, 5, 16])
def test_quantize_matches_onnx_blocked_quantize_linear(block):
    """Independent oracle: QuantizeLinear with block_size (opset 21), as onnxruntime runs it."""
    rng = np.random.default_rng(block)
    x = (rng.normal(size=(3, 16)) * 5).astype(np.float32)
    fmt = IntFormat(bits=8, block_axis=1, block_size=block, rounding="RND_CONV", saturation="SAT")
    q = quantize(x.astype(np.float64), fmt)
    scale = np.ldexp(1.0, q.exp).astype(np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=1, block_size=block)
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.INT8, x.shape)],
        [onnx.numpy_helper.from_array(scale, "s"), onnx.numpy_helper.from_array(np.zeros_like(scale, np.int8), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    try:
        y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    except Exception:  # an onnxruntime without blocked QuantizeLinear: the ONNX reference evaluator
        from onnx.reference import ReferenceEvaluator

        y = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(q.data, y)


# -- requantize --------------------------------------------------------------------------------
@SETTINGS
@given(st.data(), int_formats(max_bits=16), shapes(), st.integers(0, 30))
@example(None, IntFormat(bits=8, rounding="RND_CONV"), (1, 3), 0)
def test_requantize_twins(data, fmt, shape, in_bits):
    if data is None:
        return
    x = data.draw(int_arrays(shape, in_bits + 2, signed=fmt.signed))
    e_in = data.draw(st.integers(-20, 20))
    e_in = np.full((shape[0], 1), e_in)
    a, b = requantize(x, e_in, fmt), requantize_ref(x, e_in, fmt)
    _same(a, b)
    exp_out = data.draw(int_arrays(a.exp.shape, 6))
    _same(requantize(x, e_in, fmt, exp_out), requantize_ref(x, e_in, fmt, exp_out))


def test_requantize_dynamic_hand_golden():
    # block [300, -5, 0] at e_in = -10, to s8: bitlen(300) = 9, s = 9 - 7 = 2: 300/4 = 75,
    # -5/4 = -1.25 -> -1; exponent -10 + 2 = -8. Block [1, 0, 0]: s = 1 - 7 = -6, code 64 at -16.
    q = requantize(np.array([[300, -5, 0, 1, 0, 0]]), np.array([[-10]]), IntFormat(bits=8, block_size=3))
    assert q.data.tolist() == [[75, -1, 0, 64, 0, 0]] and q.exp.tolist() == [[-8, -16]]
    # 255 needs s = 1 by bit length, but 255/2 = 127.5 -> 128 (RND_CONV) overflows: s becomes 2
    q = requantize(np.array([[255]]), np.array([[0]]), IntFormat(bits=8))
    assert q.data.tolist() == [[64]] and q.exp.tolist() == [[2]] and q.meta["overflow"] == 0


def test_requantize_mult_twins_and_multiplier():
    rng = np.random.default_rng(0)
    x = rng.integers(-(1 << 30), 1 << 30, (7, 9))
    m, s = quantize_multiplier(32**-0.5)
    assert abs(m * 2.0**-s - 32**-0.5) < 2**-15 * 32**-0.5 and 1 << 14 <= m < 1 << 15
    shift = rng.integers(-3, 40, (7, 1))
    for mode in Rounding:
        for sat in Saturation:
            a = requantize_mult(x, m, shift, 16, True, mode, sat)
            b = requantize_mult_ref(x, m, shift, 16, True, mode, sat)
            assert_bit_equal(a[0], b[0])
            assert a[1] == b[1]
    with pytest.raises(ValueError, match="must stay below 2\\*\\*62"):
        requantize_mult(np.array([1 << 50]), 1 << 20, 0, 16)


# -- align -------------------------------------------------------------------------------------
@SETTINGS
@given(st.data(), int_formats(max_bits=12, scale=None), shapes(), st.integers(0, 12), st.sampled_from([(-1,), (0, 1)]))
def test_align_twins(data, fmt, shape, guard, axes):
    q = data.draw(qtensors(fmt, shape, exp_range=(-40, 30)))
    mode = data.draw(st.sampled_from(list(Rounding)))
    a, ea = align(q, axes, guard, mode)
    b, eb = align_ref(q, axes, guard, mode)
    assert_bit_equal(a, b)
    assert_bit_equal(ea, eb)


def test_align_hand_golden():
    # blocks [3, -3] at exponent 0 and [5, 1] at -2, guard 1: e_ref = 0 - 1 = -1
    # block 0 shifts left by 1: 6, -6; block 1 shifts right by 1: 2.5 -> 2 (RND_CONV), 0.5 -> 0
    q = QTensor(np.array([[3, -3, 5, 1]], np.int8), IntFormat(block_size=2), np.array([[0, -2]], np.int32))
    wide, e = align(q, (-1,), 1, Rounding.RND_CONV)
    assert wide.tolist() == [[6, -6, 2, 0]] and e.tolist() == [[-1]]


# -- gemm --------------------------------------------------------------------------------------
@SETTINGS
@given(
    st.data(),
    st.integers(1, 5),
    st.integers(1, 9),
    st.integers(1, 6),
    st.integers(4, 31),
    st.sampled_from(list(Saturation)),
    st.integers(10, 62),
    st.booleans(),
)
def test_gemm_twins(data, m, k, n, bits, sat, acc_bits, with_bias):
    a = data.draw(int_arrays((2, m, k), bits))
    b = data.draw(int_arrays((k, n), bits))
    ea = data.draw(int_arrays((2, m, 1), 5))
    bias = data.draw(int_arrays((n,), 24)) if with_bias else None
    mode = data.draw(st.sampled_from(list(Rounding)))
    got = gemm(a, ea, b, np.array(3), acc_bits, sat, bias, -7, mode)
    want = gemm_ref(a, ea, b, np.array(3), acc_bits, sat, bias, -7, mode)
    assert_bit_equal(got[0], want[0])
    assert_bit_equal(got[1], want[1])
    assert got[2] == want[2]


def test_gemm_exactness_bound_both_sides():
    # max|a| * max|b| * K just below 2**53 uses float64 BLAS; at 2**53 the int64 loop. Both exact.
    k = 8
    amax = 1 << 25
    bmax_fast = (EXACT_F64 - 1) // (amax * k)
    for bmax in (bmax_fast, bmax_fast + 1):
        a = np.full((1, 2, k), amax, np.int64)
        a[0, 1] = -amax
        b = np.full((k, 3), bmax, np.int64)
        b[::2, 1] = -bmax + 1
        got, _, n = gemm(a, np.zeros((1, 2, 1), np.int64), b, np.array(0), acc_bits=62)
        want = a.astype(object) @ b.astype(object)
        assert got.tolist() == want.tolist() and n == 0


def test_gemm_overflow_counts_saturated_outputs():
    a = np.array([[100, 100], [1, 1]])
    b = np.array([[100], [100]])
    # 20000 does not fit 12-bit signed (max 2047): saturates, counted once; row 2 (200) fits
    acc, _, n = gemm(a, np.zeros((2, 1), np.int64), b, np.array(0), acc_bits=12)
    assert acc.tolist() == [[2047], [200]] and n == 1
    acc, _, n = gemm(a, np.zeros((2, 1), np.int64), b, np.array(0), acc_bits=12, acc_saturation=Saturation.WRAP)
    assert acc.tolist() == [[20000 - 5 * 4096], [200]] and n == 1


@pytest.mark.parametrize("signed", [True, False])
def test_gemm_matches_onnxruntime_matmulinteger(signed):
    """Independent oracle: onnxruntime's MatMulInteger (int8/uint8 x int8 -> int32), exact."""
    rng = np.random.default_rng(3)
    dt, tp = (np.int8, TensorProto.INT8) if signed else (np.uint8, TensorProto.UINT8)
    a = rng.integers(np.iinfo(dt).min, np.iinfo(dt).max + 1, (4, 64, 384)).astype(dt)
    b = rng.integers(-128, 128, (384, 96)).astype(np.int8)
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    graph = helper.make_graph(
        [node],
        "mmi",
        [
            helper.make_tensor_value_info("a", tp, a.shape),
            helper.make_tensor_value_info("b", TensorProto.INT8, b.shape),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, (4, 64, 96))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"a": a, "b": b})[0]
    got, _, n = gemm(a.astype(np.int64), np.zeros((4, 64, 1), np.int64), b.astype(np.int64), np.array(0), 32)
    np.testing.assert_array_equal(got, want)
    assert n == 0


# -- add ---------------------------------------------------------------------------------------
@SETTINGS
@given(st.data(), int_formats(max_bits=10), int_formats(max_bits=16), shapes())
def test_add_twins(data, fa, fo, shape):
    fa = IntFormat(bits=fa.bits, block_size=fa.block_size)
    fb = IntFormat(bits=8, block_size=data.draw(st.integers(0, 6)))
    a = data.draw(qtensors(fa, shape, exp_range=(-50, 5)))
    b = data.draw(qtensors(fb, shape, exp_range=(-50, 5)))
    fo = IntFormat(bits=fo.bits, block_size=fo.block_size, rounding=fo.rounding, saturation=fo.saturation)
    _same(add(a, b, fo), add_ref(a, b, fo))


def test_add_hand_golden():
    # 3 * 2**-2 + 5 * 2**-4 = 0.75 + 0.3125 = 1.0625: exact sum 17 at 2**-4; to s8 dynamic:
    # bitlen(17) = 5 <= 7, so s = -2: code 68 at 2**-6 (1.0625 exactly)
    a = QTensor(np.array([[3]], np.int8), IntFormat(), np.array([[-2]], np.int32))
    b = QTensor(np.array([[5]], np.int8), IntFormat(), np.array([[-4]], np.int32))
    s = add(a, b, IntFormat(bits=8))
    assert s.data.tolist() == [[68]] and s.exp.tolist() == [[-6]] and s.dequantize().item() == 1.0625
    with pytest.raises(FormatError, match="shapes differ"):
        add(a, QTensor(np.zeros((1, 2), np.int8), IntFormat(), np.zeros((1, 1), np.int32)), IntFormat())


# -- embedding ---------------------------------------------------------------------------------
@SETTINGS
@given(st.data(), int_formats(max_bits=8, scale=None), st.integers(1, 12), st.integers(1, 20))
def test_embedding_twins(data, fmt, v, h):
    table = data.draw(qtensors(fmt, (v, h)))
    ids = data.draw(int_arrays((2, 3), 8, signed=False, edges=False)) % v
    a, b = embedding(table, ids), embedding_ref(table, ids)
    assert_bit_equal(a.data, b.data)
    assert_bit_equal(a.exp, b.exp)
    assert a.shape == (2, 3, h)


def test_embedding_rejects_out_of_range_ids():
    table = quantize(np.ones((5, 4)), IntFormat(block_size=2))
    with pytest.raises(ValueError, match=r"id 5 at position \(1,\) is outside the table's 0..4"):
        embedding(table, np.array([0, 5]))
    with pytest.raises(ValueError, match="id -1"):
        embedding(table, np.array([-1]))


@pytest.mark.parametrize(
    "fn,args",
    [
        (requantize, (np.zeros(3), np.zeros(1, np.int64), IntFormat())),
        (gemm, (np.zeros((2, 2)), np.zeros((2, 1), np.int64), np.zeros((2, 2), np.int64), np.array(0))),
    ],
)
def test_kernels_reject_float_arrays(fn, args):
    with pytest.raises(TypeError, match="integer array expected"):
        fn(*args)
