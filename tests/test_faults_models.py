"""Adversarial models at the command line: the tiny random BERT (never a real model) edited
into what bbct must refuse — non-finite and huge weights, external data outside the model's
folder, broken files, graphs that are not encoders, a position table shorter than the input —
and killed writers. Every case ends with exactly one line ``bbct: error: ...`` naming the
file, node or value and exit 2, or with a correct result; never a traceback, never garbage."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bbct.golden import atomic
from bbct.simulator.cli import main

ROOT = Path(__file__).resolve().parents[1]
SEVEN = "w5 w6 w7 w8 w9"  # [CLS] + 5 words + [SEP]: 7 tokens


def _bbct(capfd, *argv: str) -> tuple[int, str, str]:
    """In process; ``capfd`` also catches what onnxruntime's C++ logger writes to fd 2, and the
    Python warnings a command line would print (numpy's RuntimeWarnings) are added to stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=quiet)  # as Python's default filters
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    out, err = capfd.readouterr()
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return code, out, err


def _one_line_error(code: int, err: str, *words: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("bbct: warning")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("bbct: error: "), (code, err)
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _ok(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("bbct: warning")]
    assert code == 0 and not lines, (code, err)


# -- model surgery ----------------------------------------------------------------------------------
def _init(m: onnx.ModelProto, node_part: str, k: int = 0) -> onnx.TensorProto:
    """The k-th initializer input of the node whose name contains ``node_part``."""
    inits = {i.name: i for i in m.graph.initializer}
    (node,) = [n for n in m.graph.node if node_part in n.name]
    return inits[[t for t in node.input if t in inits][k]]


def _set(node_part: str, k: int, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[onnx.ModelProto], str]:
    """An edit replacing one initializer by ``fn`` of its value; returns the initializer's name."""

    def edit(m: onnx.ModelProto) -> str:
        init = _init(m, node_part, k)
        init.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(init).copy()), init.name))
        return init.name

    return edit


