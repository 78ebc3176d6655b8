"""A model quantized by onnxruntime's quantization tool (QDQ, static), simulated in integers.

The models are tiny random BERTs (tests/bert_exports.py), quantized here by
``onnxruntime.quantization.quantize_static`` with a calibration reader over a few token
batches. Oracles nobody here wrote: onnxruntime's ``MatMulInteger`` on the very integer
operands bbct's GEMMs read (bit-equal), onnxruntime's execution of the quantized model (end
to end, declared tolerance), and the quantizer's own stored codes (weights, int32 biases).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bert_exports import tiny_inputs
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from bbct.kernels.affine import affine_quantize, affine_quantize_ref, dynamic_quantize
from bbct.kernels.formats import Rounding
from bbct.kernels.testing import assert_bit_equal, rounding_modes
from bbct.simulator import ir
from bbct.simulator.config import Config
from bbct.simulator.errors import UnsupportedGraphError
from bbct.simulator.execute import _exp_full, run
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.frontend.interp import run_float
from bbct.simulator.frontend.onnx_in import given_quant, load_graph
from bbct.simulator.lower import lower
from bbct.simulator.qdq import centered_weight

LINEARS = 14  # 2 layers x (q, k, v, attention output, ffn1, ffn2) + pooler + classifier
TOL = 0.003  # logits vs onnxruntime's run of the quantized model (see test_end_to_end_against_onnxruntime)


# -- the kernel ---------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(st.integers(-(1 << 31) + 1, (1 << 31) - 1), min_size=1, max_size=40),
    e=st.integers(-40, 40),
    mult=st.integers(1, (1 << 31) - 1),
    shift=st.integers(-10, 60),
    zp=st.integers(-8, 255),
    signed=st.booleans(),
    rounding=rounding_modes(),
)
@example(data=[3], e=-1, mult=1, shift=0, zp=0, signed=True, rounding=Rounding.RND_CONV)  # 1.5 -> 2
@example(data=[(1 << 31) - 1], e=40, mult=(1 << 31) - 1, shift=-10, zp=0, signed=False, rounding=Rounding.TRN)
def test_affine_quantize_twins(data, e, mult, shift, zp, signed, rounding):
    qmin, qmax = (-128, 127) if signed else (0, 255)
    zp = min(max(zp, qmin), qmax)
    x = np.array(data, np.int64)
    ev = np.full(x.shape, e, np.int32)
    got = affine_quantize(x, ev, mult, shift, zp, qmin, qmax, rounding)
    ref = affine_quantize_ref(x, ev, mult, shift, zp, qmin, qmax, rounding)
    assert_bit_equal(got[0], ref[0])
    assert got[1] == ref[1]


def test_affine_quantize_hand_golden():
    # scale 0.5 (mult 1, shift -1: x * 2): x = 3 at 2**-2 is 0.75 -> 1.5 -> 2 (half to even),
    # +zp 128 = 130, centered 2; x = 5 at 2**-2 is 1.25 -> 2.5 -> 2 (even); -600 * 2**0 -> -1200 + 128 clips to 0
    c, ev = affine_quantize(np.array([3, 5, -600]), np.array([-2, -2, 0]), 1, -1, 128, 0, 255, Rounding.RND_CONV)
    assert c.tolist() == [2, 2, -128] and ev == 1


# -- models quantized by onnxruntime -------------------------------------------------------------
class _Reader:
    """A CalibrationDataReader over four batches of random token ids (right-padded masks)."""

    def __init__(self) -> None:
        self.batches = iter([tiny_inputs(batch=2, seq=9, seed=s) for s in range(4)])

    def get_next(self):
        return next(self.batches, None)


class _UnpaddedReader(_Reader):
    """The same batches with every mask all ones: calibration sees no masked score."""

    def get_next(self):
        b = super().get_next()
        return None if b is None else {**b, "attention_mask": np.ones_like(b["attention_mask"])}


def quantize_tiny(src: Path, out: Path, per_channel: bool, act: str = "QUInt8", **kw) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader = type("Reader", (kw.pop("reader", _Reader), CalibrationDataReader), {})()
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(src),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=getattr(QuantType, act),
        weight_type=kw.pop("weight_type", QuantType.QInt8),
        op_types_to_quantize=kw.pop("op_types", ["MatMul", "Gemm"]),
        **kw,
    )
    shutil.copy(src.parent / "tokenizer.json", out.parent / "tokenizer.json")
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["per-tensor", "per-channel"])
def qdq_model(request, tiny_bert_onnx, tmp_path_factory) -> Path:
    return quantize_tiny(tiny_bert_onnx, tmp_path_factory.mktemp("qdq") / "model.onnx", request.param)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


def test_import_keeps_the_given_codes(qdq_model):
    fg = load_graph(qdq_model)
    ql = [n for n in fg.nodes if isinstance(n, F.QuantLinear)]
    assert len(ql) == LINEARS
    inits = _initializers(qdq_model)
    stored = [v for k, v in inits.items() if k.endswith("_quantized") and v.dtype == np.int8]
    for n in ql:
        c = n.w_quant.codes
        # the codes are one of the quantizer's int8 initializers (Gemm's transposed)
        assert any(np.array_equal(c, v) or np.array_equal(c, v.T) for v in stored), n.name
        assert n.x_quant.qmin == 0 and n.x_quant.qmax == 255


def test_float_interpreter_matches_onnxruntime_on_linears(qdq_model):
    """bbct's float model of a quant_linear (the given fake quantization, then the
    dequantized weight) reproduces onnxruntime's MatMul of the DQ tensors."""
    fg = load_graph(qdq_model)
    feeds = tiny_inputs()
    env = run_float(fg, feeds, keep=True)
    sess = ort.InferenceSession(str(qdq_model))
    names = [n.name for n in fg.nodes if isinstance(n, F.QuantLinear) and n.name == "logits"]
    got = sess.run(names, feeds)
    for name, v in zip(names, got, strict=True):
        assert np.abs(env[name] - v).max() < 2e-3 * max(1.0, np.abs(v).max())


