"""align and gemm: reference vs Numba to the bit (fast BLAS path, partial recompute and the
sequential loop), the float exactness bounds tested at the bound, overflow events, and
onnxruntime MatMulInteger as an independent oracle."""

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bbct.kernels.align import align, align_ref
from bbct.kernels.formats import EXP_ZERO, IntFormat, QTensor, Rounding, Saturation
from bbct.kernels.gemm import EXACT_F32, EXACT_F64, gemm, gemm_ref
from bbct.kernels.testing import assert_bit_equal, int_arrays, int_formats, qtensors, rounding_modes, shapes

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- align -------------------------------------------------------------------------------------
@SETTINGS
@given(st.data(), int_formats(max_bits=12, scale=None), shapes(), st.integers(0, 12), st.sampled_from([(-1,), (0, 1)]))
def test_align_twins(data, fmt, shape, guard, axes):
    q = data.draw(qtensors(fmt, shape, exp_range=(-90, 30)))
    mode = data.draw(rounding_modes())
    a, ea = align(q, axes, guard, mode)
    b, eb = align_ref(q, axes, guard, mode)
    assert_bit_equal(a, b)
    assert_bit_equal(ea, eb)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([8, 16]), st.sampled_from([0, 5, 32]), st.integers(0, 12))
def test_align_trailing_groups_twins(data, bits, block, guard):
    """3-D tensors in blocks of up to 32 along rows of 70: groups of one row, of every row of
    a leading index (reduce (1, 2)), the whole tensor, and a non-trailing set (generic path)."""
    q = data.draw(qtensors(IntFormat(bits=bits, block_size=block), (3, 4, 70), exp_range=(-60, 20)))
    mode = data.draw(rounding_modes())
    for axes in ((-1,), (1, 2), (0, 1, 2), (0, 2)):
        a, ea = align(q, axes, guard, mode)
        b, eb = align_ref(q, axes, guard, mode)
        assert_bit_equal(a, b)
        assert_bit_equal(ea, eb)
        assert ea.shape == eb.shape


def test_align_hand_golden():
    # blocks [3, -3] at exponent 0, [5, 1] at -2, and an all-zero block; guard 1: e_ref = -1
    # block 0 shifts left by 1: 6, -6; block 1 right by 1: 2.5 -> 2 (RND_CONV), 0.5 -> 0
    q = QTensor(np.array([[3, -3, 5, 1, 0]], np.int8), IntFormat(block_size=2), np.array([[0, -2, EXP_ZERO]], np.int32))
    wide, e = align(q, (-1,), 1, Rounding.RND_CONV)
    assert wide.tolist() == [[6, -6, 2, 0, 0]] and e.tolist() == [[-1]]
    wide, _ = align(q, (-1,), 1, Rounding.RND_INF)  # 2.5 -> 3, 0.5 -> 1
    assert wide.tolist() == [[6, -6, 3, 1, 0]]
    # an all-zero group keeps EXP_ZERO - guard and zeros
    z = QTensor(np.zeros((1, 2), np.int8), IntFormat(), np.array([[EXP_ZERO]], np.int32))
    assert align(z, (-1,), 2, Rounding.TRN)[1].tolist() == [[EXP_ZERO - 2]]
    with pytest.raises(ValueError, match="guard=31"):
        align(q, (-1,), 31, Rounding.TRN)


# -- gemm --------------------------------------------------------------------------------------
def _same(got, want):
    assert_bit_equal(got[0], want[0])
    assert_bit_equal(got[1], want[1])
    assert got[2] == want[2], (got[2], want[2])


@SETTINGS
@given(
    st.data(),
    st.integers(1, 5),
    st.integers(1, 12),
    st.integers(1, 6),
    st.integers(2, 31),
    st.sampled_from(list(Saturation)),
    st.integers(2, 62),
    st.booleans(),
    st.booleans(),
)
@example(None, 1, 1, 1, 2, Saturation.SAT, 2, False, False)
def test_gemm_twins(data, m, k, n, bits, sat, acc_bits, with_bias, batched_b):
    if data is None:
        return
    a = data.draw(int_arrays((2, m, k), bits))
    b = data.draw(int_arrays((2, k, n) if batched_b else (k, n), bits))
    ea = data.draw(int_arrays((2, m, 1), 5))
    bias = data.draw(int_arrays((n,), 24)) if with_bias else None
    mode = data.draw(rounding_modes())
    args = (a, ea, b, np.array(3), acc_bits, sat, bias, -7, mode)
    _same(gemm(*args), gemm_ref(*args))


