"""The eval pass: batches spread over worker processes, only the compared tensors traced and
asked of onnxruntime, error sums in one Numba pass. Every number must be what the plain
serial pass (every tensor traced, ``run_all``, numpy sums) gives, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from test_sweep import _data  # sentences of 2 to 11 words: batches padded to unlike lengths

from bbct.golden.tokenize import token_counts
from bbct.simulator.compare import Comparison, compared_nodes, error_sums, real_tokens
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
    plan = b.plan()
    for _, feeds in plan:
        r = b.sim.run(feeds, trace=True)
        comp.add(r, b.sim.golden.run_all(feeds).values, feeds[b.mask_name])
        fl.append(np.asarray(b.sim.golden.run(feeds)[name], np.float64))
        il.append(r.outputs["logits"].dequantize())
        for node, k in r.overflow.items():
            if k:
                by_node[node] = by_node.get(node, 0) + int(k)
    order = np.concatenate([sel for sel, _ in plan])  # back to the split's order
    inv = np.argsort(order)
    return np.concatenate(fl)[inv], np.concatenate(il)[inv], comp.rows(), by_node


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


def test_layer_examples_trace_the_first_examples_and_change_nothing_else(bench):
    """``layer_examples`` picks whose rows the per-layer sums read, wherever the length order
    put them; the batches, logits and saturation counts are those of the full pass."""
    full = bench.evaluate("w8a8", jobs=2)
    part = bench.evaluate("w8a8", layer_examples=9, jobs=2)
    assert full.summary["layer_examples"] == 40 and part.summary["layer_examples"] == 9
    assert np.array_equal(part.int_logits, full.int_logits) and np.array_equal(part.float_logits, full.float_logits)
    assert part.summary["overflow_by_node"] == full.summary["overflow_by_node"]
    assert [r.node for r in part.layers] == [r.node for r in full.layers]
    assert part.layers != full.layers
    lone = bench.evaluate("w8a8", layer_examples=0, jobs=2)
    assert lone.summary["layer_examples"] == 0 and lone.layers == []
    assert np.array_equal(lone.int_logits, full.int_logits)


def test_batches_go_by_length_and_results_by_the_split(bench):
    """Batches are formed in order of token count, each padded to its longest; every example
    is in exactly one batch; results come back in the split's order."""
    n = len(bench.data)
    plan = bench.plan()
    counts = [int(f[bench.mask_name].sum(axis=1).max()) for _, f in plan]
    assert counts == sorted(counts) and len(set(counts)) > 2  # _data's sentences are of unlike lengths
    assert sorted(np.concatenate([sel for sel, _ in plan]).tolist()) == list(range(n))
    for sel, feeds in plan:
        mask = feeds[bench.mask_name]
        counts = token_counts(bench.sim.tokenizer, [bench.data.inputs()[j] for j in sel], bench.sim.max_length)
        assert np.array_equal(mask.sum(axis=1), counts) and mask.shape[1] == counts.max()
    # each example's logits are those of its own batch's row
    ev = bench.evaluate("w8a8")
    sel, feeds = plan[1]
    assert np.array_equal(ev.int_logits[sel], bench.sim.run(feeds).outputs["logits"].dequantize())


def test_run_some_gives_run_alls_values(bench):
    feeds = bench.plan()[0][1]
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
    graph, feeds = bench.sim.graph, bench.plan()[1][1]
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


def _numpy_pairs(q, g, mask):
    sel = real_tokens(g, mask)
    return np.asarray(g, np.float64)[sel], q.dequantize()[sel]


@pytest.mark.parametrize(
    "shape, axis, block, mult",
    [
        ((3, 5, 70), -1, 32, False),  # token rows, blocks of the last axis with a short last block
        ((3, 5, 70), -1, 0, True),  # one MULT scale per row
        ((3, 5, 64), 1, 2, False),  # blocks across tokens: one scale per row, from its block
        ((3, 5, 64), 0, 0, False),  # one scale per (token, column): broadcast over the batch
        ((3, 4, 5, 5), -1, 2, False),  # attention scores: real query rows, real key columns
        ((3, 4, 5, 8), -1, 4, True),  # heads split: real query rows, every column
        ((3, 5), -1, 2, False),  # one value per token
        ((3, 5, 2, 6), -1, 4, False),  # token-major 4-D
    ],
)
def test_real_pairs_are_the_selected_dequantized_values(shape, axis, block, mult):
    """The row-wise gather gives what selecting with :func:`real_tokens` and dequantizing the
    whole tensor gives: the same float64 values in the same order (so the same sums)."""
    from bbct.kernels.formats import IntFormat, QTensor, ScaleKind, expand_blocks
    from bbct.simulator.compare import _real_pairs

    rng = np.random.default_rng(len(shape) * 100 + block)
    fmt = IntFormat(bits=8, block_axis=axis, block_size=block, scale=ScaleKind.MULT if mult else ScaleKind.POW2)
    ax = axis % len(shape)
    nb = 1 if block == 0 else -(-shape[ax] // block)
    eshape = [1 if (i == 0 and axis == 0) else s for i, s in enumerate(shape)]
    eshape[ax] = nb
    exp = rng.integers(-12, 3, eshape).astype(np.int32)
    mant = rng.integers(1, 255, eshape).astype(np.int32) if mult else None
    q = QTensor(rng.integers(-128, 128, shape).astype(np.int8), fmt, exp, mant)
    assert expand_blocks(np.ones(eshape), shape, axis, block).shape == shape
    g = rng.standard_normal(shape).astype(np.float32)
    mask = np.zeros((3, 5), np.int64)
    for b, n in enumerate((5, 2, 3)):
        mask[b, :n] = 1
    got, want = _real_pairs(q, g, mask), _numpy_pairs(q, g, mask)
    assert got is not None
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert error_sums(*got) == _numpy_sums(*want)


def test_batch_stats_of_a_traced_batch_are_numpys(bench):
    """Every compared tensor of a real batch: the gathered sums equal numpy's on
    ``real_tokens``-selected, dequantized values."""
    from bbct.simulator.compare import batch_stats

    bench.lower("w8a8")
    sim = bench.sim
    feeds = bench.plan()[2][1]
    r = sim.run(feeds, trace=True)
    golden = sim.golden.run_all(feeds).values
    mask = feeds[bench.mask_name]
    examples = np.arange(len(mask)) % 3 == 1  # a part of the batch, as --layer-examples traces
    for ex in (None, examples):
        stats = batch_stats(sim.graph, r, golden, mask, ex)
        assert len(stats) > 20
        m = mask if ex is None else mask.astype(bool) & ex[:, None]
        for n in sim.graph.nodes:
            if n.name in stats:
                q, g = r.tensors[n.name], golden[n.onnx_name].reshape(r.tensors[n.name].shape)
                if real_tokens(g, m) is None:  # no sequence axis: the examples' rows
                    rows = slice(None) if ex is None else ex
                    want = _numpy_sums(g[rows].astype(np.float64).ravel(), q.dequantize()[rows].ravel())
                else:
                    want = _numpy_sums(*_numpy_pairs(q, g, m))
                assert tuple(stats[n.name][2:7]) == want, n.name