def _first(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def fn(a: np.ndarray) -> np.ndarray:
        a.flat[0] = value
        return a

    return fn


def _full(value: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: np.full_like(a, value)


@pytest.fixture(scope="module")
def variant(tiny_bert_onnx, tmp_path_factory):
    """``variant(name, edit)``: the tiny BERT edited by ``edit(model)`` (its return value is
    kept as ``.edited``), saved in its own folder with the tokenizer.json beside it."""
    root = tmp_path_factory.mktemp("variants")
    made: dict[str, tuple[Path, object]] = {}

    def make(name: str, edit: Callable[[onnx.ModelProto], object]) -> tuple[Path, object]:
        if name not in made:
            m = onnx.load(str(tiny_bert_onnx))
            res = edit(m)
            d = root / name
            d.mkdir()
            onnx.save(m, str(d / "model.onnx"))
            shutil.copy(tiny_bert_onnx.with_name("tokenizer.json"), d)
            made[name] = (d / "model.onnx", res)
        return made[name]

    return make


def _save_graph(folder: Path, graph: onnx.GraphProto, tokenizer: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(folder / "model.onnx"))
    shutil.copy(tokenizer, folder)
    return folder / "model.onnx"


# -- 1, 2. non-finite weights ---------------------------------------------------------------------------
NON_FINITE = [
    ("nan-query-weight", "layer.0/attention/self/query/MatMul", 0, _first(np.nan), "nan"),
    ("nan-word-table", "word_embeddings/Gather", 0, _first(np.nan), "nan"),
    ("inf-ln-gamma", "layer.0/attention/output/LayerNorm/LayerNormalization", 0, _first(np.inf), "inf"),
    ("inf-emb-ln-beta", "embeddings/LayerNorm/LayerNormalization", 1, _first(-np.inf), "-inf"),
    ("inf-query-bias", "layer.0/attention/self/query/Add", 0, _first(np.inf), "inf"),
    ("inf-classifier-bias", "/m/classifier/Gemm", 1, _first(np.inf), "inf"),
]


@pytest.mark.parametrize("name, node, k, fn, shown", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_weights_are_refused_naming_the_initializer_and_node(capfd, variant, name, node, k, fn, shown):
    path, init = variant(name, _set(node, k, fn))
    for argv in (["run", str(path), "--text", "w5 w6"], ["ir", str(path)], ["ir", str(path), "--after", "import"]):
        code, _, err = _bbct(capfd, *argv)
        _one_line_error(code, err, str(path), repr(init), node, f"holds {shown}", "non-finite")


# -- 3. huge but finite weights -------------------------------------------------------------------------
HUGE = [
    ("huge-query-weight", "layer.0/attention/self/query/MatMul", 0, _full(1e30), None),
    ("huge-ln-gamma", "layer.0/attention/output/LayerNorm/LayerNormalization", 0, _full(1e30), None),
    ("huge-classifier-weight", "/m/classifier/Gemm", 0, _first(1e30), None),
    ("huge-word-table", "word_embeddings/Gather", 0, _full(1e30), None),
    ("huge-query-bias", "layer.0/attention/self/query/Add", 0, _full(1e30), ["L0.q"]),
    # float32 itself overflows: the golden's first infinite tensor is named, nothing else on stderr
    ("f32max-ffn1-weight", "layer.0/intermediate/dense/MatMul", 0, _full(3e38), ["intermediate/dense", "inf"]),
    # ... and when the overflow breaks a pattern (GELU of inf), the overflow is the error, not the pattern
    ("f32max-ffn1-bias", "layer.0/intermediate/dense/Add", 0, _full(3e38), ["overflows", "intermediate_act_fn"]),
]


@pytest.mark.parametrize("name, node, k, fn, words", HUGE, ids=[c[0] for c in HUGE])
def test_huge_finite_weights_give_an_error_or_an_honest_result(capfd, variant, tmp_path, name, node, k, fn, words):
    path, _ = variant(name, _set(node, k, fn))
    js = tmp_path / "r.json"
    code, _, err = _bbct(capfd, "run", str(path), "--text", "w5 w6", "--text", "w7", "--json", str(js))
    if words is not None:
        _one_line_error(code, err, *words)
        assert not js.exists()
        return
    if code != 0:  # refusing is allowed, by one line
        _one_line_error(code, err)
        return
    _ok(code, err)
    rep = json.loads(js.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    f, q = np.array(rep["outputs"]["logits"]["float"]), np.array(rep["outputs"]["logits"]["int"])
    assert np.isfinite(f).all() and np.isfinite(q).all()
    for row in rep["layers"]:
        assert (row["sqnr_db"] is None) == row["exact"]
    close = np.abs(q - f).max() <= 0.05 * np.abs(f).max() + 1e-3
    assert close or rep["overflow_count"] > 0 or rep["first_below"] is not None, rep["outputs"]


# -- 4. external data -----------------------------------------------------------------------------------
def _external(location: str) -> Callable[[onnx.ModelProto], str]:
    """The first query weight's data moved to ``location`` (nothing written there)."""

    def edit(m: onnx.ModelProto) -> str:
        init = _init(m, "layer.0/attention/self/query/MatMul")
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(32 * 32 * 4))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
        return init.name

    return edit


@pytest.mark.parametrize(
    "name, location, words",
    [
        ("ext-parent", "../../etc/passwd", ["points outside"]),
        ("ext-absolute", "/etc/passwd", ["absolute path"]),
        ("ext-missing", "weights.bin", ["weights.bin"]),
        ("ext-symlink", "link.bin", ["symbolic link"]),
    ],
)
def test_external_data_outside_the_folder_or_missing_is_refused(capfd, variant, tmp_path, name, location, words):
    path, init = variant(name, _external(location))
    if name == "ext-symlink" and not (path.parent / location).is_symlink():
        os.symlink("/etc/passwd", path.parent / location)  # inside the folder by name, outside by target
    for argv in (["run", str(path), "--text", "w5"], ["golden", str(path), "--text", "w5", "--out", str(tmp_path)]):
        code, _, err = _bbct(capfd, *argv)
        _one_line_error(code, err, str(path), "external data", init, *words)
    assert not any(tmp_path.iterdir())


def test_external_data_inside_the_folder_works(capfd, tiny_bert_onnx, tmp_path):
    m = onnx.load(str(tiny_bert_onnx))
    onnx.save(m, str(tmp_path / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    shutil.copy(tiny_bert_onnx.with_name("tokenizer.json"), tmp_path)
    code, out, err = _bbct(capfd, "run", str(tmp_path / "model.onnx"), "--text", "w5 w6")
    _ok(code, err)
    code, ref, err = _bbct(capfd, "run", str(tiny_bert_onnx), "--text", "w5 w6")
    assert out == ref


# -- 5. broken files ------------------------------------------------------------------------------------
def test_broken_files_are_one_line_naming_the_path(capfd, tiny_bert_onnx, tmp_path):
    data = tiny_bert_onnx.read_bytes()
    shutil.copy(tiny_bert_onnx.with_name("tokenizer.json"), tmp_path)
    cases = {
        "truncated.onnx": (data[: len(data) // 2], "not an ONNX model"),
        "tail-cut.onnx": (data[:-3], "not an ONNX model"),
        "zero.onnx": (b"", "empty file"),
        "text.onnx": (b"this is a text file, not a model\n", "not an ONNX model"),
    }
    for name, (content, what) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        for argv in (
            ["run", str(p), "--text", "w5"],
            ["ir", str(p), "--after", "import"],
            ["golden", str(p), "--text", "w5", "--out", str(tmp_path / "g")],
            ["vectors", str(p), "--text", "w5", "--out", str(tmp_path / "v")],
        ):
            code, _, err = _bbct(capfd, *argv)
            _one_line_error(code, err, str(p), what)
    folder = tiny_bert_onnx.parent
    for argv in (["run", str(folder), "--text", "w5"], ["golden", str(folder), "--text", "w5", "--out", str(tmp_path)]):
        code, _, err = _bbct(capfd, *argv)
        _one_line_error(code, err, str(folder), "is a folder", str(tiny_bert_onnx))
    assert not (tmp_path / "g").exists() and not (tmp_path / "v").exists()


def test_a_model_without_tokenizer_json_is_one_line(capfd, tiny_bert_onnx, tmp_path):
    lone = tmp_path / "lone" / "model.onnx"
    lone.parent.mkdir()
    shutil.copy(tiny_bert_onnx, lone)
    for argv in (
        ["run", str(lone), "--text", "w5"],
        ["ir", str(lone)],
        ["golden", str(lone), "--text", "w5", "--out", str(tmp_path / "g")],
        ["vectors", str(lone), "--text", "w5", "--out", str(tmp_path / "v")],
    ):
        code, _, err = _bbct(capfd, *argv)
        _one_line_error(code, err, "no tokenizer.json beside", str(lone))
    assert not (tmp_path / "g").exists() and not (tmp_path / "v").exists()


# -- 6. graphs that are not BERT-family encoders --------------------------------------------------------
def _weights(name: str, shape: tuple[int, ...], seed: int = 0) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).normal(0, 0.1, shape).astype(np.float32), name)


IDS = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])]


def _logits(shape: list) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)]


