"""Stored weights of a quantized model (``DequantizeLinear`` of integer codes, activations
float) are bbct's weights as given: codes kept, scales per tensor, per channel or in opset 21
blocks, zero points as integer offsets; nothing is quantized again.

Oracles: onnxruntime's ``DequantizeLinear`` of the file's codes equals bbct's stored tensor
dequantized, exactly; onnxruntime's own weight-only quantizer (``MatMulNBitsQuantizer``,
QDQ format: int4/uint4 blocks with zero points, float scales) as an independent producer;
onnxruntime's run of that model end to end (declared tolerance). Tiny random BERT."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bert_exports import tiny_inputs
from onnx import helper, numpy_helper, version_converter

from bbct.kernels.testing import assert_bit_equal
from bbct.simulator import ir
from bbct.simulator.config import load_config
from bbct.simulator.execute import run
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.frontend.onnx_in import load_graph
from bbct.simulator.lower import lower


def _dq_values(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """onnxruntime's value of every named tensor (the DequantizeLinear outputs)."""
    m = onnx.load(path)
    m.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names)
    got = ort.InferenceSession(m.SerializeToString()).run(names, tiny_inputs())
    return dict(zip(names, got, strict=True))


def _stored_by_weight(fg: F.FGraph, g: ir.Graph) -> dict[str, object]:
    """Weight initializer name -> bbct's stored integer tensor (K, N)."""
    from bbct.simulator.lower import assign_roles

    roles = assign_roles(fg)
    by = {n.name: n for n in g.nodes}
    return {n.weight_name: by[roles[n.name].short + ".acc"].stored for n in fg.nodes if type(n) is F.Linear}


# -- chosen formats, written into the tiny model ---------------------------------------------------
# (ONNX type, layout, power-of-two scales): one per linear of layer 0, each with zero points
# where the type has them. Blocks of 9 along K = 32: a shorter last block.
CASES = [
    (onnx.TensorProto.INT8, "tensor", False),
    (onnx.TensorProto.UINT8, "channel", False),
    (onnx.TensorProto.INT16, "blocks9", True),
    (onnx.TensorProto.UINT16, "blocks9", False),
    (onnx.TensorProto.INT4, "channel", True),
    (onnx.TensorProto.UINT4, "blocks9", False),
]


RANGES = {
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT4: (-8, 7),
    onnx.TensorProto.UINT4: (0, 15),
}


