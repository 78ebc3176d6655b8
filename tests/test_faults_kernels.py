"""Reported faults of gemm and of the narrow-accumulator simulation, each with the test that
failed before its fix: operands and exponents outside what the kernel proves exact are
refused (not wrapped), an all-zero row with a bias, an aligned bias beyond the int64
datapath, narrow accumulators on the tiny model, and the accumulator-width warnings of
lowering."""

import re

import numpy as np
import pytest
from bert_exports import tiny_inputs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bbct.kernels.formats import EXP_ZERO, Rounding, Saturation
from bbct.kernels.gemm import gemm, gemm_ref
from bbct.kernels.testing import assert_bit_equal, int_arrays, rounding_modes
from bbct.simulator import ir
from bbct.simulator.config import load_config
from bbct.simulator.execute import run
from bbct.simulator.frontend.onnx_in import load_graph
from bbct.simulator.lower import lower

TWINS = pytest.mark.parametrize("fn", [gemm, gemm_ref], ids=["gemm", "gemm_ref"])
I64_MIN = np.iinfo(np.int64).min


def _same(got, want):
    assert_bit_equal(got[0], want[0])
    assert_bit_equal(got[1], want[1])
    assert got[2] == want[2], (got[2], want[2])


def _z(m=1):
    return np.zeros((m, 1), np.int64)


# -- 1. operands beyond |x| < 2**62 ---------------------------------------------------------------
@TWINS
@pytest.mark.parametrize(
    "arg, a, b, where",
    [
        # int64 min: np.abs(-2**63) is -2**63, so the product bound passed and the result wrapped
        ("a", np.array([[1, I64_MIN]]), np.array([[1], [1]]), "a[0, 1] = -9223372036854775808"),
        ("b", np.array([[1, 1]]), np.array([[0], [I64_MIN]]), "b[1, 0] = -9223372036854775808"),
        # uint64 above int64 max: the cast to int64 made it -2**63
        ("a", np.array([[2, 1 << 63]], np.uint64), np.array([[1], [1]]), "a[0, 1] = 9223372036854775808"),
        # 2**62 itself: the first value outside the proof's int64 datapath
        ("b", np.array([[0, 0]]), np.array([[1 << 62], [0]]), "b[0, 0] = 4611686018427387904"),
        ("a", np.array([[0, -(1 << 62)]]), np.array([[0], [0]]), "a[0, 1] = -4611686018427387904"),
    ],
)
def test_operands_beyond_2_62_are_refused(fn, arg, a, b, where):
    with pytest.raises(ValueError, match=re.escape(f"gemm: {where}")):
        fn(a, _z(), b, np.array(0), acc_bits=62)


@TWINS
def test_bias_beyond_2_62_is_refused(fn):
    with pytest.raises(ValueError, match=re.escape("gemm: bias[1] = -9223372036854775808")):
        fn(np.array([[1]]), _z(), np.array([[1, 1]]), np.array(0), bias=np.array([0, I64_MIN]))


@TWINS
def test_operands_just_inside_2_62_run_and_saturate(fn):
    # 2**62 - 1 times 1 is inside the proof; the 62-bit accumulator (max 2**61 - 1) clips it: one event
    acc, _, n = fn(np.array([[(1 << 62) - 1]]), _z(), np.array([[1]]), np.array(0), acc_bits=62)
    assert acc.tolist() == [[(1 << 61) - 1]] and n == 1
    acc, _, n = fn(np.array([[-(1 << 62) + 1]], np.int64), _z(), np.array([[1]]), np.array(0), acc_bits=62)
    assert acc.tolist() == [[-(1 << 61)]] and n == 1


