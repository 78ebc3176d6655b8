"""A model quantized by onnxruntime's ``quantize_dynamic`` (DynamicQuantizeLinear +
MatMulInteger + scale Mul), simulated in integers with a power-of-two run-time scale.

The run-time float scale ``(max - min) / 255`` has no integer-only equivalent; bbct takes the
smallest power of two that covers the same integer range (``dynamic_quantize``). The tests
measure what that costs against onnxruntime's execution of the same model.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_qdq import LINEARS, TOL, _check_gemms, _traced

from bbct.kernels.affine import dynamic_quantize, dynamic_quantize_ref
from bbct.kernels.formats import Rounding
from bbct.kernels.testing import assert_bit_equal, rounding_modes
from bbct.simulator import ir
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.frontend.interp import run_float
from bbct.simulator.frontend.onnx_in import load_graph


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(st.integers(-(1 << 15), (1 << 15) - 1), min_size=1, max_size=40),
    exps=st.lists(st.integers(-20, 5), min_size=1, max_size=40),
    rounding=rounding_modes(),
)
@example(data=[0, 0], exps=[3, -7], rounding=Rounding.RND_CONV)  # all zero
@example(data=[255, -1], exps=[0, 0], rounding=Rounding.RND_CONV)  # range 256: k = 1
@example(data=[100, 5], exps=[0, 0], rounding=Rounding.RND_CONV)  # range 100 fits 255 at k = -1
def test_dynamic_quantize_twins(data, exps, rounding):
    x = np.array(data, np.int64)
    e = np.resize(np.array(exps, np.int32), x.shape)
    got, ref = dynamic_quantize(x, e, rounding), dynamic_quantize_ref(x, e, rounding)
    assert_bit_equal(got[0], ref[0])
    assert got[1:] == ref[1:]


def test_dynamic_quantize_hand_golden():
    # values 3, -1.5, 0.25 (codes 12, -6, 1 at 2**-2): range 4.5 = 18 quarters -> 18 <= 255 * 2**-3,
    # so k = -3 (scale 2**-5 = 1/32); zp = 1.5 * 32 = 48; codes 96, -48, 8
    c, k, zp = dynamic_quantize(np.array([12, -6, 1]), np.full(3, -2), Rounding.RND_CONV)
    assert (k, zp) == (-5, 48) and c.tolist() == [96, -48, 8]


@pytest.fixture(scope="module", params=[False, True], ids=["per-tensor", "per-channel"])
def dynamic_model(request, tiny_bert_onnx, tmp_path_factory) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    out = tmp_path_factory.mktemp("dyn") / "model.onnx"
    quantize_dynamic(str(tiny_bert_onnx), str(out), per_channel=request.param)
    shutil.copy(tiny_bert_onnx.parent / "tokenizer.json", out.parent / "tokenizer.json")
    return out


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10((ref**2).sum() / max(((ref - got) ** 2).sum(), 1e-30)))


def test_dynamic_import_and_gemms(dynamic_model):
    """Every MatMulInteger layer becomes a quant_linear with a dynamic input; the tables'
    Gather -> DequantizeLinear become float tables; the GEMMs equal MatMulInteger's."""
    fg, g, feeds, res = _traced(dynamic_model)
    ql = [n for n in fg.nodes if isinstance(n, F.QuantLinear)]
    assert len(ql) == LINEARS and all(n.x_quant.dynamic for n in ql)
    # 2 layers x (the Q/K/V input, context, ffn1 input, GELU output) + pooler + classifier inputs
    assert sum(isinstance(n, ir.DynamicQuantize) for n in g.nodes) == 10
    _check_gemms(fg, g, feeds, res, dynamic=True)


def test_dynamic_against_onnxruntime(dynamic_model, monkeypatch):
    """End to end against onnxruntime's run of the quantized model, and what the
    power-of-two scale costs on its own (bbct's float model with ORT's scale vs with the
    power-of-two one). Tolerance as for the static models (0.003, 30 dB; measured 4e-4, 48 dB): the
    rest of the pipeline is bbct's integer kernels."""
    _, g, feeds, res = _traced(dynamic_model)
    want = ort.InferenceSession(str(dynamic_model)).run(["logits"], feeds)[0]
    got = res.outputs["logits"].dequantize()
    assert np.abs(got - want).max() < TOL and _sqnr(want, got) > 30
    fg = load_graph(dynamic_model)
    exact = run_float(fg, feeds)["logits"]
    assert _sqnr(want, exact) > 40  # bbct's float model of the dynamic graph is onnxruntime's
    monkeypatch.setattr(F, "dynamic_fake_quant", functools.partial(F.dynamic_fake_quant, pow2=True))
    pow2 = run_float(fg, feeds)["logits"]
    assert 35 < _sqnr(exact, pow2) < 80  # measured 47.6..51.5 dB: it changes the result, not wildly
    assert all("dynamic" in v for v in g.info["given_quantization"]["honoured"].values())


def test_vectors_of_a_dynamic_model(dynamic_model, tmp_path):
    """Run-time quantized codes dump as 9-bit signed (q - zp, both 0..255)."""
    import json

    from bbct.simulator.cli import main

    out = tmp_path / "vec"
    assert main(["vectors", str(dynamic_model), "--text", "w5 w6 w7", "--out", str(out)]) == 0
    doc = json.loads((out / "vectors.json").read_text())
    op_of = {n["node"]: n["op"] for n in doc["nodes"]}
    dq = [f for f in doc["files"] if f["port"] == "out" and op_of[f["node"]] == "dynamic_quantize"]
    assert dq and all(f["bits"] == 9 and f["signed"] for f in dq)
