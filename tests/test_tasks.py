"""GLUE-format task readers and metrics on small TSVs written here."""

import numpy as np
import pytest

from bbct.simulator.errors import BbctError
from bbct.simulator.tasks import get_task, metric, predictions, read_tsv


def _write(p, rows):
    p.write_text("".join("\t".join(r) + "\n" for r in rows))
    return p


def test_sst2_and_pair_tasks(tmp_path):
    sst = _write(tmp_path / "sst.tsv", [["sentence", "label"], ["a fine film", "1"], ["dull", "0"]])
    ex = read_tsv(get_task("SST-2"), sst)
    assert [(e.text_a, e.text_b, e.label) for e in ex] == [("a fine film", None, 1.0), ("dull", None, 0.0)]
    rte = _write(
        tmp_path / "rte.tsv",
        [
            ["index", "sentence1", "sentence2", "label"],
            ["0", "A man sleeps.", "A person rests.", "entailment"],
            ["1", "It rains.", "It is dry.", "not_entailment"],
        ],
    )
    ex = read_tsv(get_task("rte"), rte)
    assert ex[1].text_b == "It is dry." and ex[1].label == 1.0
    mnli = _write(tmp_path / "mnli.tsv", [["sentence1", "sentence2", "gold_label"], ["x", "y", "neutral"]])
    assert read_tsv(get_task("mnli"), mnli)[0].label == 2.0
    cola = _write(tmp_path / "cola.tsv", [["gj04", "1", "", "Our friends won't buy this analysis."]])
    assert read_tsv(get_task("cola"), cola)[0].text_a.startswith("Our friends")
    sts = _write(tmp_path / "sts.tsv", [["sentence1", "sentence2", "score"], ["a", "b", "3.8"]])
    assert read_tsv(get_task("sts-b"), sts)[0].label == pytest.approx(3.8)


def test_reader_errors_name_file_line_and_value(tmp_path):
    bad = _write(tmp_path / "b.tsv", [["sentence", "label"], ["ok", "1"], ["bad", "positive"]])
    with pytest.raises(BbctError, match=r"b.tsv:3: label 'positive'"):
        read_tsv(get_task("sst-2"), bad)
    nocol = _write(tmp_path / "n.tsv", [["text", "label"], ["x", "1"]])
    with pytest.raises(BbctError, match="column 'sentence' missing"):
        read_tsv(get_task("sst-2"), nocol)
    with pytest.raises(BbctError, match="unknown task"):
        get_task("squad")
    with pytest.raises(BbctError, match="no such file"):
        read_tsv(get_task("sst-2"), tmp_path / "none.tsv")


def test_metrics_against_hand_computed_values():
    y = np.array([1, 1, 0, 0, 1])
    p = np.array([1, 0, 0, 1, 1])
    # tp=2 tn=1 fp=1 fn=1: accuracy 3/5, F1 = 4/6, MCC = (2*1-1*1)/sqrt(3*3*2*2) = 1/6
    assert metric("accuracy", y, p) == pytest.approx(0.6)
    assert metric("f1", y, p) == pytest.approx(2 / 3)
    assert metric("matthews", y, p) == pytest.approx(1 / 6)
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert metric("pearson", a, 2 * a + 1) == pytest.approx(1.0)
    # ranks of [1, 2, 2, 5] are [0, 1.5, 1.5, 3]; a monotone map keeps Spearman at 1
    assert metric("spearman", np.array([1.0, 2, 2, 5]), np.array([0.0, 7, 7, 9])) == pytest.approx(1.0)
    assert metric("spearman", a, -a) == pytest.approx(-1.0)
    assert list(predictions(get_task("mrpc"), np.array([[0.1, 0.9], [2.0, -1.0]]))) == [1, 0]
