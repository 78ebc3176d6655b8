"""Import of tiny random BERTs from both PyTorch exporters, opsets 14-21, eager/SDPA attention,
erf/tanh GELU, with and without a classifier head. The strong check: a float NumPy BERT driven
only by the imported spec reproduces onnxruntime's outputs."""

import numpy as np
import onnx
import pytest
from bert_exports import export_tiny, tiny_inputs

from golden.runner import GoldenRunner
from simulator import spec as S
from simulator.errors import BbctError, UnsupportedGraphError
from simulator.float_model import run_spec_float
from simulator.onnx_import import describe, load_bert

MATRIX = [
    ("torchscript", 14, "eager", "gelu", "cls"),
    ("torchscript", 17, "sdpa", "gelu", "base"),
    ("torchscript", 17, "eager", "gelu_new", "cls"),
    ("dynamo", 18, "sdpa", "gelu", "cls"),
    ("dynamo", 20, "eager", "gelu_pytorch_tanh", "base"),
    ("dynamo", 21, "sdpa", "gelu", "cls"),
]


@pytest.fixture(scope="module", params=MATRIX, ids=lambda p: "-".join(map(str, p)))
def exported(request, export_dir):
    return request.param, export_tiny(export_dir, *request.param)


def test_import_reproduces_onnxruntime(exported):
    (exporter, opset, attention, act, head), path = exported
    spec = load_bert(path)
    assert len(spec.layers) == 2 and spec.hidden == 32 and spec.num_heads == 2 and spec.vocab_size == 100
    assert spec.opset == opset
    want_act = "gelu_erf" if act == "gelu" else "gelu_tanh"
    assert all(layer.activation == want_act for layer in spec.layers)
    assert all(abs(layer.attention.scale - 16**-0.5) < 1e-6 for layer in spec.layers)
    assert all(abs(layer.attention_norm.eps - 1e-12) < 1e-15 for layer in spec.layers)
    assert (spec.classifier is not None) == (head == "cls")
    feeds = tiny_inputs()
    golden = GoldenRunner(path).run(feeds)
    ours = run_spec_float(spec, **feeds)
    for name, role in spec.outputs.items():
        np.testing.assert_allclose(ours[role], golden[name], atol=1e-4, rtol=0, err_msg=f"{name} ({role})")
    assert "BERT: 2 layers, hidden 32, 2 heads" in describe(spec)


def test_every_recorded_name_is_a_tensor_of_the_original_graph(exported):
    _, path = exported
    spec = load_bert(path)
    model = onnx.load(str(path))
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    records = [spec.embeddings, spec.embeddings.layer_norm]
    for layer in spec.layers:
        at = layer.attention
        records += [
            at,
            at.q,
            at.k,
            at.v,
            at.out,
            layer,
            layer.intermediate,
            layer.output,
            layer.attention_norm,
            layer.output_norm,
        ]
    names = [n for r in records for n in r.names.values()] + list(spec.names.values())
    assert names and all(n in produced for n in names), [n for n in names if n not in produced]
    for layer in spec.layers:
        assert {S.ROLE_SCORES, S.ROLE_PROBS, S.ROLE_CONTEXT} <= set(layer.attention.names)


def test_weights_are_exact_copies(tiny_bert_onnx):
    spec = load_bert(tiny_bert_onnx)
    model = onnx.load(str(tiny_bert_onnx))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    word = next(v for k, v in inits.items() if "word_embeddings" in k)
    np.testing.assert_array_equal(spec.embeddings.word, word)
    # the TorchScript export stores Linear weights pre-transposed for MatMul: (in, out)
    q = spec.layers[0].attention.q
    assert q.weight.shape == (32, 32) and any(np.array_equal(q.weight, v) for v in inits.values())


def test_errors_name_the_file_and_node(tmp_path, tiny_bert_onnx):
    with pytest.raises(BbctError, match="no such file"):
        load_bert(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(BbctError, match="not an ONNX model"):
        load_bert(bad)
    # an unsupported op inside the graph: the error names the node and op and lists what works
    model = onnx.load(str(tiny_bert_onnx))
    sm = next(n for n in model.graph.node if n.op_type == "Softmax")
    sm.op_type = "Hardmax"
    with pytest.raises(UnsupportedGraphError, match=r"no Softmax: not a BERT encoder|Supported BERT structure"):
        load_bert(model)
    model = onnx.load(str(tiny_bert_onnx))
    node = next(n for n in model.graph.node if n.op_type == "Erf")
    node.op_type = "Relu"
    with pytest.raises(UnsupportedGraphError, match=r"node .*\(.*\): unsupported activation made of .*Relu"):
        load_bert(model)