def _quantize(w: np.ndarray, dtype: int, layout: str, pow2: bool, rng) -> tuple[np.ndarray, ...]:
    """Codes, scale, zero point and attributes of ``w`` (K, N) in a QDQ layout."""
    lo, hi = RANGES[dtype]
    k, n = w.shape
    if layout == "tensor":
        shape, attrs = (), {}
    elif layout == "channel":
        shape, attrs = (n,), {"axis": 1}
    else:
        shape, attrs = (-(-k // 9), n), {"axis": 0, "block_size": 9}
    scale = (np.abs(w).max() / ((hi - lo) / 2)) * rng.uniform(0.6, 1.0, shape)
    if pow2:
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale = scale.astype(np.float32)
    mid = (lo + hi + 1) // 2  # unsigned: codes centred near the middle, zero points around it
    zp = rng.integers(mid - (hi - lo) // 8, mid + (hi - lo) // 8 + 1, shape)
    zp = np.zeros(shape, np.int64) if dtype in (onnx.TensorProto.INT16, onnx.TensorProto.INT8) else zp
    per = scale
    z = zp
    if layout == "blocks9":
        per, z = np.repeat(scale, 9, axis=0)[:k], np.repeat(zp, 9, axis=0)[:k]
    codes = np.clip(np.rint(w / per) + z, lo, hi).astype(np.int64)
    return codes, scale, zp, attrs


@pytest.fixture(scope="module")
def chosen(tiny_bert_onnx, tmp_path_factory) -> tuple[Path, dict]:
    m = version_converter.convert_version(onnx.load(tiny_bert_onnx), 21)
    inits = {i.name: i for i in m.graph.initializer}
    mm = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits and "layer.0" in n.name]
    assert len(mm) == len(CASES)
    rng = np.random.default_rng(0)
    written = {}
    for node, (dtype, layout, pow2) in zip(mm, CASES, strict=True):
        name = node.input[1]
        w = numpy_helper.to_array(inits[name]).astype(np.float64)
        codes, scale, zp, attrs = _quantize(w, dtype, layout, pow2, rng)
        c = helper.make_tensor(f"{name}_c", dtype, codes.shape, codes.ravel().tolist())
        s = numpy_helper.from_array(scale, f"{name}_s")
        z = helper.make_tensor(f"{name}_z", dtype, zp.shape, np.asarray(zp).ravel().tolist())
        m.graph.initializer.remove(inits[name])
        m.graph.initializer.extend([c, s, z])
        m.graph.node.insert(0, helper.make_node("DequantizeLinear", [c.name, s.name, z.name], [name], **attrs))
        written[name] = (codes, zp, dtype, layout, pow2)
    out = tmp_path_factory.mktemp("chosen") / "model.onnx"
    onnx.save(m, out)
    shutil.copy(Path(tiny_bert_onnx).parent / "tokenizer.json", out.parent / "tokenizer.json")
    return out, written


def test_given_codes_are_the_weights(chosen):
    """Each chosen type and layout: bbct's stored codes are the file's codes minus their zero
    points; power-of-two scales are POW2 block exponents, others 24-bit multipliers; the
    stored tensor dequantized is onnxruntime's DequantizeLinear output, exactly."""
    path, written = chosen
    fg = load_graph(path)
    g = lower(fg, load_config("w8a8"))
    stored = _stored_by_weight(fg, g)
    vals = _dq_values(path, list(written))
    for name, (codes, zp, _dtype, layout, pow2) in written.items():
        q = stored[name]
        z = np.asarray(zp)
        z = np.repeat(z, 9, axis=0)[: codes.shape[0]] if layout == "blocks9" else z
        assert_bit_equal(q.data, codes - z)
        assert (q.mant is None) == pow2, name
        if not pow2:
            assert np.all((q.mant >= 1 << 23) & (q.mant < 1 << 24))
        assert np.array_equal(vals[name], q.dequantize().astype(np.float32)), name
    report = g.info["given_quantization"]
    assert set(written) <= set(report["weights"])


def test_given_weights_run_end_to_end(chosen):
    """The model runs on its given weights; logits against onnxruntime's run of the same
    file (weights dequantized, everything else float): max 0.003, SQNR > 30 dB, the bound of
    the QDQ models in tests/test_qdq.py (measured: 6.5e-4, 40.9 dB)."""
    path, _ = chosen
    cfg = load_config({"default": {"gelu_method": "lut", "given_mult_bits": 16, "weight_guard": 4}})
    g = lower(load_graph(path), cfg)
    feeds = tiny_inputs()
    want = ort.InferenceSession(str(path)).run(["logits"], feeds)[0]
    got = run(g, feeds).outputs["logits"].dequantize()
    err = got - want
    sqnr = 10 * np.log10((want**2).sum() / (err**2).sum())
    assert np.abs(err).max() < 0.003 and sqnr > 30, (np.abs(err).max(), sqnr)


# -- onnxruntime's weight-only block quantizer -----------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["uint4-zp", "int4-symmetric"])
def nbits(request, tiny_bert_onnx, tmp_path_factory) -> Path:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    cfg = DefaultWeightOnlyQuantConfig(
        block_size=16, is_symmetric=request.param, quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",)
    )
    q = MatMulNBitsQuantizer(onnx.load(tiny_bert_onnx), algo_config=cfg)
    q.process()
    out = tmp_path_factory.mktemp("nbits") / "model.onnx"
    q.model.save_model_to_file(str(out), False)
    shutil.copy(Path(tiny_bert_onnx).parent / "tokenizer.json", out.parent / "tokenizer.json")
    return out


def test_onnxruntime_block_quantizer(nbits):
    """onnxruntime's 4-bit blocks (16 along K; uint4 with zero points, or int4 with signed
    scales): the 12 MatMul weights are given codes in blocks, dequantized exactly as
    onnxruntime does; ``given_mult_bits`` sets the multipliers' width."""
    fg = load_graph(nbits)
    lin = [n for n in fg.nodes if type(n) is F.Linear and n.w_given is not None]
    assert len(lin) == 12 and all(n.w_given.block_size == 16 and n.w_given.axis == 0 for n in lin)
    g = lower(fg, load_config("w8a8"))
    stored = _stored_by_weight(fg, g)
    vals = _dq_values(nbits, [n.weight_name for n in lin])
    for n in lin:
        q = stored[n.weight_name]
        assert q.fmt.block_size == 16 and q.fmt.mant_bits == 24
        assert np.array_equal(vals[n.weight_name], q.dequantize().astype(np.float32)), n.weight_name
    assert len(g.info["given_quantization"]["weights"]) == 12
    g12 = lower(fg, load_config({"default": {"given_mult_bits": 12}}))
    mants = [np.asarray(x.stored.mant) for x in g12.nodes if isinstance(x, ir.Linear) and x.stored.mant is not None]
    assert len(mants) == 12 and all(np.all((m >= 1 << 11) & (m < 1 << 12)) for m in mants)


def test_onnxruntime_block_quantizer_end_to_end(nbits):
    """bbct's integer logits against onnxruntime's run of the weight-only model.

    24-bit multipliers aligned with 12 guard bits make 41-bit weights, which the default
    42-bit accumulator cannot hold (saturations counted); with ``given_mult_bits=16`` and
    ``weight_guard=4`` nothing overflows and the logits are those of a 62-bit accumulator
    with exact weights (measured: max 5.6e-4 / 5.1e-4, SQNR 42.6 / 43.5 dB, uint4 / int4).
    Held to 0.003 and 30 dB, as tests/test_qdq.py."""
    cfg = load_config({"default": {"gelu_method": "lut", "given_mult_bits": 16, "weight_guard": 4}})
    g = lower(load_graph(nbits), cfg)
    errs, wants = [], []
    for seed in range(3):
        feeds = tiny_inputs(batch=3, seq=7 + seed, seed=10 + seed)
        want = ort.InferenceSession(str(nbits)).run(["logits"], feeds)[0]
        r = run(g, feeds)
        assert r.overflow_count == 0
        errs.append(r.outputs["logits"].dequantize() - want)
        wants.append(want)
    e, w = np.concatenate(errs), np.concatenate(wants)
    sqnr = 10 * np.log10((w**2).sum() / (e**2).sum())
    assert np.abs(e).max() < 0.003 and sqnr > 30, (np.abs(e).max(), sqnr)