def _traced(path: Path, config: Config | None = None):
    fg = load_graph(path)
    g = lower(fg, config or Config())
    feeds = tiny_inputs()
    return fg, g, feeds, run(g, feeds, trace=True)


def _matmul_integer(a: np.ndarray, b: np.ndarray, za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """onnxruntime's MatMulInteger (uint8 x uint8, zero points) in a one-node model; batched
    operands (attention heads) broadcast as in MatMul.

    ``a`` and ``b`` uint8 or int8 codes with their zero points. int8 operands are fed as
    ``code + 128`` with zero point ``zp + 128``: the same integer products. onnxruntime's
    uint8 x int8 path on AVX2 without VNNI adds pairs of products in saturating int16 (its
    quantizer's ``reduce_range`` option exists for this), so it is not an exact oracle for
    full-range codes; its uint8 x uint8 path widens first and is exact."""

    def u8(x, z):
        if x.dtype == np.int8:
            return (x.astype(np.int16) + 128).astype(np.uint8), np.array(int(np.asarray(z).ravel()[0]) + 128, np.uint8)
        return x, np.array(int(np.asarray(z).ravel()[0]), np.uint8)

    (a, za), (b, zb) = u8(a, za), u8(b, zb)
    node = helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])
    graph = helper.make_graph(
        [node],
        "mmi",
        [
            helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, list(a.shape)),
            helper.make_tensor_value_info("b", onnx.TensorProto.UINT8, list(b.shape)),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, None)],
        [numpy_helper.from_array(za, "za"), numpy_helper.from_array(zb, "zb")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"a": a, "b": b})[0]


def test_every_integer_gemm_is_matmulinteger(qdq_model):
    """Each GEMM of a given-quantization linear, minus its bias, is bit-equal to
    onnxruntime's MatMulInteger of the same uint8 input codes and int8 weight codes (and to
    NumPy's int64 product); so are the attention matmuls (Q K^T and P V per layer), whose
    operands the quantizer gives too."""
    fg, g, feeds, res = _traced(qdq_model)
    _check_gemms(fg, g, feeds, res)
    _check_attention_gemms(g, res, expect=4)


def test_int4_weights(tiny_bert_onnx, tmp_path):
    """int4 weights (onnxruntime's quantizer writes com.microsoft Q/DQ for them below opset
    21): the codes stay in -8..7, the GEMMs equal MatMulInteger's, the logits onnxruntime's."""
    from onnxruntime.quantization import QuantType

    path = quantize_tiny(tiny_bert_onnx, tmp_path / "i4" / "model.onnx", True, weight_type=QuantType.QInt4)
    fg, g, feeds, res = _traced(path)
    ql = [n for n in fg.nodes if isinstance(n, F.QuantLinear)]
    assert len(ql) == LINEARS and all(n.w_quant.qmin == -8 and n.w_quant.codes.max() <= 7 for n in ql)
    _check_gemms(fg, g, feeds, res)
    _check_attention_gemms(g, res, expect=4)
    err, sqnr, scale = _logit_error(path, res, feeds)  # measured: every code equal (1.9e-9, 148 dB)
    assert err <= 2 * scale and sqnr > 40, (err, sqnr)


