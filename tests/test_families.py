"""Every BERT family through the one float graph: tiny random models (hidden 32, 2 layers; random
weights, not real models) of BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA, ALBERT and a
sentence-embedding export, each with its classification head and as a bare encoder, from both
PyTorch exporters.

Two oracles per model: the float interpreter equals onnxruntime on every tensor of the float
graph (the names are the ONNX tensor names); the integer simulation's final output keeps a
declared cosine against the golden over real tokens (w8a8 >= 0.99, w4a8 >= 0.95)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from families import export_family, inputs_for
from onnx import numpy_helper

from bbct.golden.runner import GoldenRunner
from bbct.simulator.calibrate import calibrate
from bbct.simulator.compare import cosine
from bbct.simulator.config import load_config
from bbct.simulator.errors import ExecutionError
from bbct.simulator.execute import run
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.frontend.interp import run_float
from bbct.simulator.frontend.onnx_in import load_graph
from bbct.simulator.lower import assign_roles, compression, lower

# (family, head, exporter, opset): every family and head from the TorchScript exporter at opset
# 17; every family's classifier (and the sentence export) from the dynamo exporter at opset 21
MATRIX = [
    (f, h, "torchscript", 17)
    for f in ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert")
    for h in ("cls", "base")
]
MATRIX += [("sentence", "base", "torchscript", 17)]
MATRIX += [(f, "cls", "dynamo", 21) for f in ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert")]
MATRIX += [("sentence", "base", "dynamo", 21)]


@dataclass
class Model:
    family: str
    head: str
    path: Path
    fg: F.FGraph
    feeds: dict[str, np.ndarray]
    golden: dict[str, np.ndarray]


@pytest.fixture(scope="module", params=MATRIX, ids=lambda p: "-".join(map(str, p)))
def model(request, export_dir) -> Model:
    family, head, exporter, opset = request.param
    path = export_family(export_dir / "families", family, head, exporter, opset)
    feeds = inputs_for(family)
    return Model(family, head, path, load_graph(path), feeds, GoldenRunner(path).run_all(feeds).values)


def _real(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return x[mask.astype(bool)] if x.ndim == 3 else x


def test_float_graph_equals_onnxruntime_on_every_tensor(model):
    """Every typed node's output is an ONNX tensor of the original graph, and the float
    interpreter reproduces it (float32 graph vs float64 interpreter: 1e-4 of the magnitude)."""
    env = run_float(model.fg, model.feeds)
    names = [n.name for n in model.fg.nodes]
    missing = [n for n in names if n not in model.golden]
    assert not missing, missing
    for name in names:
        g = np.asarray(model.golden[name], np.float64)
        assert np.abs(env[name] - g).max() <= 1e-4 * (1 + np.abs(g).max()), name
    assert not any(isinstance(n, F.OnnxOp) for n in model.fg.nodes)
    # positions and masks came from the graph's own index subgraph, at another size too
    other = inputs_for(model.family, batch=2, seq=11, seed=5)
    want = GoldenRunner(model.path).run(other)[model.fg.outputs[0]]
    assert np.abs(run_float(model.fg, other)[model.fg.outputs[0]] - want).max() < 1e-4


@pytest.mark.parametrize("preset, floor", [("w8a8", 0.99), ("w4a8", 0.95)])
def test_integer_output_against_the_golden(model, preset, floor):
    cfg = load_config(preset)
    calib = None
    if cfg.needs_calibration:  # w4a8: GPTQ statistics from other random sentences, never the test ones
        calib = calibrate(model.fg, [inputs_for(model.family, 8, 16, seed=s) for s in (1, 2, 3)], gptq=cfg.uses_gptq)
    g = lower(model.fg, cfg, calib)
    res = run(g, model.feeds)
    ((role, q),) = res.outputs.items()
    out = model.fg.outputs[0]
    f = _real(np.asarray(model.golden[out], np.float64), model.feeds["attention_mask"])
    x = _real(q.dequantize(), model.feeds["attention_mask"])
    assert cosine(f, x) >= floor, (role, cosine(f, x))
    assert res.overflow_count == 0


def test_family_structure(model):
    """What distinguishes the family is found in the graph, not assumed."""
    fg, fam = model.fg, model.family
    kinds = [type(n) for n in fg.nodes]
    roles = assign_roles(fg)
    shorts = {r.short for r in roles.values()}
    assert kinds.count(F.Softmax) == 2
    if fam in ("electra", "albert"):  # factorized embedding: a projection 16 -> 32 before layer 0
        assert "emb.proj" in shorts
    if fam in ("roberta", "xlm-roberta"):  # positions: CumSum over input_ids != pad, offset by pad
        ids = model.feeds["input_ids"]
        emb = next(n for n in fg.nodes if isinstance(n, F.EmbeddingSum))
        pos = [t for t in emb.inputs if t in fg.index.outputs]
        assert pos, "the position ids must be computed by the index subgraph"
        p = fg.index.run(model.feeds)[pos[0]]
        want = np.where(ids != 1, np.cumsum(ids != 1, axis=1) + 1, 1)
        np.testing.assert_array_equal(np.broadcast_to(p, ids.shape), want)
    if fam == "distilbert" and model.head == "cls":  # pre_classifier + ReLU + classifier on [CLS]
        assert F.Relu in kinds and F.TakeRow in kinds
    if fam == "sentence":
        assert F.MeanPool in kinds and F.L2Normalize in kinds
    if model.head == "cls" and fam in ("bert", "albert"):
        assert F.Tanh in kinds and F.TakeRow in kinds  # pooler dense + tanh on [CLS]
    if model.head == "cls" and fam in ("roberta", "xlm-roberta", "electra"):
        assert F.TakeRow in kinds and kinds.count(F.Linear) == 2 * 6 + 2 + (fam == "electra")


def test_albert_shared_weights_are_stored_once(export_dir):
    """ALBERT's layers share one set of weights: quantized once, counted once in compression
    (the exporters store the shared tensors once or as identical copies; both are found)."""
    path = export_family(export_dir / "families", "albert", "base", "torchscript", 17)
    fg = load_graph(path)
    g = lower(fg, load_config("w8a8"))
    names = [e["name"] for e in g.info["storage"] if e["matrix"]]
    # embeddings 3 tables + projection + one layer's 6 linears, not 2 layers' 12
    assert len(names) == 3 + 1 + 6, names
    linears = [n for n in g.nodes if n.op == "linear" and n.name.startswith("L1.")]
    l0 = {n.name[3:]: n for n in g.nodes if n.op == "linear" and n.name.startswith("L0.")}
    for n in linears:
        assert n.stored is l0[n.name[3:]].stored  # the very same integer weights
    c = compression(g)
    assert c["weight_params"] == sum(np.prod(np.shape(t)) for t in _albert_params(path))


def _albert_params(path: Path) -> list[np.ndarray]:
    """The distinct weight matrices of an ALBERT export (embedding tables and linears)."""
    m = onnx.load(str(path))
    seen, out = set(), []
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.ndim == 2 and a.dtype == np.float32:
            key = np.ascontiguousarray(a if a.shape[0] >= a.shape[1] else a.T).tobytes()
            if key not in seen:
                seen.add(key)
                out.append(a)
    return out


def test_too_long_input_names_the_models_limit(export_dir):
    """RoBERTa's positions start after padding_idx: 72 position rows take 70 tokens, found on
    the graph's own index subgraph."""
    path = export_family(export_dir / "families", "roberta", "base", "torchscript", 17)
    g = lower(load_graph(path), load_config("w8a8"))
    ids = np.full((1, 71), 7)
    with pytest.raises(ExecutionError, match=r"sequence length 71 exceeds the model's 70 positions"):
        run(g, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    ids = np.full((1, 70), 7)
    assert run(g, {"input_ids": ids, "attention_mask": np.ones_like(ids)}).outputs


def test_large_logits_are_not_clipped(export_dir, tmp_path):
    """A cross-encoder's logits reach +-8 and beyond: the classifier's output format comes from
    the data (dynamic), never from a fixed range (logits once saturated at +-4)."""
    src = export_family(export_dir / "families", "bert", "cls", "torchscript", 17)
    m = onnx.load(str(src))
    rng = np.random.default_rng(0)
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.shape in ((32, 2), (2, 32)):  # the classifier weight, made large
            init.CopyFrom(numpy_helper.from_array(rng.normal(0, 8, a.shape).astype(np.float32), init.name))
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    feeds = inputs_for("bert")
    want = GoldenRunner(path).run(feeds)["logits"]
    assert np.abs(want).max() > 8
    for preset in ("w8a8", "mx-int8"):
        res = run(lower(load_graph(path), load_config(preset)), feeds)
        got = res.outputs["logits"].dequantize()
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max(), (preset, got, want)
        assert res.overflow_count == 0
