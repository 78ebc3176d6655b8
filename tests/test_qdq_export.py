"""``bbct export``: bbct's integer model as ONNX QDQ (opset 21), run by onnxruntime, and
imported back with the same integer weights and the same integer outputs, bit for bit, for
every preset and for multiplier scales and odd block sizes (tiny random BERT)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bert_exports import tiny_inputs
from onnx import helper

from bbct.kernels.testing import assert_bit_equal
from bbct.simulator import ir
from bbct.simulator.calibrate import calibrate
from bbct.simulator.config import load_config
from bbct.simulator.execute import run
from bbct.simulator.export import export_qdq
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.frontend.onnx_in import load_graph
from bbct.simulator.lower import lower

WEIGHTS = 17  # 14 linears + 3 tables
CONFIGS = {
    "w8a8": "w8a8",
    "w4a8": "w4a8",  # GPTQ codes and least-squared-error exponents: not what the exact values re-derive
    "mx-int8": "mx-int8",
    "w8a8-static": "w8a8-static",
    "w4-blocks9-clip": {
        "default": {"weight_bits": 4, "weight_block": 9, "weight_exp_bits": 4, "weight_clip_search": 2}
    },  # blocks of 9 along K = 32 and 37: a shorter last block
    "mult6-blocks24": {"default": {"weight_scale": "mult", "weight_mant_bits": 6, "weight_block": 24}},
    "w5-mult-channel": {"default": {"weight_bits": 5, "weight_scale": "mult", "weight_block": 0}},
}


def _calib(fg: F.FGraph, cfg):
    if not cfg.needs_calibration:
        return None
    return calibrate(fg, [tiny_inputs(batch=4, seq=9, seed=s) for s in range(3)], gptq=cfg.uses_gptq)


def _stored(g: ir.Graph) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    out = {}
    for n in g.nodes:
        q = n.stored if isinstance(n, ir.Linear) else n.table if isinstance(n, ir.Embed) else None
        if q is not None:
            out[n.name] = (np.asarray(q.data), np.asarray(q.exp), None if q.mant is None else np.asarray(q.mant))
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tiny_bert_onnx, tmp_path_factory):
    cfg = load_config(CONFIGS[request.param])
    fg = load_graph(tiny_bert_onnx)
    calib = _calib(fg, cfg)
    g = lower(fg, cfg, calib)
    out = tmp_path_factory.mktemp("export") / "model.qdq.onnx"
    done = export_qdq(tiny_bert_onnx, fg, g, cfg, out)
    return cfg, g, out, done, calib


def test_written_weights_are_bbcts_codes_exactly(exported):
    """onnxruntime's DequantizeLinear of every written weight equals bbct's stored integer
    tensor dequantized (codes times block scales), to the bit."""
    cfg, g, out, done, _ = exported
    m = onnx.load(out)
    assert m.opset_import[0].version == 21 and len(done["weights"]) == WEIGHTS
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in done["weights"]]
    assert len(dq) == WEIGHTS
    stored = [q for n in g.nodes for q in [getattr(n, "stored", None) or getattr(n, "table", None)] if q is not None]
    blocked = sum(np.asarray(q.exp).shape[q.fmt.block_axis] > 1 for q in stored)  # else one scale per channel
    assert sum(any(a.name == "block_size" for a in n.attribute) for n in dq) == blocked
    m.graph.output.extend(helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in dq)
    vals = dict(
        zip(
            [o.name for o in m.graph.output],
            ort.InferenceSession(m.SerializeToString()).run(None, tiny_inputs()),
            strict=True,
        )
    )
    for n in dq:
        v = vals[n.output[0]]
        assert any(np.array_equal(v, s.dequantize()) or np.array_equal(v.T, s.dequantize()) for s in stored), n.output[
            0
        ]


def test_onnxruntime_runs_the_export(exported, tiny_bert_onnx):
    """The exported model runs in onnxruntime: its logits are the float model's with bbct's
    quantized weights (and static activations rounded where bbct rounds them), close to the
    float model's."""
    _, _, out, _, _ = exported
    feeds = tiny_inputs()
    got = ort.InferenceSession(str(out)).run(["logits"], feeds)[0]
    ref = ort.InferenceSession(str(tiny_bert_onnx)).run(["logits"], feeds)[0]
    assert np.abs(got - ref).max() < 0.05 * max(1.0, np.abs(ref).max())


def test_round_trip_is_bit_exact(exported):
    """Import the export back and lower it under the same config: every stored weight and
    table (codes, exponents, multipliers) and the integer outputs equal bit for bit; the
    weights are read as the given codes (the report lists them), never quantized again."""
    cfg, g, out, done, calib = exported
    fg2 = load_graph(out)
    g2 = lower(fg2, cfg, calib)  # calibration by tensor name: only the embedding's partial sums need it
    a, b = _stored(g), _stored(g2)
    assert a.keys() == b.keys() and len(a) == WEIGHTS
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            if x is None:
                assert y is None
            else:
                assert_bit_equal(x, y)
    report = g2.info["given_quantization"]
    assert len(report["weights"]) == WEIGHTS and not report["honoured"]
    assert len(report.get("static_exponents", {})) == len(done["activations"])
    for seed in (0, 1):
        feeds = tiny_inputs(batch=3, seq=7 + seed, seed=seed)
        r1, r2 = run(g, feeds), run(g2, feeds)
        for role, q in r1.outputs.items():
            assert_bit_equal(q.data, r2.outputs[role].data)
            assert_bit_equal(np.broadcast_to(q.exp, q.data.shape), np.broadcast_to(r2.outputs[role].exp, q.data.shape))