def _codes_source(by_name: dict, name: str) -> ir.Node | None:
    """The node making the codes tensor ``name`` holds: an affine or dynamic quantize node or
    a table over given codes, possibly through data movement of codes (heads, a row)."""
    n = by_name.get(name)
    while isinstance(n, (ir.MergeHeads, ir.SplitHeads, ir.TakeRow)):
        n = by_name.get(n.inputs[0])
    return n if isinstance(n, (ir.AffineQuantize, ir.DynamicQuantize, ir.CodeTable)) else None


def _check_gemms(fg: F.FGraph, g: ir.Graph, feeds: dict, res, dynamic: bool = False) -> None:
    """Every linear GEMM reading given codes is bit-equal to MatMulInteger of those codes."""
    by_name = {n.name: n for n in g.nodes}
    quantizers = (ir.DynamicQuantize,) if dynamic else (ir.AffineQuantize, ir.CodeTable)
    qls = [f for f in fg.nodes if isinstance(f, F.QuantLinear)]
    checked = 0
    for n in g.nodes:
        aq = _codes_source(by_name, n.inputs[0]) if isinstance(n, ir.Linear) else None
        if not isinstance(aq, quantizers):
            continue
        c = res.tensors[n.inputs[0]].data
        fnode = next(f for f in qls if np.array_equal(centered_weight(f.w_quant), n.weight))
        if dynamic:  # the run-time zero point, from the kernel on the traced input
            x = res.tensors[aq.inputs[0]]
            zp = dynamic_quantize(x.data, _exp_full(x), aq.rounding)[2]
        else:  # codes on the linear's given input grid
            zp = int(fnode.x_quant.zero_point)
        a = (c + zp).astype(np.int8 if fnode.x_quant.qmin < 0 else np.uint8)
        zw = np.asarray(fnode.w_quant.zero_point).astype(np.int8)
        if zw.ndim:  # per-channel weight zero points (all 0 for onnxruntime's symmetric weights)
            assert not zw.any()
            zw = np.int8(0)
        b = fnode.w_quant.codes.astype(np.int8)
        want = _matmul_integer(a, b, np.array(zp), np.array(zw))
        acc = res.tensors[n.name].data
        if n.bias is not None:  # the bias as the GEMM aligned it (contract of kernels/gemm.py)
            acc = acc - _aligned_bias(n, res.tensors[n.name].exp)
        assert_bit_equal(acc, want.astype(np.int64))
        assert_bit_equal(acc, (a.astype(np.int64) - zp) @ n.weight)
        checked += 1
    assert checked == len(qls)


def _check_attention_gemms(g: ir.Graph, res, expect: int) -> None:
    """Every attention matmul of given codes (Q K^T, P V) is bit-equal to onnxruntime's
    batched MatMulInteger of the same codes with their zero points."""
    by_name = {n.name: n for n in g.nodes}
    checked = 0
    for n in g.nodes:
        if not isinstance(n, ir.MatMul):
            continue
        srcs = [_codes_source(by_name, i) for i in n.inputs]
        if not all(isinstance(q, ir.AffineQuantize) for q in srcs):
            continue
        ops = []
        for i, q in zip(n.inputs, srcs, strict=True):
            c = res.tensors[i].data
            ops.append(((c + q.zero_point).astype(np.int8 if q.qmin < 0 else np.uint8), np.array(q.zero_point)))
        (a, za), (b, zb) = ops
        want = _matmul_integer(a, b, za, zb).astype(np.int64)
        assert_bit_equal(res.tensors[n.name].data, want)
        assert_bit_equal(
            res.tensors[n.name].data, res.tensors[n.inputs[0]].data.astype(np.int64) @ res.tensors[n.inputs[1]].data
        )
        checked += 1
    assert checked == expect, checked


def _check_given_values(g: ir.Graph, res) -> None:
    """What reads a given tensor sees its codes' value: ``c * scale`` with the scale as a
    multiplier of ``b`` bits (``b = min(24, 30 - code bits)``), so within ``2**-(b-1)`` of
    it relative; and every code is inside the given range (saturated at qmin/qmax)."""
    by_name = {n.name: n for n in g.nodes}
    seen = 0
    for n in g.nodes:
        if not (isinstance(n, ir.RescaleChannels) and isinstance(by_name.get(n.inputs[0]), ir.AffineQuantize)):
            continue
        aq = by_name[n.inputs[0]]
        c = res.tensors[aq.name].data
        assert (c + aq.zero_point).min() >= aq.qmin and (c + aq.zero_point).max() <= aq.qmax
        scale = float(aq.given.split("scale=")[1].split()[0])  # as printed, 6 digits
        v = res.tensors[n.name].dequantize()
        mb = min(24, 30 - aq.bits)
        assert np.all(np.abs(v - c * scale) <= np.abs(c) * scale * (2.0 ** -(mb - 1) + 1e-5)), n.name
        seen += 1
    assert seen > 20