@pytest.mark.parametrize("items, threads", [(7, 3), (2, 4), (1, 2), (12, 2)])
@pytest.mark.parametrize("shared", ["none", "a", "b"])
def test_gemm_stacked_items_over_threads(monkeypatch, items, threads, shared):
    """Long-sequence attention: the items of a stacked product split over threads, each on one
    BLAS thread (any item count against any thread count, operands broadcast on either side),
    give the reference's every output and event."""
    import bbct.kernels.gemm as G

    monkeypatch.setattr(G, "_BLAS_THREADED_ITEM_MACS", 1)
    monkeypatch.setattr(G, "_blas_threads", lambda: threads)
    rng = np.random.default_rng(items * 10 + threads)
    a = rng.integers(-(2**19), 2**19, (1 if shared == "a" else items, 5, 33))
    b = rng.integers(-(2**11), 2**11, (1 if shared == "b" else items, 33, 6))
    ea = rng.integers(-3, 3, (a.shape[0], 5, 1))
    for acc_bits in (62, 24):  # exact sums; some outputs recomputed with their events
        args = (a, ea, b, np.array(2), acc_bits, Saturation.SAT)
        _same(gemm(*args), gemm_ref(*args))


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(4, 20), st.sampled_from(list(Saturation)))
def test_gemm_partial_recompute(data, acc_bits, sat):
    """Rows of very different magnitude: some outputs provably fit, others overflow and are
    recomputed by the sequential loop; every output and the event count match the reference."""
    a = data.draw(int_arrays((6, 16), 8))
    a[::2] >>= 6  # small rows: fit; large rows: overflow at small acc_bits
    b = data.draw(int_arrays((16, 5), 8))
    args = (a, np.zeros((6, 1), np.int64), b, np.array(0), acc_bits, sat)
    _same(gemm(*args), gemm_ref(*args))


@pytest.mark.parametrize("limit", [EXACT_F32, EXACT_F64])
@pytest.mark.parametrize("over", [-1, 0, 1])
def test_gemm_at_the_float_exactness_bounds(limit, over):
    """max|a| * max|b| * K at the float32 / float64 bound - 1, at it, + 1 (then the next
    path): alternating signs make the BLAS partial sums as large as the bound allows."""
    k = 8
    amax = 1 << 10 if limit == EXACT_F32 else 1 << 25
    bmax = limit // (amax * k) + (over if over <= 0 else 0)
    amax_ = amax + (1 if over > 0 else 0)
    a = np.full((1, 3, k), amax_, np.int64)
    a[0, 1] = -amax_
    a[0, 2, ::2] = -amax_
    b = np.full((k, 3), bmax, np.int64)
    b[::2, 1] = -bmax + 1
    b[1::3, 2] = bmax - 1
    got = gemm(a, np.zeros((1, 3, 1), np.int64), b, np.array(0), acc_bits=62)
    want = a.astype(object) @ b.astype(object)
    assert got[0].tolist() == want.tolist() and got[2] == 0
    _same(got, gemm_ref(a, np.zeros((1, 3, 1), np.int64), b, np.array(0), acc_bits=62))
    # a 2**53 + 1 result the float64 path could not hold: the integer loop gets it exactly
    if limit == EXACT_F64 and over > 0:
        big = gemm(np.array([[1 << 30, 1]]), np.zeros((1, 1), np.int64), np.array([[1 << 23], [1]]), np.array(0), 62)
        assert big[0].tolist() == [[(1 << 53) + 1]]


def test_gemm_overflow_events_hand_golden():
    # row [100, 100] . [100, 100]: acc 10000 after k=0 already exceeds s12 (max 2047): clips to
    # 2047 (event 1), then 2047 + 10000 clips again (event 2). Row [1, 1]: 200, no event.
    a = np.array([[100, 100], [1, 1]])
    b = np.array([[100], [100]])
    z = np.zeros((2, 1), np.int64)
    acc, e, n = gemm(a, z, b, np.array(0), acc_bits=12)
    assert acc.tolist() == [[2047], [200]] and n == 2 and e.tolist() == [[0], [0]]
    # WRAP: 10000 wraps to 10000 - 2*4096 = 1808 (event), 1808 + 10000 = 11808 wraps to
    # 11808 - 3*4096 = -480 (event); the same as wrapping 20000 once, but two events
    acc, _, n = gemm(a, z, b, np.array(0), acc_bits=12, acc_saturation=Saturation.WRAP)
    assert acc.tolist() == [[-480], [200]] and n == 2
    # SAT clips at each step, so the order matters: [100, -100] . [100, 100] = 0 exactly, but
    # 2047 - 10000 clips to -2048: the sequential accumulator is not the clipped exact sum
    acc, _, n = gemm(np.array([[100, -100]]), np.zeros((1, 1), np.int64), b, np.array(0), acc_bits=12)
    assert acc.tolist() == [[-2048]] and n == 2