def test_kernels_are_marked(exported):
    _, _, out, _, _ = exported
    m = onnx.load(out)
    meta = {p.key: p.value for p in m.metadata_props}
    kernels = json.loads(meta["bbct_integer_kernels"])
    ops = {k["bbct"].split()[1] for k in kernels}
    assert {"softmax", "layernorm", "gelu", "tanh"} <= ops
    docs = [n.doc_string for n in m.graph.node if n.doc_string.startswith("bbct:integer-kernel")]
    assert len(docs) == len(kernels) == 10  # 5 LayerNorms, 2 softmax, 2 GELU, tanh
    assert json.loads(meta["bbct_config"])


def test_cli_export(tiny_bert_onnx, tmp_path, capsys):
    from bbct.simulator.cli import main

    out = tmp_path / "m.qdq.onnx"
    assert main(["export", str(tiny_bert_onnx), "--out", str(out)]) == 0
    assert "17 integer weights" in capsys.readouterr().out
    ort.InferenceSession(str(out))
    assert main(["ir", str(out)]) == 0
    assert "given quantization honoured (17 stored weights;" in capsys.readouterr().out


def _against_onnxruntime(g: ir.Graph, path) -> tuple[float, float]:
    """bbct's integer logits against onnxruntime's run of ``path``: max |diff|, SQNR (dB)."""
    sess = ort.InferenceSession(str(path))
    errs, wants = [], []
    for seed in range(4):
        feeds = tiny_inputs(batch=3, seq=7 + seed, seed=10 + seed)
        want = sess.run(["logits"], feeds)[0]
        errs.append(run(g, feeds).outputs["logits"].dequantize() - want)
        wants.append(want)
    e, w = np.concatenate(errs), np.concatenate(wants)
    return float(np.abs(e).max()), float(10 * np.log10((w**2).sum() / (e**2).sum()))


def test_static_activations_bring_onnxruntime_closer(tiny_bert_onnx, tmp_path):
    """w8a8-static: each calibrated activation is written as QuantizeLinear/DequantizeLinear
    with one power-of-two scale per channel (its block's ``2**exp``, int8), so onnxruntime
    rounds it where bbct does. bbct against onnxruntime's run of the file, logits of
    magnitude 0.065 (measured: 2.3e-4 and 54.8 dB with the pairs, 3.0e-4 and 50.6 dB with the
    weights alone; what still differs: bbct's integer softmax, LayerNorm and GELU, and the
    unwritten run-time formats)."""
    cfg = load_config("w8a8-static")
    fg = load_graph(tiny_bert_onnx)
    g = lower(fg, cfg, _calib(fg, cfg))
    with_acts, weights_only = tmp_path / "a" / "model.onnx", tmp_path / "w" / "model.onnx"
    done = export_qdq(tiny_bert_onnx, fg, g, cfg, with_acts)
    assert export_qdq(tiny_bert_onnx, fg, g, cfg, weights_only, activations=False)["activations"] == []
    m = onnx.load(with_acts)
    pairs = [n for n in m.graph.node if n.doc_string.startswith("bbct:static-activation")]
    assert len(pairs) == 2 * len(done["activations"]) == 44  # 22 activations: every static requant and sum
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    by_onnx = {n.onnx_name: n for n in g.nodes if getattr(n, "exp", None) is not None and n.fmt.block_size}
    for n in pairs:
        if n.op_type == "DequantizeLinear":
            scale = inits[n.input[1]]
            exp = np.asarray(by_onnx[n.output[0]].exp).reshape(-1)
            assert_bit_equal(np.log2(scale).astype(np.int64), np.repeat(exp, 32)[: scale.size])
    a, b = _against_onnxruntime(g, with_acts), _against_onnxruntime(g, weights_only)
    assert a[0] < 4e-4 and a[1] > 52 and b[0] < 6e-4 and b[1] > 47 and a[1] > b[1] + 2, (a, b)


def test_static_exponents_need_a_static_config(tiny_bert_onnx, tmp_path):
    """A w8a8-static export lowered under w8a8 (run-time exponents): the file's static
    exponents are not used, and the report says so for each of them."""
    cfg = load_config("w8a8-static")
    fg = load_graph(tiny_bert_onnx)
    g = lower(fg, cfg, _calib(fg, cfg))
    done = export_qdq(tiny_bert_onnx, fg, g, cfg, tmp_path / "model.onnx")
    g2 = lower(load_graph(tmp_path / "model.onnx"), load_config("w8a8"))
    report = g2.info["given_quantization"]
    assert "static_exponents" not in report
    notes = [k for k, v in report["not_honoured"].items() if "the config's scaling is dynamic" in v]
    assert sorted(notes) == sorted(done["activations"])
    assert all(
        getattr(n, "exp", None) is None for n in g2.nodes if isinstance(n, (ir.Requant, ir.Add)) and n.fmt.block_size
    )