def _logit_error(path: Path, res, feeds) -> tuple[float, float, float]:
    """bbct's logits against onnxruntime's run of the same model: (max |err|, SQNR dB, the
    scale of the model's logits codes, 0.0 when the logits are not quantized)."""
    want = ort.InferenceSession(str(path)).run(["logits"], feeds)[0]
    err = res.outputs["logits"].dequantize() - want
    sqnr = 10 * np.log10((want**2).sum() / max((err**2).sum(), 1e-30))
    # the logits' codes are what the DequantizeLinear computing the output reads: a
    # QuantizeLinear's (QDQ) or a QGemm's y_scale (QOperator); its scale is theirs
    dq = next(
        (n for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "logits"), None
    )
    scale = float(_initializers(path)[dq.input[1]]) if dq is not None else 0.0
    return float(np.abs(err).max()), float(sqnr), scale


def _aligned_bias(n: ir.Linear, e_acc: np.ndarray) -> np.ndarray:
    from bbct.kernels.formats import shift_round_ref

    shift = int(np.asarray(e_acc).ravel()[0]) - n.bias_exp
    return np.array([shift_round_ref(int(b), shift, n.bias_rounding) for b in n.bias], np.int64)


def test_stored_int32_bias_is_recovered(qdq_model):
    """The quantizer stores the Gemm biases (pooler, classifier) as int32 at s_x * s_w; bbct's
    bias codes at the accumulator's unit are exactly those integers."""
    fg, g, _, _ = _traced(qdq_model)
    inits = _initializers(qdq_model)
    for short, bias_name in (
        ("pooler.dense.acc", "m.bert.pooler.dense.bias_quantized"),
        ("classifier.acc", "m.classifier.bias_quantized"),
    ):
        n = next(x for x in g.nodes if x.name == short)
        assert_bit_equal(n.bias, inits[bias_name].astype(np.int64))


def test_end_to_end_against_onnxruntime(qdq_model, tiny_bert_onnx):
    """bbct's integer logits against onnxruntime running the same quantized model.

    Tolerance: two codes of the logits' given scale (3.5e-4 here; logits of magnitude ~0.065)
    and SQNR >= 40 dB. Measured: every logit code equal, the error is float32's rounding of
    the dequantized logits (2.8e-9, 146 dB, per tensor and per channel). Why not always 0:
    the given codes are honoured at every Q/DQ pair, but between them bbct computes in its
    integer kernels (the LayerNorm's integer square root, the softmax and GELU kernels,
    bbct's config for the tables and sums the quantizer left float) where onnxruntime
    computes in float32, so an internal code can differ by one (a value near a rounding
    midpoint) and, rarely, carry to the logits."""
    _, g, feeds, res = _traced(qdq_model)
    err, sqnr, scale = _logit_error(qdq_model, res, feeds)
    assert scale > 0 and err <= 2 * scale and sqnr > 40, (err, sqnr, scale)
    report = g.info["given_quantization"]
    assert len(report["honoured"]) == LINEARS
    kinds = {v.split(":")[0] for v in report["activations"].values()}
    assert {"product before the bias", "attention probabilities", "attention context", "linear output"} <= kinds
    assert not report["not_honoured"], report["not_honoured"]  # MatMul and Gemm quantized: every pair honoured


def test_int16_activations(tiny_bert_onnx, tmp_path):
    """QInt16 activations (zero point 0, -32768..32767): honoured, and the run agrees with
    onnxruntime's as closely as the 8-bit one."""
    path = quantize_tiny(tiny_bert_onnx, tmp_path / "q16" / "model.onnx", per_channel=True, act="QInt16")
    fg, g, feeds, res = _traced(path)
    ql = [n for n in fg.nodes if isinstance(n, F.QuantLinear)]
    assert len(ql) == LINEARS and all(n.x_quant.qmin == -32768 for n in ql)
    err, sqnr, scale = _logit_error(path, res, feeds)
    # int16 logits codes (scale 2e-6): bbct's 16-bit kernels between the pairs are coarser than
    # the given grid, so codes differ; measured 1.7e-4, 53 dB
    assert err < TOL and sqnr > 45, (err, sqnr)


