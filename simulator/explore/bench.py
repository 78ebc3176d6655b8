"""A model loaded once, evaluated under many configs.

:class:`Bench` imports the model, tokenizes the split and computes its float logits once;
each :meth:`Bench.evaluate` then lowers one config and runs the split in integers. A sweep
worker keeps one Bench for its whole life, so a point costs one lowering and one integer pass.
Calibration statistics do not depend on the config (only on whether GPTQ needs the Hessians),
so they are taken once per kind and reused.

Batches are formed in order of token count (a stable sort), so each sentence is padded to
about its own length: the split costs what its real tokens cost (RT test: 1.9x fewer token
rows and 3x fewer attention scores than batches in file order), and a sentence's integer
result depends little on which others share its batch. (It can depend on them a little: a
block or matrix exponent is taken over the padded tensor, as hardware fed that batch would.)
The batches never depend on ``layer_examples``: the per-layer sums are taken over the rows
of the first N examples wherever they fall, so tracing fewer changes no other number.
Results are reported in the split's order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bbct.golden.errors import BbctError
from bbct.simulator.compare import Comparison, Row, batch_stats, compared_nodes
from bbct.simulator.config import Config, load_config
from bbct.simulator.lower import Calibration, compression, lower
from bbct.simulator.tasks import Dataset, metric, predictions

_CALIBRATIONS: dict[tuple, Calibration] = {}


@dataclass
class Evaluation:
    """One config on one split: the summary (strict-JSON-ready) and the per-example logits."""

    summary: dict[str, Any]
    float_logits: np.ndarray
    int_logits: np.ndarray
    layers: list[Row]


class Bench:
    """``model`` + ``data`` + calibration texts, loaded once; :meth:`evaluate` per config."""

    def __init__(
        self,
        model: str | Path,
        data: Dataset,
        calib_texts: list | None = None,
        calib_source: str = "",
        max_length: int = 64,
        batch: int = 32,
        threads: int | None = None,
    ) -> None:
        from bbct.simulator.session import Simulator

        # a Simulator under a config that needs no calibration: its import, tokenizer and golden
        # runner are reused, its integer graph is replaced per config
        self.sim = Simulator(model, "w8a8", max_length=max_length, threads=threads, keep_float=True)
        self.data = data
        self.batch = batch
        self.calib_texts = calib_texts
        self.calib_source = calib_source
        self._calib: dict[bool, Calibration] = {}
        self._plan: list[tuple[np.ndarray, dict[str, np.ndarray]]] | None = None
        self._float: np.ndarray | None = None  # the float logits, in the split's order
        self._lowered: Config | None = None  # the config self.sim.graph was lowered from
        self.mask_name = self.sim.input_name("attention_mask")

    @property
    def model_path(self) -> Path:
        return self.sim.model_path

    def calibration(self, cfg: Config) -> Calibration | None:
        if not cfg.needs_calibration:
            return None
        if not self.calib_texts:
            raise BbctError(f"config {cfg.name!r} has static scales or GPTQ weights: calibration sentences are needed")
        gptq = cfg.uses_gptq
        if gptq not in self._calib:
            # shared by the Benches of one process (a search's train and test splits): the
            # statistics depend on the model, the texts and the length only
            key = (str(self.model_path.resolve()), repr(self.calib_texts), self.sim.max_length, gptq)
            if key not in _CALIBRATIONS:
                from bbct.simulator.calibrate import calibrate

                feeds = self.sim.calibration_feeds(list(self.calib_texts))
                _CALIBRATIONS[key] = calibrate(self.sim.fgraph, feeds, gptq=gptq, source=self.calib_source)
            self._calib[gptq] = _CALIBRATIONS[key]
        return self._calib[gptq]

    def lower(self, cfg: Config | str | dict) -> Any:
        """The integer graph of ``cfg`` (the Simulator now runs it); the graph already lowered
        when ``cfg`` is the Config object it was lowered from (``bbct eval`` lowers once to
        check the model, then evaluates: GPTQ runs once)."""
        from bbct.simulator.errors import LoweringError

        if isinstance(cfg, Config) and cfg is self._lowered:
            return self.sim.graph
        cfg = cfg if isinstance(cfg, Config) else load_config(cfg)
        try:
            graph = lower(self.sim.fgraph, cfg, self.calibration(cfg))
        except LoweringError as e:
            raise LoweringError(f"{self.model_path}: {e}") from None
        self.sim.config, self.sim.graph = cfg, graph
        self.sim.calibration = self._calib.get(cfg.uses_gptq) if cfg.needs_calibration else None
        self._lowered = cfg
        return graph

    def plan(self) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """The batches, as (split indices, feeds): the split in order of token count (stable),
        ``batch`` examples each, every batch padded to its longest."""
        if self._plan is None:
            self._plan = self.sim.length_batches(self.data.inputs(), self.batch)
        return self._plan

    def _in_split_order(self, per_batch: list[np.ndarray]) -> np.ndarray:
        """Rows of ``per_batch`` (one array per batch of :meth:`plan`) put back in the split's order."""
        rows = np.concatenate(per_batch)
        out = np.empty_like(rows)
        out[np.concatenate([sel for sel, _ in self.plan()])] = rows
        return out

    def float_logits(self) -> np.ndarray:
        """The float model's logits of the split, in its order."""
        if self._float is None:
            name = self.sim.graph.info["onnx_outputs"]["logits"]
            self._float = self._in_split_order(
                [np.asarray(self.sim.golden.run(f)[name], np.float64) for _, f in self.plan()]
            )
        return self._float

    def run_batch(self, i: int, traced: np.ndarray | None) -> BatchPart:
        """Batch ``i`` of :meth:`plan` in integers, with the per-layer error sums of its
        examples ``traced`` (bool per example; None: none) against the float golden (only the
        compared tensors are kept, and only they are asked of onnxruntime)."""
        feeds = self.plan()[i][1]
        n = len(next(iter(feeds.values())))
        graph = self.sim.graph
        logits_name = graph.info["onnx_outputs"]["logits"]
        stats = None
        if traced is not None and traced.any():
            keep = set(compared_nodes(graph, self.sim.golden.tensor_names()))
            r = self.sim.run(feeds, trace=keep)
            golden = self.sim.golden.run_some(feeds, [n.onnx_name for n in graph.nodes if n.name in keep])
            mask = feeds.get(self.mask_name) if self.mask_name else None
            if traced.all():
                stats = batch_stats(graph, r, golden, mask)
            else:
                if mask is None:  # a model without a mask: every token is real
                    mask = np.ones(feeds[next(iter(feeds))].shape, bool)
                stats = batch_stats(graph, r, golden, mask, traced)
        else:
            r = self.sim.run(feeds)
            golden = self.sim.golden.run(feeds) if self._float is None else {}
        fl = np.asarray(golden[logits_name], np.float64) if logits_name in golden else None
        del golden
        overflow = {node: int(k) for node, k in r.overflow.items()}
        return BatchPart(n, r.outputs["logits"].dequantize(), overflow, r.overflow_count, stats, fl)

    def _run_batches(self, plan: list[tuple[int, np.ndarray | None]], jobs: int):
        """:meth:`run_batch` over ``plan`` (batch index, traced examples), in order; in ``jobs``
        forked worker processes when there is more than one job and more than one batch."""
        jobs = max(1, min(int(jobs), len(plan)))
        if jobs == 1:
            return (self.run_batch(i, t) for i, t in plan)
        return self._parallel(plan, jobs)

    def _parallel(self, plan: list[tuple[int, np.ndarray | None]], jobs: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        global _WORKER
        _WORKER = self
        try:
            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork"), initializer=_worker_init) as ex:
                # at most two batches queued per worker: results are merged in order as they come
                pending = []
                it = iter(plan)
                for i, t in it:
                    pending.append(ex.submit(_worker_batch, i, t))
                    if len(pending) >= 2 * jobs:
                        break
                while pending:
                    part = pending.pop(0).result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(ex.submit(_worker_batch, *nxt))
                    yield part
        finally:
            _WORKER = None

    def evaluate(
        self,
        cfg: Config | str | dict,
        layer_examples: int | None = None,
        progress: bool = False,
        jobs: int = 1,
    ) -> Evaluation:
        """Accuracy (and the task's metrics) of ``cfg`` in float and integers, agreement,
        overflow events, weight compression, and per-layer SQNR over the first
        ``layer_examples`` examples (None: all of them). ``jobs`` > 1 runs the batches in that
        many worker processes; the result is the same."""
        t0 = time.time()
        self.lower(cfg)
        t_lower = time.time() - t0
        if "logits" not in self.sim.graph.outputs:
            raise BbctError(f"{self.model_path}: needs a classifier with a logits output")
        task = self.data.task
        # the float logits come with the batches (onnxruntime runs once per batch, for the
        # compared tensors and the logits together); the first batch's checks the width first
        name = self.sim.graph.info["onnx_outputs"]["logits"]
        batches = self.plan()  # built before the workers fork: they share it
        fl = self._float if self._float is not None else self.sim.golden.run(batches[0][1])[name]
        if fl.shape[-1] != task.num_labels:
            raise BbctError(
                f"{self.model_path}: the model has {fl.shape[-1]} logit(s), task {task.name} needs {task.num_labels} "
                f"({'a regression score' if task.is_regression else f'{task.num_labels} classes'})"
            )
        comparison = Comparison(self.sim.graph)
        traced = 0
        il, ovf = [], 0
        by_node: dict[str, int] = {}
        # the first ``layer_examples`` of the split, wherever the length order put them
        n_traced = len(self.data) if layer_examples is None else max(0, min(len(self.data), int(layer_examples)))
        plan = [(i, (sel < n_traced) if (sel < n_traced).any() else None) for i, (sel, _) in enumerate(batches)]
        parts = self._run_batches(plan, jobs)
        if progress:
            from bbct.golden.progress import progress as bar

            parts = bar(parts, total=len(plan), desc=f"eval {task.name} {self.sim.config.name}", unit="batch")
        t0 = time.time()
        fls = []
        for (_, rows), part in zip(plan, parts, strict=True):
            fls.append(part.float_logits)
            if rows is not None:  # merged in batch order: the same sums however the batches were spread
                comparison.merge(part.stats)
                traced += int(rows.sum())
            il.append(part.logits)
            ovf += part.overflow_count
            for node, k in part.overflow.items():  # which nodes saturate, so a count can be read
                if k:
                    by_node[node] = by_node.get(node, 0) + int(k)
        t_run = time.time() - t0
        if self._float is None:
            self._float = self._in_split_order(fls)
        fl = self._float
        iq = self._in_split_order(il)
        rows = comparison.rows()
        summary = summarize(self.data, fl, iq)
        finite = [r.sqnr_db for r in rows if math.isfinite(r.sqnr_db)]
        worst = min(rows, key=lambda r: r.sqnr_db) if rows else None
        summary.update(
            {
                "overflow_count": int(ovf),
                "overflow_by_node": by_node,
                "worst_layer_sqnr_db": min(finite) if finite else None,
                "worst_layer": worst.node if worst else None,
                "layer_examples": traced,
                **compression(self.sim.graph),
                "seconds": {"lower": round(t_lower, 2), "run": round(t_run, 2)},
            }
        )
        return Evaluation(summary, fl, iq, rows)


@dataclass
class BatchPart:
    """What one batch contributes to an evaluation: its integer logits, overflow events by
    node, and (when traced) its per-layer error sums."""

    n: int
    logits: np.ndarray
    overflow: dict[str, int]
    overflow_count: int
    stats: dict[str, list] | None
    float_logits: np.ndarray | None  # the golden's, when this pass ran it


_WORKER: Bench | None = None  # the Bench a forked worker process runs batches of


def _keep_freed_memory() -> None:
    """Let glibc keep freed memory for the next batch instead of unmapping it: a traced batch
    allocates and frees the same large arrays again and again, and each fresh mapping is paid
    in page faults (20 traced batches: 573k faults and 1.8 s of system time, against 102k and
    0.3 s, 8 % of the wall time; the same peak). Only in bbct's own worker processes."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: large blocks from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: freed heap kept
    except (OSError, AttributeError):  # not glibc: the defaults
        pass


def _worker_init() -> None:
    # each worker is one of ``jobs`` processes on as many cores: one BLAS and one onnxruntime
    # thread each, and fresh onnxruntime sessions (the parent's thread pools are not forked)
    from threadpoolctl import threadpool_limits

    _keep_freed_memory()
    threadpool_limits(1)
    assert _WORKER is not None
    _WORKER.sim.golden.reset(threads=1)


def _worker_batch(i: int, traced: np.ndarray | None) -> BatchPart:
    assert _WORKER is not None
    return _WORKER.run_batch(i, traced)


def summarize(data: Dataset, fl: np.ndarray, iq: np.ndarray) -> dict[str, Any]:
    """The task's metrics in float and integers, the drop of the main one in points, and the
    agreement of the two classifications."""
    task = data.task
    f_pred, i_pred = predictions(task, fl), predictions(task, iq)
    res: dict[str, Any] = {"examples": len(data)}
    for m in task.metrics:
        res[f"float_{m}"] = metric(m, data.labels, f_pred)
        res[f"int_{m}"] = metric(m, data.labels, i_pred)
    main = task.metrics[0]
    res["metric"] = main
    res["drop_points"] = 100.0 * (res[f"float_{main}"] - res[f"int_{main}"])
    res["agreement"] = float(np.mean(f_pred == i_pred)) if not task.is_regression else None
    res["logit_kl"] = None if task.is_regression else logit_kl(fl, iq)
    return res


def logit_kl(fl: np.ndarray, iq: np.ndarray) -> float:
    """Mean KL divergence (nats) of the integer class probabilities from the float ones: a
    smooth measure of how far a config moves the classifier, even where no class flips."""

    def logp(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lf, lq = logp(fl), logp(iq)
    return float(np.mean(np.sum(np.exp(lf) * (lf - lq), axis=-1)))
