"""The eval pass: batches spread over worker processes, only the compared tensors traced and
asked of onnxruntime, error sums in one Numba pass. Every number must be what the plain
serial pass (every tensor traced, ``run_all``, numpy sums) gives, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from test_sweep import _data  # sentences of 2 to 11 words: batches padded to unlike lengths

from bbct.simulator.compare import Comparison, compared_nodes, error_sums
from bbct.simulator.explore.bench import Bench
from bbct.simulator.tasks import get_task, load_dataset


def _numpy_sums(g: np.ndarray, x: np.ndarray) -> tuple[float, ...]:
    e = g - x
    mx = float(np.max(np.abs(e))) if e.size else 0.0
    return float(np.sum(g * g)), float(np.sum(e * e)), float(np.sum(g * x)), float(np.sum(x * x)), mx


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 127, 128, 129, 255, 256, 1000, 4099, 100_003])
def test_error_sums_are_numpys_pairwise_sums_bit_for_bit(n):
    rng = np.random.default_rng(n)
    # magnitudes over ten decades: any other summation order would round differently
    g = rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, n)
    x = g + rng.standard_normal(n) * 10.0 ** rng.integers(-8, 1, n)
    assert error_sums(g, x) == _numpy_sums(g, x)


@pytest.fixture(scope="module")
def bench(tiny_bert_onnx, tmp_path_factory) -> Bench:
    data = load_dataset(get_task("sst-2"), _data(tmp_path_factory.mktemp("evalb"), 40), "test")
    return Bench(tiny_bert_onnx, data, batch=8)


def _serial_reference(b: Bench, cfg: str):
    """The eval pass as it was: every tensor traced, every golden tensor from ``run_all``,
    the float logits from the plain session, numpy's sums per batch."""
    b.lower(cfg)
    comp = Comparison(b.sim.graph)
    name = b.sim.graph.info["onnx_outputs"]["logits"]
    fl, il, by_node = [], [], {}
    for feeds in b._feeds:
        r = b.sim.run(feeds, trace=True)
        comp.add(r, b.sim.golden.run_all(feeds).values, feeds[b.mask_name])
        fl.append(np.asarray(b.sim.golden.run(feeds)[name], np.float64))
        il.append(r.outputs["logits"].dequantize())
        for node, k in r.overflow.items():
            if k:
                by_node[node] = by_node.get(node, 0) + int(k)
    return np.concatenate(fl), np.concatenate(il), comp.rows(), by_node


@pytest.mark.parametrize("cfg", ["w8a8", "mx-int8"])
def test_eval_over_workers_equals_the_serial_pass(bench, cfg):
    fl, il, rows, by_node = _serial_reference(bench, cfg)
    for jobs in (1, 2):
        bench._float = None  # the float logits come with the batches again
        ev = bench.evaluate(cfg, jobs=jobs)
        assert np.array_equal(ev.float_logits, fl) and np.array_equal(ev.int_logits, il)
        assert ev.layers == rows  # every SQNR, cosine, max error and overflow, exactly
        assert ev.summary["overflow_by_node"] == by_node
        assert list(ev.summary["overflow_by_node"]) == list(by_node)  # the JSON's key order too
        assert ev.summary["layer_examples"] == 40


def test_layer_examples_trace_only_the_first_batches(bench):
    full = bench.evaluate("w8a8", jobs=2)
    part = bench.evaluate("w8a8", layer_examples=9, jobs=2)  # batches 0 and 1 (8 + 8 examples)
    assert part.summary["layer_examples"] == 16
    assert np.array_equal(part.int_logits, full.int_logits)
    assert part.summary["overflow_by_node"] == full.summary["overflow_by_node"]


def test_run_some_gives_run_alls_values(bench):
    feeds = bench._feeds[0]
    golden = bench.sim.golden
    names = [n for n in golden.tensor_names() if n not in golden.output_names][::7]
    some = golden.run_some(feeds, names)
    every = golden.run_all(feeds).values
    assert set(some) == set(names) | set(golden.output_names)
    for k, v in some.items():
        assert np.array_equal(v, every[k])
    plain = golden.run(feeds)
    assert all(np.array_equal(some[k], plain[k]) for k in golden.output_names)


def test_trace_a_set_keeps_those_tensors(bench):
    bench.lower("w8a8")
    graph, feeds = bench.sim.graph, bench._feeds[1]
    keep = set(compared_nodes(graph, bench.sim.golden.tensor_names())[:5])
    every = bench.sim.run(feeds, trace=True)
    some = bench.sim.run(feeds, trace=keep)
    assert set(some.tensors) == keep and some.overflow == every.overflow
    for k in keep:
        assert np.array_equal(some.tensors[k].data, every.tensors[k].data)
    assert np.array_equal(some.outputs["logits"].data, every.outputs["logits"].data)


def test_a_config_object_is_lowered_once(bench):
    """``bbct eval`` lowers its config to check the model, then evaluates it: one lowering
    (one GPTQ); another config, or a config by name, lowers again."""
    from bbct.simulator.config import load_config

    cfg = load_config("w8a8")
    graph = bench.lower(cfg)
    assert bench.evaluate(cfg).summary["examples"] == 40 and bench.sim.graph is graph
    assert bench.lower("w8a8") is not graph and bench.lower(load_config("w8a8")) is not graph
