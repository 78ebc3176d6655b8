"""Bad input and faults at the command line (tiny random models, not real ones): every case
ends with one line ``bbct: error: ...`` and exit 2, or a correct result — no traceback, no
lost or half-written file, no silent garbage."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from bbct.golden import atomic
from bbct.golden.errors import BbctError
from bbct.simulator.cli import main
from bbct.simulator.config import load_config
from bbct.simulator.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _bbct(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own exits (bad flag values) go through _Parser.error
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("bbct: warning")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("bbct: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


# -- atomic writes ----------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.json"
    atomic.write_json(target, {"ok": 1})

    def half_then_full_disk(f):
        f.write(b'{"half')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BbctError, match=rf"{target}: cannot write: No space left on device"):
        atomic.write_with(target, half_then_full_disk)
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with pytest.raises(BbctError, match="is a folder"):
        atomic.write_text(tmp_path, "x")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BbctError, match=rf"{blocker / 'out.json'}: cannot write"):
        atomic.write_json(blocker / "out.json", {})


def test_json_is_strict():
    text = json.dumps(atomic.json_safe({"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float64(-np.inf)}))
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": None}


def test_run_json_into_a_folder_or_under_a_file(capsys, tiny_bert_onnx, tmp_path):
    code, _, err = _bbct(capsys, "run", str(tiny_bert_onnx), "--text", "w5", "--json", str(tmp_path))
    _one_line_error(code, err, str(tmp_path), "is a folder")
    f = tmp_path / "f"
    f.write_text("x")
    code, _, err = _bbct(capsys, "run", str(tiny_bert_onnx), "--text", "w5", "--json", str(f / "r.json"))
    _one_line_error(code, err, str(f / "r.json"))


def test_run_report_is_strict_json_and_marks_exact_tensors(capsys, tiny_bert_onnx, tmp_path):
    js = tmp_path / "r.json"
    code, _, err = _bbct(capsys, "run", str(tiny_bert_onnx), "--text", "w5 w6", "--json", str(js))
    assert code == 0, err
    rep = json.loads(js.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    for row in rep["layers"]:
        assert (row["sqnr_db"] is None) == row["exact"]


# -- numbers at the edge ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["eval", "--limit", "0"], ["--limit", "must be >= 1"]),
        (["eval", "--limit", "-1"], ["--limit", "must be >= 1"]),
        (["eval", "--batch", "0"], ["--batch", "must be >= 1"]),
        (["run", "--text", "a", "--max-length", "0"], ["--max-length"]),
        (["run", "--text", "a", "--max-length", "1"], ["--max-length", "at least 3"]),
        (["run", "--text", "a", "--threshold", "nan"], ["--threshold", "finite"]),
        (["run", "--text", "a", "--threshold", "x"], ["--threshold", "not a number"]),
        (["run", "--text", "a", "--calib", "-250", "--config", "w8a8-static"], ["--calib -250"]),
    ],
)
def test_bad_numbers_name_the_flag(capsys, tiny_bert_onnx, argv, words):
    code, _, err = _bbct(capsys, argv[0], str(tiny_bert_onnx), *argv[1:])
    _one_line_error(code, err, *words)


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=12))
def test_fuzzed_flag_values_never_trace(value):
    """Any string for the numeric flags: an error line, never a traceback."""
    for flag in ("--limit", "--batch", "--max-length"):
        try:
            main(["eval", "/nonexistent.onnx", flag, value])
        except SystemExit as e:
            assert e.code == 2
        else:  # the value parsed: the missing model is then the error
            pass


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["preset", "default", "op", "layer", "optype", "node", "name", "x"]),
        st.one_of(
            st.integers(-5, 70),
            st.text(max_size=6),
            st.dictionaries(
                st.sampled_from(["weight_bits", "acc_bits", "0", "query", "softmax", "rounding", "L0.*"]),
                st.one_of(
                    st.integers(-3, 70),
                    st.text(max_size=5),
                    st.dictionaries(st.just("weight_bits"), st.integers(0, 40)),
                ),
                max_size=3,
            ),
        ),
        max_size=4,
    )
)
def test_fuzzed_configs_are_accepted_or_refused_by_name(data):
    """Hypothesis over config tables: a config loads, or the error is a ConfigError (one line)."""
    try:
        c = load_config(data)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
    else:
        c.settings("query", 0, "linear", ("L0.q",))


def test_toml_shapes_that_are_not_tables(tmp_path):
    for text, words in (
        ("layer = 5\n", "layer = 5"),
        ("[layer]\n0 = 3\n", "[layer.0] must contain"),
        ("[layer.0]\nquery = 4\n", "[layer.0.query] must be a table"),
        ("op = [1]\n", "op = [1]"),
    ):
        p = tmp_path / "c.toml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=None) as e:
            load_config(p)
        assert words in str(e.value), (text, str(e.value))
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"name = '\xe9'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_config_ranges_are_the_kernels(capsys, tiny_bert_onnx, tmp_path):
    with pytest.raises(ConfigError, match="softmax_lut_addr_bits=13"):
        load_config({"default": {"softmax_lut_addr_bits": 13}})
    with pytest.raises(ConfigError, match="gelu_lut_addr_bits=8 exceeds gelu_in_bits=4"):
        load_config({"preset": "w8a8", "default": {"gelu_in_bits": 4}})
    wide = tmp_path / "wide.toml"
    wide.write_text("[default]\nresidual_bits = 32\n")
    code, _, err = _bbct(capsys, "ir", str(tiny_bert_onnx), "--config", str(wide))
    _one_line_error(code, err, "emb.ln", "lower residual_bits or act_guard")


# -- eval against the task ----------------------------------------------------------------------------
def test_eval_checks_the_logits_against_the_task_and_the_labels(capsys, tiny_bert_onnx, tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence1\tsentence2\tgold_label\nw5\tw6\tneutral\n")
    code, _, err = _bbct(
        capsys, "eval", str(tiny_bert_onnx), "--task", "mnli", "--data", str(tmp_path), "--split", "dev"
    )
    _one_line_error(code, err, "2 logit(s)", "mnli needs 3")
    (tmp_path / "dev.tsv").write_text("sentence1\tsentence2\tscore\nw5\tw6\tnan\n")
    code, _, err = _bbct(
        capsys, "eval", str(tiny_bert_onnx), "--task", "sts-b", "--data", str(tmp_path), "--split", "dev"
    )
    _one_line_error(code, err, "dev.tsv:2", "not a finite number")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n")
    code, _, err = _bbct(
        capsys, "eval", str(tiny_bert_onnx), "--task", "sst-2", "--data", str(tmp_path), "--split", "dev"
    )
    _one_line_error(code, err, "no examples")
    (tmp_path / "dev.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe\t1\n")
    code, _, err = _bbct(
        capsys, "eval", str(tiny_bert_onnx), "--task", "sst-2", "--data", str(tmp_path), "--split", "dev"
    )
    _one_line_error(code, err, "dev.tsv", "not UTF-8")


# -- the float model itself overflows --------------------------------------------------------------
def test_a_non_finite_golden_is_an_error_naming_the_tensor(capsys, tiny_bert_onnx, tmp_path):
    import shutil

    m = onnx.load(str(tiny_bert_onnx))
    for init in m.graph.initializer:  # the embedding LayerNorm's bias: 1e30 (finite, but its square is not)
        a = numpy_helper.to_array(init)
        if a.shape == (32,) and "LayerNorm.bias" in init.name and "embeddings" in init.name:
            init.CopyFrom(numpy_helper.from_array(np.full_like(a, 1e30), init.name))
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    shutil.copy(tiny_bert_onnx.with_name("tokenizer.json"), tmp_path)
    js = tmp_path / "r.json"
    code, _, err = _bbct(capsys, "run", str(path), "--text", "w5 w6", "--json", str(js))
    _one_line_error(code, err)
    assert not js.exists()


# -- vectors: a used folder, an interrupted dump ---------------------------------------------------------
def test_vectors_folder_hygiene(capsys, tiny_bert_onnx, tmp_path, monkeypatch):
    out = tmp_path / "v"
    assert _bbct(capsys, "vectors", str(tiny_bert_onnx), "--text", "w5", "--out", str(out), "--nodes", "L0.*")[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    # a used folder is refused (one line, nothing touched); --force replaces it whole
    code, _, err = _bbct(capsys, "vectors", str(tiny_bert_onnx), "--text", "w5", "--out", str(out), "--nodes", "L1.*")
    _one_line_error(code, err, str(out), "not empty", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    argv = ["vectors", str(tiny_bert_onnx), "--text", "w5", "--out", str(out), "--nodes", "L1.ffn1*", "--force"]
    assert _bbct(capsys, *argv)[0] == 0
    listed = {f["file"] for f in json.loads((out / "vectors.json").read_text())["files"]}
    assert {p.name for p in out.iterdir()} == listed | {"vectors.json", "params.json", "bbct_params.sv"}
    assert not {n for n in listed if n.startswith("L0.")}
    # a dump killed half-way leaves the earlier dump as it was, and no temporary folder
    from bbct.golden import vectors

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = vectors.write_bytes

    def dies(path, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(vectors, "write_bytes", dies)
    with pytest.raises(KeyboardInterrupt):
        main(["vectors", str(tiny_bert_onnx), "--text", "w9", "--out", str(out), "--nodes", "L0.*", "--force"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["v"]
    # --force replaces only an earlier dump: a folder of other files is never removed
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    argv = ["vectors", str(tiny_bert_onnx), "--text", "w5", "--out", str(other), "--force"]
    code, _, err = _bbct(capsys, *argv)
    _one_line_error(code, err, str(other), "no vectors.json")
    assert (other / "mine.txt").read_text() == "keep"


# -- the report does not depend on the BLAS thread count ------------------------------------------------
def test_run_report_is_byte_identical_across_thread_counts(tiny_bert_onnx, tmp_path):
    reports = []
    for threads in ("1", "2"):
        js = tmp_path / f"r{threads}.json"
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads}
        cmd = [sys.executable, "-m", "bbct", "run", str(tiny_bert_onnx), "--text", "w5 w6 w7", "--text", "w8"]
        out = subprocess.run(cmd + ["--json", str(js)], capture_output=True, text=True, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        reports.append((out.stdout.replace(str(js), "REPORT"), js.read_bytes()))
    assert reports[0] == reports[1]


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["sst-2", "mrpc", "sts-b", "mnli", "cola"]),
    st.lists(
        st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8), max_size=5), max_size=5
    ),
)
def test_fuzzed_tsv_contents_are_read_or_refused_by_line(task, rows):
    """Hypothesis over TSV contents: examples come back, or a BbctError names the file (and line)."""
    import tempfile

    from bbct.simulator.tasks import get_task, read_tsv

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "dev.tsv"
        p.write_text("\n".join("\t".join(r) for r in rows), encoding="utf-8")
        try:
            ex = read_tsv(get_task(task), p)
        except BbctError as e:
            assert str(e).startswith(str(p)) and "\n" not in str(e)
        else:
            assert all(np.isfinite(e.label) for e in ex)


@pytest.mark.parametrize("command", ["run", "eval", "vectors", "ir"])
def test_help_describes_the_command_its_defaults_and_the_formats(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    head = out.split("positional arguments")[0]
    assert len(head.splitlines()) >= 4  # usage, then a description of what the command does
    assert "(default: w8a8)" in out and "(default: 64)" in out  # --config, --max-length
    assert "Formats in the tables" in out and "b32@-1" in out


def test_eval_needs_a_logits_output(capsys, export_dir, tmp_path):
    from families import export_family

    enc = export_family(export_dir / "families", "bert", "base", "torchscript", 17)
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nw5 w6\t1\n")
    code, _, err = _bbct(capsys, "eval", str(enc), "--task", "sst-2", "--data", str(tmp_path))
    _one_line_error(code, err, "eval needs a classifier with a logits output", "last_hidden_state")
