"""Vectors of the real MiniLM-L6 encoder's first layer: every file reads back at its port width,
widths follow the config, and nonlinear saturations are counted. Marked slow; runs in CI."""

import json
import math

import pytest
from test_vectors import read_hex

from bbct.golden.data import read_split
from bbct.simulator.cli import main
from bbct.simulator.config import load_config

pytestmark = pytest.mark.slow


def test_real_encoder_layer0_vectors(real_home, tmp_path, capsys):
    model = real_home / "models" / "minilm-l6-encoder" / "model.onnx"
    texts, _ = read_split(real_home / "data" / "rt-polarity", "test")
    out = tmp_path / "v"
    argv = ["vectors", str(model), "--nodes", "L0.*", "--out", str(out), "--constants", "once"]
    assert main(argv + ["--text", texts[0], "--text", texts[1]]) == 0
    m = json.loads((out / "vectors.json").read_text())
    cfg = load_config("w8a8").default
    for f in m["files"]:
        vals = read_hex(out / f["file"], f["bits"], f["signed"])  # digits and range at the port width
        assert len(vals) == math.prod(f["shape"]), f["file"]
    by = {(f["node"], f["port"], f["input"] if "input" in f else None): f for f in m["files"]}
    ffn1 = by["L0.ffn1.acc", "stored", None]
    assert ffn1["shape"] == [384, 1536] and ffn1["bits"] == cfg.weight_bits and ffn1["layout"].startswith("(K, N)")
    assert by["L0.probs", "out", 0]["bits"] == cfg.softmax_out_bits and not by["L0.probs", "out", 0]["signed"]
    assert by["L0.ffn1.acc", "in0", 1]["bits"] == cfg.act_bits + cfg.act_guard
    assert m["provenance"]["model_sha256"] and [i["texts"] for i in m["inputs"]] == [[texts[0]], [texts[1]]]
    sm = next(n for n in m["nodes"] if n["node"] == "L0.probs")
    assert len(sm["overflow"]) == 2 and sm["overflow_total"] == sum(sm["overflow"])
