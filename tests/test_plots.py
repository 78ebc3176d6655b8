"""bbct eval's report (flips, paired interval of the drop, per-layer SQNR, provenance) and
plots, on your own 3-class data with a tiny random BERT; bbct run --plot."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from bert_exports import export_tiny

from bbct.simulator.cli import main
from bbct.simulator.explore.plots import eval_plot, layers_plot
from bbct.simulator.explore.report import binom_cdf, clopper_pearson, mcnemar

LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def tiny3(export_dir) -> Path:
    """A tiny random 3-class BERT with weights wide enough (std 0.2) that its logits vary."""
    return export_tiny(export_dir, num_labels=3, init_range=0.2)


def _rows(n: int = 48, seed: int = 1) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [(" ".join(f"w{j}" for j in rng.integers(5, 100, rng.integers(2, 12))), LABELS[i % 3]) for i in range(n)]


def _png_size(p: Path) -> tuple[int, int]:
    b = p.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR"
    return struct.unpack(">II", b[16:24])


def test_eval_report_on_a_three_class_tsv(tiny3, tmp_path, capsys):
    data = tmp_path / "mine.tsv"
    data.write_text("text\tsentiment\n" + "".join(f"{t}\t{y}\n" for t, y in _rows()))
    cfg = tmp_path / "w2.toml"
    cfg.write_text("[default]\nweight_bits = 2\nweight_block = 64\n")  # coarse enough to flip classes
    js, png = tmp_path / "e.json", tmp_path / "e.png"
    args = ["eval", str(tiny3), "--data", str(data), "--text-col", "text", "--label-col", "sentiment"]
    args += ["--labels", ",".join(LABELS), "--config", str(cfg), "--json", str(js), "--plot", str(png)]
    assert main(args) == 0
    e = json.loads(js.read_text())
    assert e["examples"] == 48 and e["task"] == "user"
    assert sum(e["overflow_by_node"].values()) == e["overflow_count"]  # the total is read node by node
    fl, il = np.array(e["logits"]["float"]), np.array(e["logits"]["int"])
    fp, ip = fl.argmax(1), il.argmax(1)
    labels = np.array([LABELS.index(y) for _, y in _rows()])
    # flips are exactly the examples whose argmax differs, with both scores and class names
    flips = e["flipped"]
    assert [f["index"] for f in flips] == list(np.flatnonzero(fp != ip)) and len(flips) > 0
    for f in flips:
        assert f["float_class"] == LABELS[fp[f["index"]]] and f["int_class"] == LABELS[ip[f["index"]]]
        assert f["float_logits"] == e["logits"]["float"][f["index"]]
        assert f["text"] == _rows()[f["index"]][0]
    conf = np.array(e["disagreement_confusion"]["counts"])
    assert conf.sum() == 48 and conf.sum() - np.trace(conf) == len(flips)
    assert e["agreement"] == pytest.approx(1 - len(flips) / 48)
    assert e["float_accuracy"] == pytest.approx(np.mean(fp == labels))
    assert e["int_accuracy"] == pytest.approx(np.mean(ip == labels))
    # the paired interval: discordant counts recomputed here, the interval contains the drop
    ci = e["drop_ci95"]
    assert ci["float_right_int_wrong"] == int(np.sum((fp == labels) & (ip != labels)))
    assert ci["float_wrong_int_right"] == int(np.sum((fp != labels) & (ip == labels)))
    lo, hi = ci["ci95_points"]
    assert lo <= e["drop_points"] <= hi
    blo, bhi = e["drop_ci95_bootstrap"]["ci95_points"]
    assert blo <= e["drop_points"] <= bhi
    # per-layer SQNR over every example of the split, and where the numbers came from
    assert e["layers_over"].startswith("48 examples") and len(e["layers"]) > 20
    assert e["worst_layer_sqnr_db"] == min(r["sqnr_db"] for r in e["layers"] if r["sqnr_db"] is not None)
    prov = e["provenance"]
    assert prov["model_sha256"] == hashlib.sha256(Path(tiny3).read_bytes()).hexdigest()
    assert prov["bbct_version"] and "bbct_commit" in prov
    # the plot: a PNG of the expected size, drawn from the JSON the command wrote
    assert _png_size(png) == (1100, 500)
    eval_plot(e, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == png.read_bytes()
    out = capsys.readouterr().out
    assert "changed class" in out and "drop 95% interval" in out


def test_user_task_routes_and_errors(tiny3, tmp_path, capsys):
    rows = _rows(12)
    csv_file = tmp_path / "mine.csv"  # a CSV with a quoted comma in a text
    csv_file.write_text("id,review,label\n" + "".join(f'{i},"{t}, w7",{y}\n' for i, (t, y) in enumerate(rows)))
    task = tmp_path / "sent3.toml"
    task.write_text('name = "sent3"\ntext = "review"\nlabel = "label"\nlabels = ["neg", "neu", "pos"]\n')
    js = tmp_path / "t.json"
    assert main(["eval", str(tiny3), "--task", str(task), "--data", str(csv_file), "--json", str(js)]) == 0
    e = json.loads(js.read_text())
    assert e["task"] == "sent3" and e["examples"] == 12 and e["flipped"] is not None
    # the same data under the command-line columns gives the same numbers
    js2 = tmp_path / "t2.json"
    args = ["eval", str(tiny3), "--data", str(csv_file), "--text-col", "review", "--labels", "neg,neu,pos"]
    assert main(args + ["--json", str(js2)]) == 0
    assert json.loads(js2.read_text())["logits"] == e["logits"]

    def err(*a):
        code = main(["eval", str(tiny3), *a])
        return code, capsys.readouterr().err

    two = tmp_path / "two.tsv"
    two.write_text("review\tlabel\nw5 w6\tneg\nw7\tpos\n")
    code, msg = err("--data", str(two), "--text-col", "review", "--labels", "neg,pos")
    assert code == 2 and "3 logit(s)" in msg and "needs 2" in msg
    code, msg = err("--data", str(csv_file), "--text-col", "review", "--labels", "neg,pos")
    assert code == 2 and "mine.csv:3: label 'neu' not one of ('neg', 'pos')" in msg
    code, msg = err("--data", str(csv_file), "--text-col", "review", "--labels", "neg,neu,good")
    assert code == 2 and "mine.csv:" in msg and "'pos' not one of" in msg
    code, msg = err("--data", str(csv_file), "--text-col", "nope", "--labels", "neg,neu,pos")
    assert code == 2 and "column 'nope' missing" in msg
    code, msg = err("--data", str(csv_file), "--text-col", "review", "--labels", "a,b,c", "--regression")
    assert code == 2 and "not both" in msg
    bad = tmp_path / "bad.toml"
    bad.write_text('text = "review"\nlabelz = 1\n')
    code, msg = err("--task", str(bad), "--data", str(csv_file))
    assert code == 2 and "unknown key(s) ['labelz']" in msg


def test_run_plot_draws_each_config_from_its_json(tiny_bert_onnx, tmp_path, capsys):
    cfg = tmp_path / "w3.toml"
    cfg.write_text("[default]\nweight_bits = 3\nact_bits = 4\n")
    base = ["run", str(tiny_bert_onnx), "--text", "w5 w6 w7", "--text", "w8 w9", "--threshold", "25"]
    assert main(base + ["--config", str(cfg), "--json", str(tmp_path / "a.json")]) == 0
    png = tmp_path / "r.png"
    assert (
        main(base + ["--json", str(tmp_path / "b.json"), "--compare", str(tmp_path / "a.json"), "--plot", str(png)])
        == 0
    )
    assert _png_size(png) == (1100, 700)
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    assert a["first_below"] is not None  # 3-bit weights and 4-bit activations fall below 25 dB
    layers_plot([b, a], tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == png.read_bytes()
    assert main(base + ["--plot", str(png), "--compare", str(tmp_path / "nope.json")]) == 2
    assert "--compare" in capsys.readouterr().err


@pytest.mark.parametrize("b, m", [(0, 0), (0, 5), (3, 3), (7, 20), (30, 47), (400, 700)])
def test_clopper_pearson_and_binomial_against_scipy(b, m):
    stats = pytest.importorskip("scipy.stats")
    lo, hi = clopper_pearson(b, m)
    want_lo = 0.0 if b == 0 else stats.beta.ppf(0.025, b, m - b + 1)
    want_hi = 1.0 if b == m else stats.beta.ppf(0.975, b + 1, m - b)
    assert lo == pytest.approx(want_lo, abs=1e-9) and hi == pytest.approx(want_hi, abs=1e-9)
    if m:
        assert binom_cdf(b, m, 0.5) == pytest.approx(stats.binom.cdf(b, m, 0.5), rel=1e-9, abs=1e-300)


def test_mcnemar_by_hand():
    # 10 sentences: float right on 0..7, integer right on 0..5 and 8: b = 2 (6, 7), c = 1 (8)
    y = np.zeros(10, int)
    f = np.array([0] * 8 + [1, 1])
    q = np.array([0] * 6 + [1, 1, 0, 1])
    r = mcnemar(y, f, q)
    assert (r["float_right_int_wrong"], r["float_wrong_int_right"]) == (2, 1)
    assert r["drop_points"] == pytest.approx(10.0)
    assert r["p_value"] == pytest.approx(1.0)  # 2 * P(X <= 1 | 3, 1/2) = 2 * 4/8, capped at 1
    lo, hi = r["ci95_points"]
    assert lo < 0 < 10 < hi