NOT_ENCODERS = {
    # the ids cast to float through a MatMul+Relu MLP: no embedding lookup at all (before the fix:
    # onnxruntime's MatMul failure on the import probe, as a traceback)
    "mlp": (
        helper.make_graph(
            [
                helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT, name="cast"),
                helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                helper.make_node("Relu", ["h"], ["r"], name="relu"),
                helper.make_node("MatMul", ["r", "W2"], ["logits"], name="mm2"),
            ],
            "mlp",
            IDS,
            _logits(["b", 2]),
            [_weights("W1", (7, 16)), _weights("W2", (16, 2))],
        ),
        ["graph output 'logits'", "not an encoder"],
    ),
    "conv": (
        helper.make_graph(
            [
                helper.make_node("Gather", ["E", "input_ids"], ["e"], name="emb"),
                helper.make_node("Transpose", ["e"], ["t"], perm=[0, 2, 1], name="tr"),
                helper.make_node("Conv", ["t", "K"], ["c"], name="conv1", kernel_shape=[3], pads=[1, 1]),
                helper.make_node("ReduceMean", ["c"], ["logits"], axes=[2], keepdims=0, name="pool"),
            ],
            "cnn",
            IDS,
            _logits(["b", 2]),
            [_weights("E", (100, 16)), _weights("K", (2, 16, 3))],
        ),
        ["node 'conv1' (Conv)", "not supported"],
    ),
    "image": (
        helper.make_graph(
            [helper.make_node("Conv", ["x", "K"], ["logits"], name="conv0", kernel_shape=[3, 3])],
            "image",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
            _logits([1, 4, 6, 6]),
            [_weights("K", (4, 3, 3, 3))],
        ),
        ["not an encoder"],
    ),
    "mlp-on-embeddings": (
        helper.make_graph(
            [
                helper.make_node("Gather", ["E", "input_ids"], ["e"], name="emb"),
                helper.make_node("MatMul", ["e", "W1"], ["h"], name="mm1"),
                helper.make_node("Relu", ["h"], ["r"], name="relu"),
                helper.make_node("ReduceMean", ["r"], ["p"], axes=[1], keepdims=0, name="pool"),
                helper.make_node("MatMul", ["p", "W2"], ["logits"], name="mm2"),
            ],
            "mlp2",
            IDS,
            _logits(["b", 2]),
            [_weights("E", (100, 16)), _weights("W1", (16, 16)), _weights("W2", (16, 2))],
        ),
        ["node 'pool' (ReduceMean)"],
    ),
    "no-attention": (
        helper.make_graph(
            [
                helper.make_node("Gather", ["E", "input_ids"], ["e"], name="emb"),
                helper.make_node("LayerNormalization", ["e", "G", "B"], ["logits"], name="ln", axis=-1),
            ],
            "noattn",
            IDS,
            _logits(["b", "s", 16]),
            [_weights("E", (100, 16)), _weights("G", (16,)), _weights("B", (16,))],
        ),
        ["no attention", "not an encoder"],
    ),
}