# -- 2. exponents beyond int32 --------------------------------------------------------------------
@TWINS
@pytest.mark.parametrize(
    "kw, where",
    [
        ({"ea": np.array([[1 << 31]], np.int64)}, "ea[0, 0] = 2147483648"),
        ({"ea": np.array([[0], [-(1 << 31) - 1]], np.int64)}, "ea[1, 0] = -2147483649"),
        ({"eb": np.array(1 << 40, np.int64)}, "eb = 1099511627776"),
        ({"eb": np.array([[(1 << 32) + 5]], np.uint64)}, "eb[0, 0] = 4294967301"),
        # each in int32, their sum not: it wrapped to a large negative exponent
        ({"ea": np.array([[(1 << 31) - 1]]), "eb": np.array(1)}, "(ea + eb)[0, 0] = 2147483648"),
        ({"ea": np.array([[-(1 << 31)]]), "eb": np.array(-1)}, "(ea + eb)[0, 0] = -2147483649"),
        ({"e_bias": 1 << 31}, "e_bias = 2147483648"),
    ],
)
def test_exponents_beyond_int32_are_refused(fn, kw, where):
    args = {"ea": np.zeros((kw.get("ea", _z()).shape[0], 1), np.int64), "eb": np.array(0), **kw}
    m = args["ea"].shape[0]
    with pytest.raises(ValueError, match=re.escape(f"gemm: {where}")):
        fn(
            np.ones((m, 2), np.int64),
            args["ea"],
            np.ones((2, 1), np.int64),
            args["eb"],
            bias=np.array([1]),
            e_bias=args.get("e_bias", 0),
        )


@TWINS
def test_zero_row_exponent_beyond_int32_is_refused(fn):
    # the zero row takes e_bias + (bitlen(1000) - 7) = 2**31 + 2: beyond int32
    with pytest.raises(ValueError, match=re.escape("gemm: e_bias = 2147483647: a zero row's exponent 2147483650")):
        fn(
            np.zeros((1, 1), np.int64),
            np.array([[EXP_ZERO]]),
            np.array([[1]]),
            np.array(0),
            8,
            bias=np.array([1000]),
            e_bias=(1 << 31) - 1,
        )


@TWINS
def test_float_e_bias_is_refused(fn):
    with pytest.raises(TypeError, match="e_bias"):
        fn(np.array([[1]]), _z(), np.array([[1]]), np.array(0), bias=np.array([1]), e_bias=-3.5)


# -- 3. all-zero rows (EXP_ZERO) with a bias; aligned biases beyond the datapath ------------------
def test_zero_row_takes_the_bias_exponent_hand_golden():
    # row 0: [2, 3] at -5; row 1 all zero: align gave EXP_ZERO - 4. Weight [[1], [1]] at -3.
    # bias 1000 at e_bias -20: bitlen(1000) = 10 fits a 16-bit accumulator (15 magnitude bits):
    # the zero row's accumulator exponent is e_bias, its value the bias: 1000 @ 2**-20.
    # Row 0: 5 at -8; the bias is 1000 * 2**-12 = 0.244 there: RND_CONV gives 0, so 5.
    a = np.array([[2, 3], [0, 0]])
    ea = np.array([[-5], [EXP_ZERO - 4]])
    b, eb = np.array([[1], [1]]), np.array(-3)
    for fn in (gemm, gemm_ref):
        acc, e, n = fn(a, ea, b, eb, acc_bits=16, bias=np.array([1000]), e_bias=-20)
        assert acc.tolist() == [[5], [1000]] and e.tolist() == [[-8], [-20]] and n == 0
        # 8-bit accumulator (max 127): 1000 needs 10 bits, so the zero row's exponent is
        # e_bias + 10 - 7 = -17 and the bias 1000 >> 3 = 125 exactly; no event
        acc, e, n = fn(a, ea, b, eb, acc_bits=8, bias=np.array([1000]), e_bias=-20)
        assert acc.tolist() == [[5], [125]] and e.tolist() == [[-8], [-17]] and n == 0
        # 1020 >> 3 = 127.5 rounds (RND_CONV) to 128: the one value that still clips (event)
        acc, _, n = fn(a, ea, b, eb, acc_bits=8, bias=np.array([1020]), e_bias=-20)
        assert acc.tolist() == [[5], [127]] and n == 1
        # no bias: the exponent stays ea + eb (the sentinel sum) and the row stays 0
        acc, e, n = fn(a, ea, b, eb, acc_bits=8)
        assert acc.tolist() == [[5], [0]] and e.tolist() == [[-8], [EXP_ZERO - 7]] and n == 0
    # an all-zero weight (EXP_ZERO) makes every row a zero row
    got = gemm(a, ea, np.zeros((2, 1), np.int64), np.array(EXP_ZERO - 12), 16, bias=np.array([7]), e_bias=-4)
    assert got[0].tolist() == [[7], [7]] and got[1].tolist() == [[-4], [-4]]


