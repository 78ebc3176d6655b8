"""A model loaded once, evaluated under many configs.

:class:`Bench` imports the model, tokenizes the split and computes its float logits once;
each :meth:`Bench.evaluate` then lowers one config and runs the split in integers. A sweep
worker keeps one Bench for its whole life, so a point costs one lowering and one integer pass.
Calibration statistics do not depend on the config (only on whether GPTQ needs the Hessians),
so they are taken once per kind and reused.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bbct.golden.errors import BbctError
from bbct.simulator.compare import Comparison, Row
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
        self.sim = Simulator(model, "w8a8", max_length=max_length, threads=threads)
        self.data = data
        self.batch = batch
        self.calib_texts = calib_texts
        self.calib_source = calib_source
        self._calib: dict[bool, Calibration] = {}
        self._feeds = [self.sim.encode(data.inputs(i, i + batch)) for i in range(0, len(data), batch)]
        self._float: np.ndarray | None = None
        self.mask_name = self.sim.fgraph.role_input("attention_mask")

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
                from bbct.simulator.session import batches

                feeds = [self.sim.encode(b) for b in batches(list(self.calib_texts), 32)]
                _CALIBRATIONS[key] = calibrate(self.sim.fgraph, feeds, gptq=gptq, source=self.calib_source)
            self._calib[gptq] = _CALIBRATIONS[key]
        return self._calib[gptq]

    def lower(self, cfg: Config | str | dict) -> Any:
        """The integer graph of ``cfg`` (the Simulator now runs it)."""
        from bbct.simulator.errors import LoweringError

        cfg = cfg if isinstance(cfg, Config) else load_config(cfg)
        try:
            graph = lower(self.sim.fgraph, cfg, self.calibration(cfg))
        except LoweringError as e:
            raise LoweringError(f"{self.model_path}: {e}") from None
        self.sim.config, self.sim.graph = cfg, graph
        self.sim.calibration = self._calib.get(cfg.uses_gptq) if cfg.needs_calibration else None
        return graph

    def float_logits(self) -> np.ndarray:
        if self._float is None:
            name = self.sim.graph.info["onnx_outputs"]["logits"]
            self._float = np.concatenate([np.asarray(self.sim.golden.run(f)[name], np.float64) for f in self._feeds])
        return self._float

    def evaluate(
        self, cfg: Config | str | dict, layer_examples: int | None = None, progress: bool = False
    ) -> Evaluation:
        """Accuracy (and the task's metrics) of ``cfg`` in float and integers, agreement,
        overflow events, weight compression, and per-layer SQNR over the first
        ``layer_examples`` examples (None: all of them)."""
        t0 = time.time()
        self.lower(cfg)
        t_lower = time.time() - t0
        if "logits" not in self.sim.graph.outputs:
            raise BbctError(f"{self.model_path}: needs a classifier with a logits output")
        fl = self.float_logits()
        task = self.data.task
        if fl.shape[-1] != task.num_labels:
            raise BbctError(
                f"{self.model_path}: the model has {fl.shape[-1]} logit(s), task {task.name} needs {task.num_labels} "
                f"({'a regression score' if task.is_regression else f'{task.num_labels} classes'})"
            )
        comparison = Comparison(self.sim.graph)
        traced = 0
        il, ovf = [], 0
        by_node: dict[str, int] = {}
        feeds_iter = self._feeds
        if progress:
            from bbct.golden.progress import progress as bar

            feeds_iter = bar(self._feeds, desc=f"eval {task.name} {self.sim.config.name}", unit="batch")
        t0 = time.time()
        for feeds in feeds_iter:
            n = len(next(iter(feeds.values())))
            trace = layer_examples is None or traced < layer_examples
            r = self.sim.run(feeds, trace=trace)
            if trace:  # per-layer error needs every float tensor of the batch: one batch at a time
                golden = self.sim.golden.run_all(feeds).values
                comparison.add(r, golden, feeds.get(self.mask_name) if self.mask_name else None)
                traced += n
                del golden
            il.append(r.outputs["logits"].dequantize())
            ovf += r.overflow_count
            for node, k in r.overflow.items():  # which nodes saturate, so a count can be read
                if k:
                    by_node[node] = by_node.get(node, 0) + int(k)
            del r
        t_run = time.time() - t0
        iq = np.concatenate(il)
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