@pytest.mark.parametrize("name", list(NOT_ENCODERS))
def test_graphs_that_are_not_encoders_are_refused(capfd, tiny_bert_onnx, tmp_path, name):
    graph, words = NOT_ENCODERS[name]
    path = _save_graph(tmp_path / name, graph, tiny_bert_onnx.with_name("tokenizer.json"))
    for argv in (["run", str(path), "--text", "w5 w6"], ["vectors", str(path), "--text", "w5", "--out", str(tmp_path)]):
        code, _, err = _bbct(capfd, *argv)
        _one_line_error(code, err, *words)


# -- 7, 8. a position table shorter than the input --------------------------------------------------------
@pytest.fixture(scope="module")
def four_positions(variant) -> Path:
    """The tiny BERT with its position table cut to 4 rows (before the fix its import probes,
    at 5 and 7 tokens, failed in onnxruntime with a traceback, even for a 3-token input)."""
    return variant("four-positions", _set("position_embeddings/Gather", 0, lambda a: a[:4]))[0]


def test_a_sequence_longer_than_the_positions_is_refused_naming_the_limit(capfd, four_positions, tmp_path):
    for argv in (
        ["run", str(four_positions), "--text", SEVEN],
        ["vectors", str(four_positions), "--text", SEVEN, "--out", str(tmp_path / "v")],
    ):
        code, _, err = _bbct(capfd, *argv)
        _one_line_error(code, err, "sequence length 7 exceeds the model's 4 positions")
    assert not (tmp_path / "v").exists()
    js = tmp_path / "r.json"  # what fits runs, and matches the float model
    code, _, err = _bbct(capfd, "run", str(four_positions), "--text", "w5 w6", "--text", "w7", "--json", str(js))
    _ok(code, err)
    rep = json.loads(js.read_text())
    f, q = np.array(rep["outputs"]["logits"]["float"]), np.array(rep["outputs"]["logits"]["int"])
    assert np.abs(q - f).max() <= 0.05 * np.abs(f).max() and rep["overflow_count"] == 0


