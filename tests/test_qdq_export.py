"""``bbct export``: bbct's integer model as ONNX QDQ (opset 21), run by onnxruntime, and
imported back with the same integer weights, bit for bit (tiny random BERT)."""

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
from bbct.simulator.config import load_config
from bbct.simulator.export import export_qdq
from bbct.simulator.frontend.onnx_in import load_graph
from bbct.simulator.lower import lower


def _stored(g: ir.Graph) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    out = {}
    for n in g.nodes:
        q = n.stored if isinstance(n, ir.Linear) else n.table if isinstance(n, ir.Embed) else None
        if q is not None:
            out[n.name] = (np.asarray(q.data), np.asarray(q.exp), None if q.mant is None else np.asarray(q.mant))
    return out


W4_BLOCKED = {"default": {"weight_bits": 4, "weight_block": 16, "weight_exp_bits": 4, "gelu_method": "lut"}}


@pytest.fixture(scope="module", params=["w8a8", "mx-int8", "w4-blocks16"])
def exported(request, tiny_bert_onnx, tmp_path_factory):
    """Round-to-nearest weights (the round trip re-derives exponents from the exact values;
    GPTQ and clip-searched exponents would need the file's codes read as given)."""
    cfg = load_config(W4_BLOCKED if request.param == "w4-blocks16" else request.param)
    fg = load_graph(tiny_bert_onnx)
    g = lower(fg, cfg)
    out = tmp_path_factory.mktemp("export") / "model.qdq.onnx"
    done = export_qdq(tiny_bert_onnx, fg, g, cfg, out)
    return cfg, g, out, done


def test_written_weights_are_bbcts_codes_exactly(exported):
    """onnxruntime's DequantizeLinear of every written weight equals bbct's stored integer
    tensor dequantized (codes times power-of-two block scales), to the bit."""
    cfg, g, out, done = exported
    m = onnx.load(out)
    assert m.opset_import[0].version == 21 and len(done["weights"]) == 17  # 14 linears + 3 tables
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    if cfg.default.weight_block:
        assert any(a.name == "block_size" for n in dq for a in n.attribute)
    m.graph.output.extend(helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in dq)
    vals = dict(
        zip(
            [o.name for o in m.graph.output],
            ort.InferenceSession(m.SerializeToString()).run(None, tiny_inputs()),
            strict=True,
        )
    )
    stored = {
        q.shape: q for n in g.nodes for q in [getattr(n, "stored", None) or getattr(n, "table", None)] if q is not None
    }
    for n in dq:
        v = vals[n.output[0]]
        q = stored.get(v.shape) or stored.get(v.shape[::-1])
        want = q.dequantize() if q.shape == v.shape else q.dequantize().T
        if not np.array_equal(v, want):  # a same-shape weight of another layer: find the equal one
            assert any(
                np.array_equal(v, s.dequantize()) or np.array_equal(v, s.dequantize().T)
                for n2 in g.nodes
                for s in [getattr(n2, "stored", None) or getattr(n2, "table", None)]
                if s is not None
            )


def test_onnxruntime_runs_the_export(exported, tiny_bert_onnx):
    """The exported model runs in onnxruntime: its logits are the float model's with bbct's
    quantized weights (activations float), close to the float model's."""
    _, _, out, _ = exported
    feeds = tiny_inputs()
    got = ort.InferenceSession(str(out)).run(["logits"], feeds)[0]
    ref = ort.InferenceSession(str(tiny_bert_onnx)).run(["logits"], feeds)[0]
    assert np.abs(got - ref).max() < 0.05 * max(1.0, np.abs(ref).max())


def test_round_trip_gives_the_same_integer_weights(exported):
    """Import the export back and lower it under the same config: every stored weight and
    table, codes and exponents (and multipliers), equal bit for bit."""
    cfg, g, out, _ = exported
    g2 = lower(load_graph(out), cfg)
    a, b = _stored(g), _stored(g2)
    assert a.keys() == b.keys() and len(a) == 17
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            if x is None:
                assert y is None
            else:
                assert_bit_equal(x, y)


def test_kernels_are_marked(exported):
    _, _, out, _ = exported
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
