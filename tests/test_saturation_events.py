"""Saturation events inside the nonlinear kernels: counted alike by the Numba kernels and their
plain-Python twins, and reported per node by the executor."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bbct.kernels.formats import IntFormat
from bbct.kernels.gelu import (
    gelu_lut_counted,
    gelu_lut_counted_ref,
    gelu_poly_counted,
    gelu_poly_counted_ref,
    make_gelu_lut,
    make_gelu_poly,
)
from bbct.kernels.layernorm import layernorm_counted, layernorm_counted_ref, make_layernorm_params
from bbct.kernels.softmax import make_softmax_params, softmax_counted, softmax_counted_ref
from bbct.kernels.tanh import make_tanh_lut, tanh_lut_counted, tanh_lut_counted_ref
from bbct.kernels.testing import assert_bit_equal, int_arrays
from bbct.simulator import ir
from bbct.simulator.execute import run


def _same(fast, ref) -> int:
    assert_bit_equal(fast[0], ref[0])
    assert fast[1] == ref[1], f"events: kernel {fast[1]}, reference {ref[1]}"
    return fast[1]


def test_softmax_events_hand_golden():
    # e_in = -9, 8-bit out: [0, 0] is 128 each (no event); [0, masked]: 1.0 saturates to 255
    # (one event; the masked element clipping to the input minimum is the mask, not an event);
    # a one-element row is 1.0 too (one event); a positive mask of 2**20 clips z at 32767 (one
    # event) and makes that element's probability 1.0 (a second).
    p = make_softmax_params(-9, 16, 8)
    x = np.array([[0, 0], [0, 0], [0, 0]])
    m = np.array([[0, 0], [0, -(1 << 20)], [0, 1 << 20]])
    assert softmax_counted(x, m, p)[0].tolist() == [[128, 128], [255, 0], [0, 255]]
    assert _same(softmax_counted(x, m, p), softmax_counted_ref(x, m, p)) == 3
    one, zero = np.array([[5]]), np.zeros(1, np.int64)
    assert _same(softmax_counted(one, zero, p), softmax_counted_ref(one, zero, p)) == 1


def test_gelu_poly_events_hand_golden():
    # e_in = -10, 8-bit output at e_in (max 127): GELU(1.0) = 858 codes and GELU(-1.0) = -166
    # codes both clip (2 events); x = 100 (0.098) gives 60 (fits; float 54.0, within the
    # polynomial's 1.5e-2 bound), x = 0 gives 0.
    p = make_gelu_poly(-10, 16, out_bits=8)
    x = np.array([1024, -1024, 100, 0])
    y, ev = gelu_poly_counted(x, p)
    assert y.tolist() == [127, -128, 60, 0] and ev == 2
    assert _same((y, ev), gelu_poly_counted_ref(x, p)) == 2


def test_lut_events_hand_golden():
    # GELU table, e_in = -10, 8 address bits, 8-bit out (max 127 = 0.124): above the table the
    # identity re-expresses x (8000 codes) and clips at 127: an event. Inside, entries above
    # 0.124 were clipped when the table was made: x = 1024 (GELU(1) = 862 codes) reads a
    # clipped entry (an event); x = 0 and x = -8000 (below the table: 0) are none.
    p = make_gelu_lut(-10, 16, 8, out_bits=8)
    x = np.array([8000, -8000, 0, 1024])
    y, ev = gelu_lut_counted(x, p)
    assert y.tolist() == [127, 0, 0, 127] and ev == 2
    _same((y, ev), gelu_lut_counted_ref(x, p))
    # tanh: +1.0 is 32768 codes at 2**-15, clipped to 32767 at lowering: the constant above the
    # table and the last knots are clipped, so x = 32767 (beyond the table) is an event;
    # -1.0 = -32768 is exact, so x = -32768 is none
    t = make_tanh_lut(-12)
    assert t.above_clipped and not t.below_clipped and t.clipped[-1] == 1 and t.clipped[0] == 0
    yt, evt = tanh_lut_counted(np.array([32767, -32768, 0]), t)
    assert yt.tolist() == [32767, -32768, 0] and evt == 1
    _same((yt, evt), tanh_lut_counted_ref(np.array([32767, -32768, 0]), t))


def test_layernorm_events_hand_golden():
    # The KERNELS.md example [-3, -1, 1, 3] (result [-10990, -3663, 3664, 15087] at 2**-13)
    # with a 14-bit output [-8192, 8191]: the two outer values clip, 2 events.
    p = make_layernorm_params(np.ones(4), np.array([0, 0, 0, 0.5]), 0.0, out_exp=-13, out_bits=14)
    x, e = np.array([[-3, -1, 1, 3]]), np.array([[0]])
    y, ev = layernorm_counted(x, e, p)
    assert y.tolist() == [[-8192, -3663, 3664, 8191]] and ev == 2
    assert _same((y, ev), layernorm_counted_ref(x, e, p)) == 2
    # eps = 1e-5 on a row at 2**-500: H * EPS_M shifted left by ~1000 bits saturates V at
    # 2**62 - 1 (one event; V itself is 2**55 here, M = 27); y is then d / sqrt((2**62 - 1) / H)
    # scaled, not the float value
    q = make_layernorm_params(np.ones(2), np.zeros(2), 1e-5)
    y2, ev2 = layernorm_counted(np.array([[1, -1]]), np.array([[-500]]), q)
    assert y2.tolist() == [[1448, -1448]] and ev2 == 1
    _same((y2, ev2), layernorm_counted_ref(np.array([[1, -1]]), np.array([[-500]]), q))


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 4), st.integers(1, 20), st.sampled_from(["poly", "lut"]), st.integers(2, 10))
def test_softmax_event_twins(data, rows, n, method, out_bits):
    p = make_softmax_params(-9, 16, out_bits, method)
    x = data.draw(int_arrays((rows, n), 16))
    mask = data.draw(st.sampled_from([0, -(1 << 20), 1 << 16])) * data.draw(
        int_arrays((rows, n), 1, signed=False, edges=False)
    )
    _same(softmax_counted(x, mask, p), softmax_counted_ref(x, mask, p))


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(3, 16), st.integers(-12, -6), st.sampled_from(["poly", "lut", "tanh"]))
def test_table_kernel_event_twins(data, out_bits, e_in, kind):
    x = data.draw(int_arrays((40,), 16))
    if kind == "poly":
        p = make_gelu_poly(e_in, 16, out_bits)
        _same(gelu_poly_counted(x, p), gelu_poly_counted_ref(x, p))
    elif kind == "lut":
        p = make_gelu_lut(e_in, 16, 6, out_bits)
        _same(gelu_lut_counted(x, p), gelu_lut_counted_ref(x, p))
    else:
        p = make_tanh_lut(e_in, 16, 6, out_bits)
        _same(tanh_lut_counted(x, p), tanh_lut_counted_ref(x, p))


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(2, 24), st.integers(4, 16), st.integers(-30, 10))
def test_layernorm_event_twins(data, h, out_bits, e_row):
    g = np.asarray(data.draw(int_arrays((h,), 6)), np.float64) / 16
    b = np.asarray(data.draw(int_arrays((h,), 6)), np.float64) / 8
    p = make_layernorm_params(g, b, 1e-5, out_exp=data.draw(st.integers(-14, -2)), out_bits=out_bits)
    x = data.draw(int_arrays((3, h), 20))
    e = np.full((3, 1), e_row)
    _same(layernorm_counted(x, e, p), layernorm_counted_ref(x, e, p))


def test_executor_reports_nonlinear_saturations_per_node():
    # one softmax over rows of one element: each probability is 1.0 and saturates to 255, so
    # a batch of 2 sentences of 3 tokens counts 6 events at that node, in Result.overflow
    sm = ir.Softmax(
        name="sm",
        inputs=("input_ids",),
        params=make_softmax_params(-9, 16, 8),
        e_in=-9,
        e_out=-8,
        out_fmt=IntFormat(bits=8, signed=False, block_size=0),
    )
    g = ir.Graph(nodes=(sm,), outputs={"probs": "sm"})
    ids = np.array([[1, 2, 3], [4, 5, 6]]).reshape(2, 3)
    res = run(g, {"input_ids": ids})
    assert res.outputs["probs"].data.shape == (2, 3)
    # the softmax axis is the last one (3 tokens), so rows hold 3 values: no saturation
    assert res.overflow == {}
    ids1 = ids[:, :1]
    res1 = run(g, {"input_ids": ids1})
    assert res1.outputs["probs"].data.tolist() == [[255], [255]]
    assert res1.overflow == {"sm": 2} and res1.overflow_count == 2


def test_bbct_run_reports_nonlinear_saturations(tiny_bert_onnx, tmp_path, capsys):
    # a 4-bit GELU output at the input's exponent (2**-8) holds at most 7/256: larger GELU
    # values saturate, and bbct run counts them at the GELU node, in its summary and its JSON
    import json

    from bbct.simulator.cli import main

    toml = tmp_path / "narrow_gelu.toml"
    toml.write_text('preset = "w8a8"\n[op.gelu]\ngelu_out_bits = 4\n')
    js = tmp_path / "r.json"
    argv = ["run", str(tiny_bert_onnx), "--text", "w5 w6 w7 w8 w9", "--config", str(toml), "--json", str(js)]
    assert main(argv) == 0
    by = json.loads(js.read_text())["overflow_by_node"]
    gelu = {k: v for k, v in by.items() if ".gelu.y" in k}
    assert gelu and all(v > 0 for v in gelu.values())
    assert "overflow/saturation events:" in capsys.readouterr().out
