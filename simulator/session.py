"""A simulation session: model + tokenizer + config -> calibrated, lowered integer graph.

This is what the CLI, the benchmarks and user scripts use::

    sim = Simulator("model.onnx", "w8a8", calib_texts=[...])
    out = sim.run_texts(["a fine film"])          # integer outputs, dequantized at the boundary
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from bbct.golden.errors import BbctError
from bbct.golden.runner import GoldenRunner
from bbct.golden.tokenize import encode, find_tokenizer
from bbct.simulator import ir
from bbct.simulator.calibrate import calibrate
from bbct.simulator.config import Config, load_config
from bbct.simulator.errors import LoweringError
from bbct.simulator.execute import Result, run
from bbct.simulator.frontend.fgraph import FGraph
from bbct.simulator.frontend.onnx_in import load_graph
from bbct.simulator.lower import Calibration, compression, lower


def batches(texts: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(texts), size):
        yield texts[i : i + size]


class Simulator:
    """Import, calibrate (when the config has static points), lower; then run batches."""

    def __init__(
        self,
        model: str | Path,
        config: str | Path | Config = "w8a8",
        calib_texts: list[str] | list[tuple[str, str]] | None = None,
        max_length: int = 64,
        calib_batch: int = 32,
        threads: int | None = None,
        calib_source: str = "",
        keep_float: bool = False,
    ) -> None:
        """``keep_float``: keep the float graph after lowering, for callers that lower it
        again (the explore bench); otherwise :attr:`fgraph` is imported again on first use,
        and a run of the integer model holds the integer weights only."""
        self.model_path = Path(model)
        self.config = config if isinstance(config, Config) else load_config(config)
        self._fgraph: FGraph | None = load_graph(self.model_path)
        self._inputs = dict(self._fgraph.inputs)  # input name -> role
        self.tokenizer = find_tokenizer(self.model_path)
        self.max_length = max_length
        self._threads = threads
        self.calibration: Calibration | None = None
        if self.config.needs_calibration:
            if not calib_texts:
                raise BbctError(
                    f"config {self.config.name!r} has static scales or GPTQ weights: calibration sentences are needed"
                )
            feeds = self.calibration_feeds(list(calib_texts), calib_batch)
            self.calibration = calibrate(self.fgraph, feeds, gptq=self.config.uses_gptq, source=calib_source)
        try:
            self.graph: ir.Graph = lower(self.fgraph, self.config, self.calibration)
        except LoweringError as e:  # name the model: the message names only its node
            raise LoweringError(f"{self.model_path}: {e}") from None
        if not keep_float:
            self._fgraph = None  # its float weights: as large as the model file
            if self.calibration is not None and self.calibration.hessians:
                # GPTQ's input second moments served the lowering only (151 MB for MiniLM-L6)
                self.calibration = dataclasses.replace(self.calibration, hessians={})

    @property
    def fgraph(self) -> FGraph:
        """The float graph (imported again on first use after lowering, unless ``keep_float``)."""
        if self._fgraph is None:
            self._fgraph = load_graph(self.model_path)
        return self._fgraph

    def input_name(self, role: str) -> str | None:
        """The model's input of ``role`` (``attention_mask``...), or None."""
        return next((k for k, v in self._inputs.items() if v == role), None)

    @functools.cached_property
    def golden(self) -> GoldenRunner:
        """The float model in onnxruntime, loaded on first use: a run of the integer model
        alone never holds a second copy of the float weights."""
        return GoldenRunner(self.model_path, threads=self._threads)

    def length_batches(self, texts: list, batch: int = 32) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """``texts`` in batches of about one length, as (indices into ``texts``, feeds): in
        order of token count (a stable sort), ``batch`` each, each padded to its longest, so
        padding costs little."""
        from bbct.golden.tokenize import token_counts

        order = np.argsort(token_counts(self.tokenizer, texts, self.max_length), kind="stable")
        sels = [order[i : i + batch] for i in range(0, len(order), batch)]
        return [(sel, self.encode([texts[j] for j in sel])) for sel in sels]

    def calibration_feeds(self, texts: list, batch: int = 32) -> list[dict[str, np.ndarray]]:
        """``texts`` encoded in :meth:`length_batches`: the statistics are taken over real
        tokens, so padding is only cost (the RT calibration float pass: 1.7x fewer token rows
        than batches in file order)."""
        return [f for _, f in self.length_batches(texts, batch)]

    def encode(self, texts: list, pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Token ids, mask and types of ``texts`` (strings, or (text, pair) tuples), keyed by
        the model's input names."""
        feeds = encode(self.tokenizer, texts, max_length=self.max_length, pad_to=pad_to)
        by_role = {role: name for name, role in self._inputs.items()}
        return {by_role[k]: v for k, v in feeds.items() if k in by_role}

    def run(
        self, feeds: dict[str, np.ndarray], trace: bool | set[str] = False, profile: dict[str, float] | None = None
    ) -> Result:
        return run(self.graph, feeds, trace=trace, profile=profile)

    def float_outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The golden's model outputs by role."""
        out = self.golden.run(feeds)
        return {role: out[name] for role, name in self.graph.info["onnx_outputs"].items()}

    def compression(self) -> dict[str, float]:
        return compression(self.graph)

    def logits_pairs(self, texts: Iterable[str], batch: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """(float logits, integer logits dequantized, overflow events) per batch."""
        for chunk in batches(list(texts), batch):
            feeds = self.encode(chunk)
            f = self.float_outputs(feeds)
            r = self.run(feeds)
            role = "logits" if "logits" in r.outputs else "last_hidden_state"
            yield f[role], r.outputs[role].dequantize(), r.overflow_count