def test_partly_quantized_model(tiny_bert_onnx, tmp_path):
    """Only layer 0's linears quantized: those are honoured, the rest lowered by the config."""
    m = onnx.load(tiny_bert_onnx)
    nodes = [n.name for n in m.graph.node if n.op_type == "MatMul" and "layer.0" in n.name and "dense" in n.name]
    path = quantize_tiny(tiny_bert_onnx, tmp_path / "part" / "model.onnx", per_channel=False, nodes_to_quantize=nodes)
    fg, g, feeds, res = _traced(path)
    ql = [n.name for n in fg.nodes if isinstance(n, F.QuantLinear)]
    assert len(ql) == len(nodes) == 3
    by_name = {n.name: n for n in g.nodes}
    reads_codes = [n for n in g.nodes if isinstance(n, ir.Linear) and _codes_source(by_name, n.inputs[0]) is not None]
    assert len(reads_codes) == 3  # the other linears read bbct's activations
    want = ort.InferenceSession(str(path)).run(["logits"], feeds)[0]
    assert np.abs(res.outputs["logits"].dequantize() - want).max() < TOL


def test_blocked_scales_are_refused_by_name():
    """Blocked scales are read for stored codes (tests/test_qdq_export.py), refused in one
    line for an activation and for a scale shape that does not match the blocks."""
    n = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="x_q", axis=0, block_size=16)
    with pytest.raises(UnsupportedGraphError, match="node 'x_q' \\(QuantizeLinear\\): blocked scales .* activation"):
        given_quant(n, np.ones((2, 4), np.float32), None, None)
    n = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], name="w_dq", axis=0, block_size=16)
    with pytest.raises(
        UnsupportedGraphError, match=r"node 'w_dq' \(DequantizeLinear\): blocked scales of shape \[3, 4\]"
    ):
        given_quant(n, np.ones((3, 4), np.float32), None, np.zeros((32, 4), np.int8))
    g = given_quant(n, np.ones((2, 4), np.float32), None, np.zeros((32, 4), np.int8))
    assert g.block_size == 16 and g.axis == 0


def test_cli_reports_given_and_chosen(qdq_model, capsys):
    from bbct.simulator.cli import main

    assert main(["ir", str(qdq_model)]) == 0
    out = capsys.readouterr().out
    assert "affine_quantize" in out and "rescale_channels" in out and "bias_add" in out
    head = next(line for line in out.splitlines() if line.startswith("given quantization honoured"))
    assert head.startswith(f"given quantization honoured ({LINEARS} linear layers; ")
    assert "12 product before the bias" in head and "2 attention probabilities" in head
    assert "given quantization not honoured" not in out  # MatMul and Gemm quantized: nothing left


def _qoperator(src: Path, out: Path, op_types: list[str] | None) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    reader = type("Reader", (_Reader, CalibrationDataReader), {})()
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QOperator, op_types_to_quantize=op_types)
    shutil.copy(src.parent / "tokenizer.json", out.parent / "tokenizer.json")
    return out


def test_qoperator_format(tiny_bert_onnx, tmp_path):
    """QOperator (QLinearMatMul, onnxruntime's QGemm with its int32 bias; int8 activations):
    rewritten op by op to QDQ, then honoured like a QDQ model; GEMMs and logits as there."""
    path = _qoperator(tiny_bert_onnx, tmp_path / "qop" / "model.onnx", ["MatMul", "Gemm"])
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"QLinearMatMul", "QGemm"} <= ops
    fg, g, feeds, res = _traced(path)
    ql = [n for n in fg.nodes if isinstance(n, F.QuantLinear)]
    assert len(ql) == LINEARS and all(n.x_quant.qmin == -128 for n in ql)
    _check_gemms(fg, g, feeds, res)
    err, sqnr, scale = _logit_error(path, res, feeds)
    assert scale > 0 and err < scale / 2 and sqnr > 40, (err, sqnr, scale)  # every logit code equal
    assert not g.info["given_quantization"]["not_honoured"]


@pytest.fixture(scope="module")
def qoperator_all(tiny_bert_onnx, tmp_path_factory) -> Path:
    return _qoperator(tiny_bert_onnx, tmp_path_factory.mktemp("qop_all") / "model.onnx", None)


def test_qoperator_every_op_quantized(qoperator_all):
    """Every op quantized in QOperator form (QLinearAdd, QLinearMul, QLinearSoftmax, and int8
    codes moved by Transpose/Reshape between them): the moved codes become moves of the
    dequantized value (exact for a per-tensor scale), every GEMM and attention matmul is
    MatMulInteger's, every logit code equal to onnxruntime's (measured 2.8e-9, 146 dB)."""
    ops = {n.op_type for n in onnx.load(qoperator_all).graph.node}
    assert {"QLinearAdd", "QLinearSoftmax", "QLinearMatMul", "Transpose"} <= ops
    fg, g, feeds, res = _traced(qoperator_all)
    _check_gemms(fg, g, feeds, res)
    _check_attention_gemms(g, res, expect=4)
    err, sqnr, scale = _logit_error(qoperator_all, res, feeds)
    assert scale > 0 and err < scale / 2 and sqnr > 40, (err, sqnr, scale)  # every logit code equal (README)
    report = g.info["given_quantization"]
    assert not report["not_honoured"], report["not_honoured"]  # README: the list is empty
    assert any("exact, Reshape + Transpose of the codes" in v for v in report["exact"].values())


