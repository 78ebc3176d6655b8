"""A simulation session: model + tokenizer + config -> calibrated, lowered integer graph.

This is what the CLI, the benchmarks and user scripts use::

    sim = Simulator("model.onnx", "w8a8", calib_texts=[...])
    out = sim.run_texts(["a fine film"])          # integer outputs, dequantized at the boundary
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from bbct.golden.errors import BbctError
from bbct.golden.runner import GoldenRunner
from bbct.golden.tokenize import encode, find_tokenizer
from bbct.simulator import ir
from bbct.simulator.calibrate import calibrate, collect_hessians
from bbct.simulator.config import Config, load_config
from bbct.simulator.execute import Result, run
from bbct.simulator.lower import Calibration, compression, lower
from bbct.simulator.onnx_import import load_bert
from bbct.simulator.spec import BertSpec


def batches(texts: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(texts), size):
        yield texts[i : i + size]


class Simulator:
    """Import, calibrate (when the config has static points), lower; then run batches."""

    def __init__(
        self,
        model: str | Path,
        config: str | Path | Config = "w8a8",
        calib_texts: list[str] | None = None,
        max_length: int = 64,
        calib_batch: int = 32,
        threads: int | None = None,
    ) -> None:
        self.model_path = Path(model)
        self.config = config if isinstance(config, Config) else load_config(config)
        self.spec: BertSpec = load_bert(self.model_path)
        self.tokenizer = find_tokenizer(self.model_path)
        self.max_length = max_length
        self.golden = GoldenRunner(self.model_path, threads=threads)
        self.calibration: Calibration | None = None
        if self.config.needs_calibration:
            if not calib_texts:
                raise BbctError(
                    f"config {self.config.name!r} has static scales or GPTQ weights: calibration sentences are needed"
                )
            feeds = [self.encode(b) for b in batches(calib_texts, calib_batch)]
            self.calibration = Calibration()
            if self.config.any_static:
                self.calibration = calibrate(self.spec, feeds, lambda f: self.golden.run_all(f).values)
            if self.config.uses_gptq:
                collect_hessians(self.spec, feeds, self.calibration)
        self.graph: ir.Graph = lower(self.spec, self.config, self.calibration)

    def encode(self, texts: list[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
        return encode(self.tokenizer, texts, max_length=self.max_length, pad_to=pad_to)

    def run(self, feeds: dict[str, np.ndarray], trace: bool = False, profile: dict[str, float] | None = None) -> Result:
        return run(self.graph, feeds, trace=trace, profile=profile)

    def float_outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The golden's model outputs by role."""
        out = self.golden.run(feeds)
        return {role: out[name] for name, role in self.spec.outputs.items()}

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