@TWINS
def test_nonzero_data_at_the_zero_exponent_is_refused(fn):
    with pytest.raises(ValueError, match=re.escape("gemm: ea[1, 0] = -1028 marks an all-zero row")):
        fn(np.array([[1], [2]]), np.array([[0], [EXP_ZERO - 4]]), np.array([[1]]), np.array(0))
    with pytest.raises(ValueError, match="gemm: eb = -1024 marks an all-zero b"):
        fn(np.array([[1]]), _z(), np.array([[3]]), np.array(EXP_ZERO))


def test_aligned_bias_beyond_the_datapath_saturates_hand_golden():
    # acc 6 at e_acc -5; bias 5 at e_bias 40 is 5 * 2**45 at -5 (48 bits): a 32-bit
    # accumulator clips to 2**31 - 1 (one event). WRAP keeps the low bits of the exact sum
    # 6 + 5 * 2**45: 6, one event.
    a, ea, b, eb = np.array([[2]]), np.array([[-2]]), np.array([[3]]), np.array(-3)
    for fn in (gemm, gemm_ref):
        acc, _, n = fn(a, ea, b, eb, 32, bias=np.array([5]), e_bias=40)
        assert acc.tolist() == [[2**31 - 1]] and n == 1
        acc, _, n = fn(a, ea, b, eb, 32, bias=np.array([-5]), e_bias=40)
        assert acc.tolist() == [[-(2**31)]] and n == 1
        # 62 bits: 3 * 2**60 is inside the int64 datapath but not the accumulator; 5 * 2**60 is
        # beyond both (a stand-in in the Numba table); both clip, one event each
        acc, _, n = fn(a, ea, b, eb, 62, bias=np.array([3]), e_bias=55)
        assert acc.tolist() == [[2**61 - 1]] and n == 1
        acc, _, n = fn(a, ea, b, eb, 62, Saturation.SAT_SYM, bias=np.array([-5]), e_bias=55)
        assert acc.tolist() == [[-(2**61) + 1]] and n == 1
        acc, _, n = fn(a, ea, b, eb, 32, Saturation.WRAP, bias=np.array([5]), e_bias=40)
        assert acc.tolist() == [[6]] and n == 1
        # 62-bit WRAP: 6 + 3 * 2**60 = 6 + 2**61 + 2**60 wraps to 6 - 2**60
        acc, _, n = fn(a, ea, b, eb, 62, Saturation.WRAP, bias=np.array([3]), e_bias=55)
        assert acc.tolist() == [[6 - 2**60]] and n == 1
        # 5 * 2**60 = 2**62 + 2**60 is beyond the datapath: its low 62 bits are 2**60
        acc, _, n = fn(a, ea, b, eb, 62, Saturation.WRAP, bias=np.array([5]), e_bias=55)
        assert acc.tolist() == [[6 + 2**60]] and n == 1
        # a bias shifted left by more than 62 steps is refused (the bias shifter's range)
        with pytest.raises(ValueError, match="needs more than 61 bits"):
            fn(a, ea, b, eb, 32, bias=np.array([5]), e_bias=58)


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    st.data(),
    st.integers(1, 4),
    st.integers(1, 9),
    st.integers(1, 4),
    st.integers(2, 62),
    st.sampled_from(list(Saturation)),
    st.integers(-70, -4),
    st.integers(0, 30),
)
@example(None, 2, 3, 2, 8, Saturation.SAT, -4, 4)
def test_zero_rows_and_far_biases_twins(data, m, k, n, acc_bits, sat, e_bias, guard):
    """Reference and Numba kernel equal to the bit on zero rows (exponent EXP_ZERO - guard),
    biases of up to 62 bits and exponents that shift the bias left up to 62 steps (e_acc is
    -66..-35), on the float path (small operands) and the integer loop (large ones)."""
    if data is None:  # the pinned example: 8-bit accumulator, zero rows, bias at its exponent
        a = np.array([[[1, 2, 3], [0, 0, 0]], [[0, 0, 0], [-4, 5, -6]]])
        ea = np.array([[[-3], [EXP_ZERO - guard]], [[EXP_ZERO - guard], [-2]]])
        args = (a, ea, np.array([[1, -1], [2, 2], [3, 0]]), np.array(-2), acc_bits, sat)
        bias = np.array([(1 << 40) + 1, -(1 << 40)])
        for mode in Rounding:
            _same(gemm(*args, bias, e_bias, mode), gemm_ref(*args, bias, e_bias, mode))
        return
    bits = data.draw(st.sampled_from([4, 8, 20, 31]))
    a = data.draw(int_arrays((2, m, k), bits))
    ea = data.draw(int_arrays((2, m, 1), 5))
    zero = data.draw(int_arrays((2, m, 1), 1, signed=False)).astype(bool)
    a = np.where(zero, 0, a)
    ea = np.where(zero, EXP_ZERO - guard, ea - 40)
    b = data.draw(int_arrays((k, n), bits))
    bias = data.draw(int_arrays((n,), data.draw(st.sampled_from([2, 16, 33, 62]))))
    mode = data.draw(rounding_modes())
    args = (a, ea, b, np.array(-10), acc_bits, sat, bias, e_bias, mode)
    _same(gemm(*args), gemm_ref(*args))