def test_moved_codes_on_another_grid_are_refused_by_name(qoperator_all, tmp_path):
    """Codes moved by a Transpose and read back at a different scale have no faithful
    rewrite (DQ(move(Q(x))) is no longer a move of DQ(Q(x))): refused in one line naming the
    node, the op and why."""
    m = onnx.load(qoperator_all)
    prod = {o: n for n in m.graph.node for o in n.output}
    n = next(
        n
        for n in m.graph.node
        if n.op_type == "QLinearMatMul" and prod.get(n.input[0]) is not None and prod[n.input[0]].op_type == "Transpose"
    )
    scale = next(i for i in m.graph.initializer if i.name == n.input[1])
    twice = numpy_helper.from_array(numpy_helper.to_array(scale) * 2, scale.name + "_twice")
    m.graph.initializer.append(twice)
    n.input[1] = twice.name
    path = tmp_path / "model.onnx"
    onnx.save(m, path)
    with pytest.raises(UnsupportedGraphError, match=r"node '.*' \(DequantizeLinear\): .*Transpose of integer codes"):
        load_graph(path)


@pytest.fixture(scope="module", params=[False, True], ids=["per-tensor", "per-channel"])
def qdq_all(request, tiny_bert_onnx, tmp_path_factory) -> Path:
    """quantize_static with every op type quantized (int8 activations, its default)."""
    out = tmp_path_factory.mktemp("qdq_all") / "model.onnx"
    return quantize_tiny(tiny_bert_onnx, out, request.param, act="QInt8", op_types=None)


def test_every_op_quantized(qdq_all):
    """QDQ with every op quantized: the given codes honoured at the linear products before
    the bias, the linear outputs, residual sums, LayerNorm outputs, attention scores (before
    and after the scale, and with the mask), probabilities and context, the embedding sum and
    the logits, and the GELU with its inner pairs (one table over its input codes); Q/DQ on
    moved codes are exact; GEMMs and attention matmuls bit-equal to MatMulInteger. Logits:
    per tensor every code equal (2.8e-9, 146 dB); per channel one code of 3.5e-4 (47.7 dB):
    bbct's LayerNorm and softmax kernels between the pairs move an internal code by one now
    and then (a value near a rounding midpoint), which here reaches one logit."""
    fg, g, feeds, res = _traced(qdq_all)
    _check_gemms(fg, g, feeds, res)
    _check_attention_gemms(g, res, expect=4)
    err, sqnr, scale = _logit_error(qdq_all, res, feeds)
    assert err <= 2 * scale and sqnr > 40, (err, sqnr, scale)
    per_channel = any(np.ndim(n.w_quant.scale) for n in fg.nodes if isinstance(n, F.QuantLinear))
    assert per_channel or err < scale / 2, (err, scale)  # per tensor every logit code equal (README)
    report = g.info["given_quantization"]
    kinds = {v.split(":")[0] for v in report["activations"].values()}
    assert {
        "embedding sum",
        "embedding partial sum",
        "LayerNorm output",
        "residual sum",
        "product before the bias",
        "linear output",
        "attention scores before the scale",
        "attention scores + mask",
        "attention probabilities",
        "attention context",
    } <= kinds
    assert "embedding partial sum" in kinds  # word + token type, summed in the graph's order
    _check_given_values(g, res)
    # the Erf, 1 + erf and x * (1 + erf) pairs inside each GELU: one table over the input codes
    assert "inside the GELU (one table over the input codes)" in kinds and "GELU output" in kinds
    assert not report["not_honoured"], report["not_honoured"]
    by_name = {n.name: n for n in g.nodes}
    tables = [n for n in g.nodes if isinstance(n, ir.CodeTable)]
    assert len(tables) == 2 and all(isinstance(by_name[t.inputs[0]], ir.AffineQuantize) for t in tables)
    exact = " ".join(report["exact"].values())  # lookups of stored codes, moved heads
    assert exact.count("Gather of the stored codes") == 3 and "Reshape + Transpose of the codes" in exact


