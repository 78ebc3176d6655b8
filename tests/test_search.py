"""bbct search on a tiny random 3-class BERT whose labels are its own float classes (so the
accuracy drop is exactly the share of flipped classes and the budget bites)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bert_exports import export_tiny

from bbct.simulator.cli import main
from bbct.simulator.config import load_config
from bbct.simulator.explore.search import final, greedy_order, to_toml

LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def task_dir(export_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The model, and train/test TSVs labelled with the float model's own classes."""
    from bbct.golden.runner import GoldenRunner
    from bbct.golden.tokenize import encode

    model = export_tiny(export_dir, num_labels=3, init_range=0.2)
    folder = tmp_path_factory.mktemp("search_data")
    rng = np.random.default_rng(7)
    runner = GoldenRunner(model)
    for split, n in (("train", 96), ("test", 48)):
        texts = [" ".join(f"w{j}" for j in rng.integers(5, 100, rng.integers(2, 12))) for _ in range(n)]
        feeds = encode(model.with_name("tokenizer.json"), texts, max_length=64)
        cls = runner.run(feeds)["logits"].argmax(1)
        (folder / f"{split}.tsv").write_text(
            "text\tlabel\n" + "".join(f"{t}\t{LABELS[c]}\n" for t, c in zip(texts, cls, strict=True))
        )
    return model, folder


def _search(model, folder, out, budget, *extra):
    args = ["search", str(model), "--data", str(folder), "--text-col", "text", "--labels", ",".join(LABELS)]
    args += ["--budget", str(budget), "--base", "w8a8", "--menu", "4/64,3/64,2/32", "--out", str(out)]
    assert main(args + ["--workers", "0", *extra]) == 0
    return json.loads((out / "search.json").read_text())


def test_search_respects_the_budget_on_train_and_writes_an_eval_config(task_dir, tmp_path, capsys):
    model, folder = task_dir
    tight = _search(model, folder, tmp_path / "tight", 10.0)
    assert "chosen on 96 train examples" in capsys.readouterr().out
    loose = _search(model, folder, tmp_path / "loose", 100.0)
    # the float model labels the data: float accuracy is 1 and the drop is the flipped share
    assert loose["test"]["float_accuracy"] == 1.0
    assert tight["train"]["drop_points"] <= 10.0 and tight["train"]["weight_compression"] > 3.9
    # an unbounded budget takes every step: every group in its cheapest format
    assert {tuple(m[1:]) for m in loose["chosen"]} == {(2, 32)} and len(loose["chosen"]) == 9
    assert loose["train"]["weight_compression"] > tight["train"]["weight_compression"]
    # the test split is read once, for the chosen config only
    for s, name in ((tight, "tight"), (loose, "loose")):
        rows = (tmp_path / name / "test" / "rows.jsonl").read_text().splitlines()
        assert len(rows) == 1
        # the written TOML is a config bbct eval takes, and gives the reported test numbers
        cfg = Path(s["config"])
        load_config(cfg)
        js = tmp_path / f"{name}.json"
        args = ["eval", str(model), "--data", str(folder), "--text-col", "text", "--labels", ",".join(LABELS)]
        assert main(args + ["--config", str(cfg), "--json", str(js)]) == 0
        e = json.loads(js.read_text())
        for k in ("int_accuracy", "drop_points", "weight_compression"):
            assert e[k] == pytest.approx(s["test"][k]), k
    # the chosen prefix is the longest the bisection found within the budget
    fits = [st for st in tight["bisection"] if st["drop_points"] <= 10.0]
    assert max(st["moves"] for st in fits) == len(tight["order_taken"])
    assert all(st["drop_points"] > 10.0 for st in tight["bisection"] if st["moves"] > len(tight["order_taken"]))
    # a budget the base itself exceeds keeps the base, and says so
    over = _search(model, folder, tmp_path / "tight", 0.0)  # resumes: the sensitivities are in the table
    if over["base"]["drop_points"] > 0.0:
        assert over["chosen"] == [] and over["base_over_budget"]
        assert "bbct: warning" in capsys.readouterr().err


def test_layer_granularity_names_layers(task_dir, tmp_path):
    model, folder = task_dir
    s = _search(
        model, folder, tmp_path / "layer", 100.0, "--granularity", "layer", "--train-examples", "32", "--menu", "2/32"
    )
    groups = {m[0] for m in s["chosen"]}
    assert {"L0.query", "L1.intermediate", "embedding", "classifier"} <= groups
    text = (tmp_path / "layer" / "search.toml").read_text()
    assert "[layer.1.intermediate]" in text and "[op.classifier]" in text


def test_greedy_takes_the_lower_hull_by_marginal_cost():
    base = {"weight_bytes": 100.0, "logit_kl": 0.0}

    def row(b, kl):
        return {"weight_bytes": 100.0 - b, "logit_kl": kl}

    singles = {
        ("a", 4, 64): row(10, 0.10),  # slope 0.010
        ("a", 3, 64): row(20, 0.50),  # marginal (0.5-0.1)/10 = 0.040
        ("a", 2, 64): row(30, 0.60),  # from 4/64: 0.5/20 = 0.025 < 0.04, so 3/64 leaves the hull
        ("b", 4, 64): row(10, 0.02),  # slope 0.002
        ("b", 3, 64): row(15, 0.30),  # marginal 0.056
        ("c", 4, 64): row(-5, 0.0),  # saves nothing: never a step
    }
    order = greedy_order(base, singles)
    assert order == [("b", 4, 64), ("a", 4, 64), ("a", 2, 64), ("b", 3, 64)]
    assert final(order[:3]) == (("b", 4, 64), ("a", 2, 64))


def test_to_toml_round_trips_through_load_config():
    tables = {
        "preset": "w4a8",
        "name": "x",
        "default": {"act_bits": 6},
        "op": {"intermediate": {"weight_bits": 3, "weight_block": 64}},
        "layer": {"2": {"query": {"weight_bits": 5}}},
        "node": {"L1.ffn*": {"rounding": "RND"}},
    }
    import tomllib

    assert tomllib.loads(to_toml(tables)) == tables
    cfg = load_config(tomllib.loads(to_toml(tables)))
    assert cfg.settings("intermediate", 0).weight_bits == 3 and cfg.settings("query", 2).weight_bits == 5


def test_benches_of_one_model_share_their_calibration(task_dir):
    """A search's train and test Benches calibrate once: the statistics depend on the model,
    the calibration texts and the length, not on the split evaluated."""
    from bbct.simulator.config import load_config
    from bbct.simulator.explore.bench import Bench
    from bbct.simulator.tasks import load_dataset, user_task

    model, folder = task_dir
    task = user_task(text="text", labels=LABELS)
    calib = ["w5 w6 w7", "w8 w9"]
    cfg = load_config("w8a8-static")
    a = Bench(model, load_dataset(task, folder, "train", 8), calib)
    b = Bench(model, load_dataset(task, folder, "test", 8), calib)
    assert a.calibration(cfg) is b.calibration(cfg) and a.calibration(cfg).sentences == 2
    c = Bench(model, load_dataset(task, folder, "test", 8), calib + ["w10"])
    assert c.calibration(cfg) is not a.calibration(cfg)
    assert a.evaluate(cfg).summary["examples"] == 8