# -- 3. narrow accumulators on the tiny model; 4. accumulator-width warnings ----------------------
@pytest.fixture(scope="module")
def spec(tiny_bert_onnx):
    return load_graph(tiny_bert_onnx)


def _w8a8(acc_bits):
    return load_config({"preset": "w8a8", "default": {"acc_bits": acc_bits}})


@pytest.mark.parametrize("acc_bits", [8, 12, 16, 20, 24])
def test_tiny_model_runs_with_narrow_accumulators(spec, acc_bits):
    """Before: a zero activation row (EXP_ZERO) made the bias alignment fail at 12..24 bits,
    and at 8 bits a bias shifted left beyond 61 bits did; now the events are counted."""
    g = lower(spec, _w8a8(acc_bits))
    res = run(g, tiny_inputs(), trace=True)
    assert np.all(np.isfinite(res.outputs["logits"].dequantize()))
    if acc_bits <= 20:
        assert res.overflow_count > 0
    accs = {n.name for n in g.nodes if isinstance(n, (ir.Linear, ir.MatMul))}
    assert any(res.overflow.get(a, 0) for a in accs)


def test_acc_warnings_name_the_linears_that_can_overflow(spec):
    g = lower(spec, _w8a8(32))
    warns = g.info["acc_warnings"]
    assert warns, "8-bit activations (+4 guard) times 8-bit weights (+12 guard) need more than 32 bits"
    pat = re.compile(r"node (\S+): worst case needs (\d+) accumulator bits, acc_bits=32")
    nodes = {n.name: n for n in g.nodes}
    for w in warns:
        mt = pat.fullmatch(w)
        assert mt, w
        name, need = mt.group(1), int(mt.group(2))
        assert need > 32 and isinstance(nodes[name], (ir.Linear, ir.MatMul))
    # L0.q reads emb.ln requantized to s8 and aligned with guard 4: |x| <= 2**11; the bound is
    # that times the largest column sum of the aligned weight, plus a sign bit
    q = nodes["L0.q.acc"]
    need = (2**11 * int(np.abs(q.weight).sum(axis=0).max())).bit_length() + 1
    assert f"node L0.q.acc: worst case needs {need} accumulator bits, acc_bits=32" in warns
    # at 32 bits the attention products fit: K = 16 (head dim) of 12-bit operands is 27 bits
    assert not any("scores" in w or "context" in w for w in warns)
    assert lower(spec, _w8a8(62)).info["acc_warnings"] == []
    narrow = lower(spec, _w8a8(16)).info["acc_warnings"]
    assert any(w.startswith("node L0.scores.acc:") for w in narrow)
    assert any(w.startswith("node L0.context.acc:") for w in narrow)


def test_acc_warning_bounds_are_sound(spec):
    """At acc_bits = the largest need no warning remains and no linear or matmul accumulator
    clips (the bias, not in the bound, is small next to it on this model)."""
    need = max(int(w.split(" needs ")[1].split()[0]) for w in lower(spec, _w8a8(8)).info["acc_warnings"])
    g = lower(spec, _w8a8(need))
    assert g.info["acc_warnings"] == []
    res = run(g, tiny_inputs(), trace=True)
    for n in g.nodes:
        if isinstance(n, (ir.Linear, ir.MatMul)):
            assert res.overflow.get(n.name, 0) == 0, n.name