def test_narrow_masked_scores_are_refused_by_name(tiny_bert_onnx, tmp_path):
    """A given range of scores + mask a few units wide (what calibration gives when it sees
    no padding; here the range quantize_static chose is narrowed to 255 steps of 0.02):
    onnxruntime clips a masked element to the floor, 5.1 below the ceiling, and exp(-5.1) of
    the row's largest term is far above half a probability step, while bbct's softmax gives
    a masked element 0. bbct refuses the model, naming the softmax, instead of differing.
    (Calibrated with all-ones masks, quantize_static also clips the mask itself, which the
    import already refuses by name.)"""
    from bbct.simulator.errors import LoweringError

    path = quantize_tiny(tiny_bert_onnx, tmp_path / "model.onnx", False, act="QInt8", op_types=None)
    m = onnx.load(path)
    adds = {n.output[0] for n in m.graph.node if n.op_type == "Add" and n.name.endswith("attention/self/Add")}
    scales = {n.input[1] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in adds}
    assert len(adds) == 2 and len(scales) == 2
    for init in m.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(np.array(0.02, np.float32), init.name))
    onnx.save(m, path)
    with pytest.raises(LoweringError, match=r"node '.*' \(Softmax\): the given codes of attention scores \+ mask"):
        lower(load_graph(path), Config())


def test_multiplier_width_is_configurable(qdq_model):
    """``given_mult_bits`` sets the width of every multiplier made from a given scale; 12 bits
    still agree with onnxruntime within the tolerance; out of 8..31 is a config error."""
    from bbct.simulator.config import load_config
    from bbct.simulator.errors import ConfigError

    cfg = load_config({"default": {"given_mult_bits": 12, "gelu_method": "lut"}})
    _, g, feeds, res = _traced(qdq_model, cfg)
    mults = [int(n.multiplier) for n in g.nodes if isinstance(n, ir.AffineQuantize)]
    mults += [int(m) for n in g.nodes if isinstance(n, ir.RescaleChannels) for m in n.multiplier]
    assert mults and all(1 << 11 <= m < 1 << 12 for m in mults)
    want = ort.InferenceSession(str(qdq_model)).run(["logits"], feeds)[0]
    assert np.abs(res.outputs["logits"].dequantize() - want).max() < TOL
    with pytest.raises(ConfigError, match="given_mult_bits"):
        load_config({"default": {"given_mult_bits": 40}})


def test_vectors_of_a_quantized_model(qdq_model, tmp_path):
    """The given-quantization nodes dump at port widths that hold their codes (a value outside
    its port stops the dump), and the manifest names the affine and rescale nodes' files."""
    import json

    from bbct.simulator.cli import main

    out = tmp_path / "vec"
    assert main(["vectors", str(qdq_model), "--text", "w5 w6 w7", "--text", "w8", "--out", str(out)]) == 0
    doc = json.loads((out / "vectors.json").read_text())
    op_of = {n["node"]: n["op"] for n in doc["nodes"]}
    outs = {op_of[f["node"]]: f for f in doc["files"] if f["port"] == "out"}
    assert {"affine_quantize", "rescale_channels", "linear"} <= set(outs)
    aq = outs["affine_quantize"]
    assert aq["signed"] and aq["bits"] == 9  # uint8 codes minus a zero point: -255..255


def test_format_given_reports_exact_movements_alone():
    """A model whose only honoured given codes are exact data movements is still reported
    (it was '' before), without a '0 linear layers' part."""
    from bbct.simulator.qdq import format_given

    text = format_given({"given_quantization": {"exact": {"t": "int8 from q: exact"}}})
    assert text.splitlines() == [
        "given quantization honoured (1 exact data movements; every other tensor: bbct's config):",
        "  t: int8 from q: exact",
    ]
    assert format_given({}) == ""


