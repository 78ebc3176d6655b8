"""The ``bbct`` command on the one float graph, with tiny random models (not real ones): text
pairs, single-score heads, truncation warnings, calibration files, real-token comparison,
``bbct ops`` and ``bbct ir --after``, weight-only int8 graphs whose tables are computed."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from families import export_family
from onnx import TensorProto, helper, numpy_helper

from bbct.golden.runner import GoldenRunner
from bbct.simulator.cli import main
from bbct.simulator.compare import compare, sqnr_db
from bbct.simulator.config import load_config
from bbct.simulator.execute import run
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.frontend.onnx_in import load_graph
from bbct.simulator.lower import lower


def _bbct(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_takes_text_pairs_and_warns_of_truncation(capsys, tiny_bert_onnx, tmp_path):
    js = tmp_path / "run.json"
    long = " ".join(["w7"] * 30)
    code, out, err = _bbct(
        capsys, "run", str(tiny_bert_onnx), "--text", "w5 w6", "--pair", "w8 w9", "--text", long, "--pair", "w10",
        "--max-length", "16", "--json", str(js),
    )  # fmt: skip
    assert code == 0, err
    assert "bbct: warning: 1 of 2 inputs are longer than --max-length 16 tokens and were truncated" in err
    assert "over real tokens" in out and "float/int class" in out
    rep = json.loads(js.read_text())
    assert rep["pairs"] == ["w8 w9", "w10"] and rep["truncated_inputs"] == 1
    assert rep["compared_over"] == "real tokens (attention mask)"
    code, _, err = _bbct(capsys, "run", str(tiny_bert_onnx), "--text", "a", "--pair", "b", "--pair", "c")
    assert code == 2 and err.startswith("bbct: error: --pair given 2 times for 1 --text")


def test_single_logit_head_prints_the_score(capsys, export_dir, tmp_path):
    """A regression / cross-encoder head with one logit: the score, not 'class 0/0'."""
    import shutil

    src = export_family(export_dir / "families", "bert", "cls", "torchscript", 17)
    m = onnx.load(str(src))
    names = {i.name: i for i in m.graph.initializer}
    for node in m.graph.node:  # keep the classifier's first output column only
        if node.op_type == "Gemm" and node.output[0] == "logits":
            w, b = (numpy_helper.to_array(names[t]) for t in node.input[1:3])
            trans = dict((a.name, a.i) for a in node.attribute).get("transB", 0)
            names[node.input[1]].CopyFrom(numpy_helper.from_array(w[:1] if trans else w[:, :1], node.input[1]))
            names[node.input[2]].CopyFrom(numpy_helper.from_array(b[:1], node.input[2]))
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    shutil.copy(src.with_name("tokenizer.json"), tmp_path / "tokenizer.json")
    code, out, err = _bbct(capsys, "run", str(path), "--text", "w5 w6 w7")
    assert code == 0, err
    assert "float/int score" in out and "class" not in out.split("float/int score")[1]


def test_calibration_from_a_file(capsys, tiny_bert_onnx, tmp_path):
    texts = tmp_path / "calib.txt"
    texts.write_text("w5 w6 w7\nw8 w9 w10 w11\n\nw12\n")
    js = tmp_path / "run.json"
    code, _, err = _bbct(
        capsys, "run", str(tiny_bert_onnx), "--text", "w5", "--config", "w8a8-static", "--calib", str(texts),
        "--json", str(js),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(js.read_text())["calibration"] == str(texts)
    tsv = tmp_path / "calib.tsv"
    tsv.write_text("label\tsentence\n1\tw5 w6\n0\tw7 w8\n")
    assert (
        _bbct(capsys, "run", str(tiny_bert_onnx), "--text", "w5", "--config", "w8a8-static", "--calib", str(tsv))[0]
        == 0
    )
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tother\n1\tw5\n")
    code, _, err = _bbct(
        capsys, "run", str(tiny_bert_onnx), "--text", "w5", "--config", "w8a8-static", "--calib", str(bad)
    )
    assert code == 2 and err.startswith(f"bbct: error: {bad}: a TSV needs a 'sentence' or 'text' column")
    code, _, err = _bbct(capsys, "run", str(tiny_bert_onnx), "--text", "w5", "--config", "w8a8-static", "--calib", "0")
    assert code == 2 and "must be >= 1" in err


def test_comparison_leaves_padding_out(tiny_bert_onnx):
    """Padding positions compute values no output reads: with the mask, a tensor's SQNR is the
    one over its real tokens (checked by hand on the last hidden state)."""
    from bert_exports import tiny_inputs

    fg = load_graph(tiny_bert_onnx)
    g = lower(fg, load_config("w8a8"))
    feeds = tiny_inputs(3, 9)
    res = run(g, feeds, trace=True)
    gold = GoldenRunner(tiny_bert_onnx).run_all(feeds).values
    rows = {r.node: r for r in compare(g, res, gold, mask=feeds["attention_mask"])}
    ln = next(n for n in g.nodes if n.name == "L1.ln2")
    real = feeds["attention_mask"].astype(bool)
    want = sqnr_db(gold[ln.onnx_name][real], res.tensors["L1.ln2"].dequantize()[real])
    assert rows["L1.ln2"].sqnr_db == pytest.approx(want)
    everything = sqnr_db(gold[ln.onnx_name], res.tensors["L1.ln2"].dequantize())
    assert everything != pytest.approx(want)


def test_ops_and_ir_after_each_pass(capsys, tiny_bert_onnx):
    code, out, _ = _bbct(capsys, "ops")
    assert code == 0
    for word in ("LayerNormalization", "Gather", "split_heads", "mean_pool", "l2_normalize"):
        assert word in out
    assert all(f"  {op}" in out for op in ("embedding_sum", "linear", "softmax", "relu", "mean_pool"))
    code, out, _ = _bbct(capsys, "ir", str(tiny_bert_onnx), "--after", "import")
    assert code == 0 and out.startswith("# bbct float graph") and " = layernorm(" in out
    code, out, _ = _bbct(capsys, "ir", str(tiny_bert_onnx), "--after", "roles")
    assert code == 0 and "L1.ffn1" in out and "intermediate" in out
    code, out, _ = _bbct(capsys, "ir", str(tiny_bert_onnx))
    assert code == 0 and out.startswith("# bbct integer IR")


def test_layer_override_beyond_the_model_is_an_error(capsys, tiny_bert_onnx, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "w8a8"\n[layer.99.softmax]\nsoftmax_method = "lut"\n')
    code, _, err = _bbct(capsys, "ir", str(tiny_bert_onnx), "--config", str(cfg))
    assert code == 2 and "[layer.99.softmax]: the model has 2 layers (0..1)" in err


def test_weight_only_int8_tables_are_folded(tiny_bert_onnx, tmp_path):
    """A graph whose weights are int8 initializers dequantized by Cast + Mul (weight-only int8)
    folds those constants before it assigns roles: input_ids stays input_ids, and the tables
    and weights are the dequantized values."""
    m = onnx.load(str(tiny_bert_onnx))
    g = m.graph
    done = 0
    for init in list(g.initializer):
        a = numpy_helper.to_array(init)
        if a.ndim != 2 or a.dtype != np.float32 or min(a.shape) < 2:
            continue
        scale = np.float32(np.abs(a).max() / 127)
        q = np.round(a / scale).astype(np.int8)
        name = init.name
        g.initializer.remove(init)
        g.initializer.extend(
            [numpy_helper.from_array(q, name + "_q"), numpy_helper.from_array(np.array(scale), name + "_s")]
        )
        g.node.insert(0, helper.make_node("Mul", [name + "_f", name + "_s"], [name]))
        g.node.insert(0, helper.make_node("Cast", [name + "_q"], [name + "_f"], to=TensorProto.FLOAT))
        done += 1
    assert done >= 12
    path = tmp_path / "int8w.onnx"
    onnx.save(m, str(path))
    fg = load_graph(path)
    assert fg.role_input("input_ids") == "input_ids" and fg.role_input("attention_mask") == "attention_mask"
    emb = next(n for n in fg.nodes if isinstance(n, F.EmbeddingSum))
    assert emb.tables[0].shape == (100, 32)
    from bert_exports import tiny_inputs

    feeds = tiny_inputs()
    want = GoldenRunner(path).run(feeds)["logits"]
    got = run(lower(fg, load_config("w8a8")), feeds).outputs["logits"].dequantize()
    assert np.abs(got - want).max() < 0.05 * (1 + np.abs(want).max())