def test_gemm_bias_hand_golden():
    # acc = 2*3 = 6 at e_acc = ea + eb = -2 + -3 = -5; bias 5 at e_bias -6 is 2.5 at -5:
    # RND_CONV -> 2, RND -> 3; result 8 / 9
    a, ea, b, eb = np.array([[2]]), np.array([[-2]]), np.array([[3]]), np.array(-3)
    assert gemm(a, ea, b, eb, bias=np.array([5]), e_bias=-6)[0].tolist() == [[8]]
    assert gemm(a, ea, b, eb, bias=np.array([5]), e_bias=-6, bias_rounding=Rounding.RND)[0].tolist() == [[9]]
    # bias 5 at e_bias -3 is shifted left by 2 (20), exact: 26; a bias at -1000 rounds to 0
    assert gemm(a, ea, b, eb, bias=np.array([5]), e_bias=-3)[0].tolist() == [[26]]
    assert gemm(a, ea, b, eb, bias=np.array([5]), e_bias=-1000)[0].tolist() == [[6]]
    with pytest.raises(ValueError, match="needs more than 61 bits"):
        gemm(a, ea, b, eb, bias=np.array([5]), e_bias=60)


@pytest.mark.parametrize("signed", [True, False])
def test_gemm_matches_onnxruntime_matmulinteger(signed):
    """Independent oracle: onnxruntime's MatMulInteger (int8/uint8 x int8 -> int32), exact."""
    rng = np.random.default_rng(3)
    dt, tp = (np.int8, TensorProto.INT8) if signed else (np.uint8, TensorProto.UINT8)
    # onnxruntime's u8 x s8 kernel on AVX2 CPUs sums pairs of products in saturating int16
    # (vpmaddubsw): 255 * -128 * 2 overflows, so its result is exact only for a <= 127
    # (127 * 128 * 2 = 32512 fits). Unsigned operands stay in 0..127; the full range is
    # checked against exact int64 arithmetic below.
    hi = np.iinfo(dt).max + 1 if signed else 128
    a = rng.integers(np.iinfo(dt).min, hi, (4, 64, 384)).astype(dt)
    a[0, 0] = np.iinfo(dt).min if signed else 127  # the row with the largest products
    b = rng.integers(-128, 128, (384, 96)).astype(np.int8)
    b[:, 0] = -128
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
    full = rng.integers(np.iinfo(dt).min, np.iinfo(dt).max + 1, a.shape).astype(dt)
    got, _, n = gemm(full.astype(np.int64), np.zeros((4, 64, 1), np.int64), b.astype(np.int64), np.array(0), 32)
    np.testing.assert_array_equal(got, full.astype(np.int64) @ b.astype(np.int64))


def test_gemm_errors():
    z = np.zeros((2, 1), np.int64)
    with pytest.raises(TypeError, match="integer array expected"):
        gemm(np.zeros((2, 2)), z, np.zeros((2, 2), np.int64), np.array(0))
    with pytest.raises(ValueError, match="do not multiply"):
        gemm(np.zeros((2, 3), np.int64), z, np.zeros((2, 2), np.int64), np.array(0))
    with pytest.raises(ValueError, match="acc_bits=63"):
        gemm(np.zeros((2, 2), np.int64), z, np.zeros((2, 2), np.int64), np.array(0), 63)
    with pytest.raises(ValueError, match="must stay below 2\\*\\*62"):
        gemm(np.full((1, 1), 1 << 40), np.zeros((1, 1), np.int64), np.full((1, 1), 1 << 30), np.array(0), 62)


def test_gemm_big_endian_and_0d_operands():
    """Operands in big-endian byte order (as read from a file) give the native result; a 0-d
    operand is refused with the shape error, not a compiler error."""
    a = np.arange(6).reshape(2, 3)
    b = np.arange(12).reshape(3, 4) - 5
    z = np.zeros((2, 1), np.int64)
    _same(gemm(a.astype(">i4"), z, b.astype(">i2"), np.array(0)), gemm(a, z, b, np.array(0)))
    _same(gemm_ref(a.astype(">i4"), z, b.astype(">i2"), np.array(0)), gemm(a, z, b, np.array(0)))
    with pytest.raises(ValueError, match="do not multiply"):
        gemm(np.array(3), np.zeros((1, 1), np.int64), b, np.array(0))


@pytest.mark.parametrize("m, k, n", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0)])
def test_gemm_empty_operands(m, k, n):
    """Zero rows, zero reduction length or zero columns: the reference's result (an empty
    product, or the aligned bias alone for K = 0)."""
    a, b = np.ones((1, m, k), np.int64), np.ones((k, n), np.int64)
    bias = np.arange(n, dtype=np.int64) * 5
    args = (a, np.zeros((1, m, 1), np.int64), b, np.array(0), 20, Saturation.SAT, bias, -1)
    _same(gemm(*args), gemm_ref(*args))