def _shared_tensor_model(path: Path, other: str) -> Path:
    """Embedding lookup ``x``, ``t = tanh(x)`` read by a Q/DQ pair (u8, 0.05, zp 3) into
    ``x + DQ(Q(t))``, and by ``other``: "" nothing, "direct" a Tanh of ``t`` itself, "grid"
    a second Q/DQ pair of another scale (0.04) into another sum."""
    init = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0.04, np.float32), "s2"),
        numpy_helper.from_array(np.array(3, np.uint8), "z"),
        numpy_helper.from_array(np.linspace(-1, 1, 40, dtype=np.float32).reshape(10, 4), "table"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["x"], name="emb"),
        helper.make_node("Tanh", ["x"], ["t"], name="tanh"),
        helper.make_node("QuantizeLinear", ["t", "s", "z"], ["tq"], name="t_q"),
        helper.make_node("DequantizeLinear", ["tq", "s", "z"], ["td"], name="t_dq"),
        helper.make_node("Add", ["td", "x"], ["a"], name="add"),
    ]
    outs = ["a"]
    if other == "direct":
        nodes.append(helper.make_node("Tanh", ["t"], ["m"], name="direct_tanh"))
        outs.append("m")
    if other == "grid":
        nodes += [
            helper.make_node("QuantizeLinear", ["t", "s2", "z"], ["tq2"], name="t_q2"),
            helper.make_node("DequantizeLinear", ["tq2", "s2", "z"], ["td2"], name="t_dq2"),
            helper.make_node("Add", ["td2", "x"], ["a2"], name="add2"),
        ]
        outs.append("a2")
    g = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, ["b", "s", 4]) for o in outs],
        init,
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_pair_on_one_reader_changes_no_other_reader(tmp_path):
    """Given codes are recorded on a tensor (lowering quantizes the tensor itself) only when
    every reader reads it through that grid: with a Q/DQ pair its only reader, ``t`` is
    given; read directly too, or through a second pair of another scale, nothing is given
    (each reader keeps the value it reads in the model) and the pairs are reported as not
    honoured, with the reason."""
    fg = load_graph(_shared_tensor_model(tmp_path / "only.onnx", ""))
    assert list(fg.info["given_activations"]) == ["t"] and not fg.info["quant_not_honoured"]
    fg = load_graph(_shared_tensor_model(tmp_path / "direct.onnx", "direct"))
    assert not fg.info["given_activations"]
    assert fg.info["quant_not_honoured"] == {
        "td": "u8 scale=0.05 zp=3 from t_q: t is also read by direct_tanh without this grid; bbct's config quantizes it"
    }
    fg = load_graph(_shared_tensor_model(tmp_path / "grid.onnx", "grid"))
    assert not fg.info["given_activations"] and set(fg.info["quant_not_honoured"]) == {"td", "td2"}


@pytest.mark.parametrize("move", [False, True], ids=["direct", "moved"])
def test_missing_dequantize_zero_point_is_zero(tmp_path, move):
    """A DequantizeLinear without a zero point (0, as ONNX defines it) reading the codes a
    QuantizeLinear of zero point 3 wrote computes ``c * s``, not ``(c - 3) * s``: it is no
    fake quantization, directly or through moved codes, and is refused in one line naming
    the node (bbct took the QuantizeLinear's zero point for both)."""
    m = onnx.load(_shared_tensor_model(tmp_path / "only.onnx", ""))
    dq = next(n for n in m.graph.node if n.name == "t_dq")
    del dq.input[2]
    if move:
        dq.input[0] = "tq_moved"
        m.graph.node.insert(3, helper.make_node("Transpose", ["tq"], ["tq_moved"], name="move", perm=[0, 1, 2]))
    path = tmp_path / "model.onnx"
    onnx.save(m, path)
    why = r"Transpose of integer codes" if move else r"scale or zero point differs"
    with pytest.raises(UnsupportedGraphError, match=rf"node 't_dq' \(DequantizeLinear\): .*{why}"):
        load_graph(path)


def test_layernorm_of_codes_scales_eps(tiny_bert_onnx, tmp_path):
    """A LayerNorm reading given codes ``c`` of ``x = c * s`` computes
    ``(c - mean) / sqrt(var(c) + eps / s**2)``: its eps is the model's over ``s**2`` (it was
    the model's, too small by ``s**2`` -- invisible at eps 1e-12, here 1e-3)."""
    from bbct.kernels.layernorm import make_layernorm_params

    path = quantize_tiny(tiny_bert_onnx, tmp_path / "model.onnx", False, act="QInt8", op_types=None)
    m = onnx.load(path)
    lns = [n for n in m.graph.node if n.op_type == "LayerNormalization"]
    assert lns
    for n in lns:
        for a in n.attribute:
            if a.name == "epsilon":
                a.f = 1e-3
    onnx.save(m, path)
    fg = load_graph(path)
    g = lower(fg, Config())
    by_name = {n.name: n for n in g.nodes}
    given = fg.info["given_activations"]
    f_lns = [n for n in fg.nodes if isinstance(n, F.LayerNorm)]
    i_lns = [n for n in g.nodes if isinstance(n, ir.LayerNorm)]
    assert len(f_lns) == len(i_lns)
    on_codes = 0
    for f, n in zip(f_lns, i_lns, strict=True):
        src = by_name[by_name[n.inputs[0]].inputs[0]]  # LayerNorm <- Align <- its input
        eps = float(f.eps)
        if isinstance(src, ir.AffineQuantize):
            eps, on_codes = eps / float(np.float32(given[f.inputs[0]][0].scale)) ** 2, on_codes + 1
        want = make_layernorm_params(np.asarray(f.gamma, np.float64), np.asarray(f.beta, np.float64), eps, 8)
        assert (n.params.eps_m, n.params.eps_e) == (want.eps_m, want.eps_e), (f.name, eps)
    assert on_codes >= 4  # the residual sums' codes: 2 layers x 2