def test_golden_of_a_sequence_longer_than_the_positions_is_one_line(capfd, four_positions, tiny_bert_onnx, tmp_path):
    code, _, err = _bbct(capfd, "golden", str(four_positions), "--text", SEVEN, "--out", str(tmp_path / "g"))
    _one_line_error(code, err, str(four_positions), "(1, 7)", "position_embeddings/Gather", "out of data bounds")
    assert "ONNXRuntimeError" not in err and not (tmp_path / "g").exists()
    code, _, err = _bbct(capfd, "golden", str(four_positions), "--text", "w5 w6", "--out", str(tmp_path / "g"))
    _ok(code, err)
    assert _golden_state(tmp_path / "g") == "valid"
    long = " ".join(f"w{5 + i}" for i in range(70))  # 72 tokens for the unedited model's 64 positions
    for argv in (["run", str(tiny_bert_onnx)], ["golden", str(tiny_bert_onnx), "--out", str(tmp_path / "l")]):
        code, _, err = _bbct(capfd, *argv, "--text", long, "--max-length", "100")
        _one_line_error(code, err, *(["72 exceeds the model's 64 positions"] if argv[0] == "run" else ["(1, 72)"]))
    assert not (tmp_path / "l").exists()
    # through a real process too: onnxruntime's own logger writes nothing to stderr
    cmd = [sys.executable, "-m", "bbct", "golden", str(four_positions), "--text", SEVEN, "--out", str(tmp_path / "h")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120)
    _one_line_error(p.returncode, p.stderr, "position_embeddings/Gather")


# -- 9. kill -9 while writing -------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _vectors_state(out: Path) -> str:
    """``absent`` (no manifest: nothing in the folder is valid data) or ``valid``; anything
    else fails: a manifest must list only whole files, each with its recorded sha256."""
    man = out / "vectors.json"
    if not man.exists():
        return "absent"
    m = json.loads(man.read_text())
    assert m["files"]
    for f in m["files"]:
        assert not f["file"].startswith(atomic.TMP_PREFIX) and "/" not in f["file"], f
        p = out / f["file"]
        assert p.is_file() and _sha(p) == f["sha256"], f["file"]
        if p.suffix == ".hex":
            assert len(p.read_text().splitlines()) == int(np.prod(f["shape"])), f["file"]
    return "valid"


def _golden_state(out: Path) -> str:
    """``absent`` (no index.json) or ``valid``: the index describes golden.npz exactly — every
    key, shape and dtype, and the token ids of the texts it names."""
    index_path = out / "index.json"
    if not index_path.exists():
        return "absent"
    from bbct.golden.tokenize import encode, find_tokenizer

    index = json.loads(index_path.read_text())
    rows = {**index["tensors"], **index["inputs"]}
    with np.load(out / "golden.npz") as z:
        assert set(z.files) == {r["key"] for r in rows.values()}
        for name, r in rows.items():
            assert list(z[r["key"]].shape) == r["shape"] and str(z[r["key"]].dtype) == r["dtype"], name
        ids = encode(find_tokenizer(index["model"]), index["texts"], max_length=64)["input_ids"]
        assert np.array_equal(z["input.input_ids"], ids)
    return "valid"


def _popen(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bbct", *argv], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float = 0.0, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()``; True if it was still running then."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end and not ready():
        time.sleep(0.002)
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    return proc.returncode == -signal.SIGKILL


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(atomic.TMP_PREFIX)]


def test_vectors_killed_while_writing_then_rerun(capfd, tiny_bert_onnx, tmp_path):
    out = tmp_path / "v"
    # an older complete dump of another text: a killed dump must leave it exactly as it was
    code, _, err = _bbct(capfd, "vectors", str(tiny_bert_onnx), "--text", "w9", "--out", str(out))
    _ok(code, err)
    old = (out / "vectors.json").read_bytes()
    argv = ("vectors", str(tiny_bert_onnx), "--text", "w5 w6 w7", "--text", "w8", "--out", str(out), "--force")
    proc = _popen(*argv)
    # the dump writes its ~470 files into a temporary folder beside OUT, then renames it
    killed = _kill_when(proc, lambda: bool(_leftovers(tmp_path)), delay=0.1)
    assert killed, "the dump ended before it could be killed"
    assert _vectors_state(out) == "valid" and (out / "vectors.json").read_bytes() == old
    code, _, err = _bbct(capfd, *argv)
    _ok(code, err)
    assert _vectors_state(out) == "valid" and not _leftovers(tmp_path)  # the killed dump's folder is gone
    m = json.loads((out / "vectors.json").read_text())
    assert m["inputs"][0]["texts"] == ["w5 w6 w7", "w8"]
    assert "mask.in0.hex" in {f["file"] for f in m["files"]}  # all nodes, the float attention mask's flags too


KILLER = r"""
import fnmatch, os, signal, sys
from contextlib import contextmanager
from pathlib import Path
from bbct.golden import atomic

when, pattern, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, seen = atomic.atomic_open, [0]

@contextmanager
def atomic_open(path):
    hit = fnmatch.fnmatch(Path(path).name, pattern)
    seen[0] += hit
    hit = hit and seen[0] == nth
    if hit and when == "before":  # nothing of this file written yet
        os.kill(os.getpid(), signal.SIGKILL)
    with real(path) as f:
        yield f
        if hit and when == "unrenamed":  # all of it in the temporary file, not yet renamed
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    if hit and when == "after":  # renamed into place, nothing after it done
        os.kill(os.getpid(), signal.SIGKILL)

atomic.atomic_open = atomic_open
from bbct.simulator.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _killed_at(when: str, pattern: str, nth: int, *argv: str) -> None:
    cmd = [sys.executable, "-c", KILLER, when, pattern, str(nth), *argv]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]


@pytest.mark.parametrize(
    "when, pattern, nth",
    [("unrenamed", "*.hex", 7), ("unrenamed", "vectors.json", 1)],
)
def test_vectors_killed_at_each_step_then_rerun(capfd, tiny_bert_onnx, tmp_path, when, pattern, nth):
    out = tmp_path / "v"
    code, _, err = _bbct(capfd, "vectors", str(tiny_bert_onnx), "--text", "w9", "--out", str(out), "--nodes", "L0.*")
    _ok(code, err)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ("vectors", str(tiny_bert_onnx), "--text", "w5 w6", "--out", str(out), "--force")
    _killed_at(when, pattern, nth, *argv)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # the earlier dump, untouched
    code, _, err = _bbct(capfd, *argv)
    _ok(code, err)
    assert _vectors_state(out) == "valid" and not _leftovers(tmp_path)


def test_golden_killed_while_writing_then_rerun(capfd, tiny_bert_onnx, tmp_path):
    out = tmp_path / "g"
    proc = _popen("golden", str(tiny_bert_onnx), "--text", "w5 w6 w7", "--out", str(out))
    _kill_when(proc, lambda: out.is_dir() and any(out.iterdir()))  # if the process wins the race: whole files
    assert _golden_state(out) in ("absent", "valid")
    assert not (out / "index.json").exists() or (out / "golden.npz").exists()
    code, _, err = _bbct(capfd, "golden", str(tiny_bert_onnx), "--text", "w5 w6 w7", "--out", str(out))
    _ok(code, err)
    assert _golden_state(out) == "valid"


@pytest.mark.parametrize(
    "when, pattern",
    [
        ("unrenamed", "golden.npz"),
        ("after", "index.json"),
        ("before", "index.json"),
    ],
)
def test_golden_over_an_older_one_killed_at_each_step(capfd, tiny_bert_onnx, tmp_path, when, pattern):
    out = tmp_path / "g"
    code, _, err = _bbct(capfd, "golden", str(tiny_bert_onnx), "--text", "w9", "--out", str(out))
    _ok(code, err)
    _killed_at(when, pattern, 1, "golden", str(tiny_bert_onnx), "--text", "w5 w6 w7 w8", "--out", str(out))
    assert _golden_state(out) in ("absent", "valid")
    code, _, err = _bbct(capfd, "golden", str(tiny_bert_onnx), "--text", "w5 w6 w7 w8", "--out", str(out))
    _ok(code, err)
    assert _golden_state(out) == "valid"
