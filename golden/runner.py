"""The float golden: onnxruntime on the original graph, with every intermediate exposed.

Both the plain run and the instrumented run use ``ORT_DISABLE_ALL`` graph optimizations.
With the default level (``ORT_ENABLE_ALL``) onnxruntime fuses attention, LayerNorm and GELU:
the fused graph no longer produces the intermediate tensors, and its outputs are not the same
bits as the unfused graph (measured with onnxruntime 1.32 on 64 RT test sentences: logits of the
prepared classifier differ by up to 1.2e-6, the encoder's last_hidden_state by up to 9.5e-6;
``ORT_ENABLE_BASIC`` is still bit-equal, ``ORT_ENABLE_EXTENDED`` is not). The golden must be one
function whose outputs are the same bits whether or not intermediates are requested, so the
plain session does not optimize either (tested).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import load_external_data_for_model

from bbct.golden.errors import BbctError


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file and its external data; a missing, unreadable or non-ONNX file, a
    folder, and external data that is missing or outside the model's folder are BbctErrors
    naming the path."""
    p = Path(path)
    if p.is_dir():
        inside = sorted(p.glob("*.onnx"))
        hint = f" (give the ONNX file: {inside[0]})" if len(inside) == 1 else ""
        raise BbctError(f"{p}: is a folder, not an ONNX file{hint}")
    if not p.is_file():
        raise BbctError(f"{p}: no such file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise BbctError(f"{p}: cannot read: {e.strerror or e}") from None
    if not data:
        raise BbctError(f"{p}: not an ONNX model (empty file)")
    try:
        m = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise BbctError(f"{p}: not an ONNX model ({type(e).__name__}: {_first_line(e)})") from None
    if not m.graph.node:
        raise BbctError(f"{p}: not an ONNX model (empty graph)")
    try:  # refuses locations outside the model's folder, absolute paths, symlinks, short files
        load_external_data_for_model(m, str(p.parent))
    except Exception as e:
        raise BbctError(f"{p}: bad external data: {_first_line(e)}") from None
    return m


def _first_line(e: BaseException) -> str:
    """The first line of an error message, without onnxruntime's ``[ONNXRuntimeError] : 2 :
    INVALID_ARGUMENT :`` prefix."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", lines[0]) if lines else type(e).__name__


def _options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 4  # errors come back as exceptions, one line each; nothing on stderr
    return so


@dataclass
class Golden:
    """Float golden tensors by name, with the node and op that produced each.

    ``values``: every node output (and graph output) by tensor name, as onnxruntime returned
    it (float32 activations, int64 shapes/indices, bool masks); ``producer``: tensor name ->
    (node name, op type); ``outputs``: the graph output names, in graph order.
    """

    values: dict[str, np.ndarray]
    producer: dict[str, tuple[str, str]]
    outputs: list[str]

    def index(self) -> dict[str, dict]:
        """name -> shape, dtype, producing node and op, whether it is a graph output."""
        return {
            n: {
                "shape": list(np.shape(v)),
                "dtype": str(np.asarray(v).dtype),
                "node": self.producer.get(n, ("", ""))[0],
                "op": self.producer.get(n, ("", ""))[1],
                "graph_output": n in self.outputs,
            }
            for n, v in self.values.items()
        }


_FORKED: list = []  # sessions a process dropped by GoldenRunner.reset (see there)


class GoldenRunner:
    """Runs a model in onnxruntime; ``run_all`` exposes every node output by tensor name."""

    def __init__(self, model: str | Path | onnx.ModelProto, threads: int | None = None) -> None:
        self.model = load_onnx(model) if not isinstance(model, onnx.ModelProto) else model
        self.path = None if isinstance(model, onnx.ModelProto) else Path(model)
        self.threads = threads
        self.input_names = [i.name for i in self.model.graph.input]
        self.output_names = [o.name for o in self.model.graph.output]
        init = {i.name for i in self.model.graph.initializer}
        self.input_names = [n for n in self.input_names if n not in init]
        self._plain: ort.InferenceSession | None = None
        self._all: ort.InferenceSession | None = None
        self._some: dict[tuple[str, ...], tuple[ort.InferenceSession, list[str]]] = {}
        self.producer: dict[str, tuple[str, str]] = {}
        self.vocab_size = self._vocab_size()

    @property
    def _where(self) -> str:
        return str(self.path) if self.path else "the model"

    def _vocab_size(self) -> int | None:
        """Rows of the word-embedding table gathered by input_ids; when the graph does not
        gather an initializer with input_ids directly, the size of the tokenizer.json beside
        the model; None when neither is there."""
        init = {i.name: i for i in self.model.graph.initializer}
        for n in self.model.graph.node:
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == "input_ids" and n.input[0] in init:
                return int(init[n.input[0]].dims[0])
        tok = self.path.with_name("tokenizer.json") if self.path else None
        if tok is not None and tok.is_file():
            from bbct.golden.tokenize import _load

            return _load(str(tok)).get_vocab_size(with_added_tokens=True)
        return None

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                model.SerializeToString(), _options(self.threads), providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise BbctError(f"onnxruntime cannot load {self._where}: {_first_line(e)}") from None

    def _run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list:
        """``session.run``; onnxruntime's failures (an index outside a table: a sequence longer
        than the position table, shapes the graph cannot take) become one-line BbctErrors."""
        try:
            return session.run(None, feeds)
        except Exception as e:
            shapes = {tuple(np.shape(v)) for v in feeds.values()}
            on = (
                f"inputs of shape {next(iter(shapes))}"
                if len(shapes) == 1
                else ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in feeds.items())
            )
            raise BbctError(f"onnxruntime cannot run {self._where} on {on}: {_first_line(e)}") from None

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Keep the inputs the model takes; unknown names and bad ids are BbctErrors."""
        out = {}
        for k, v in feeds.items():
            if k not in self.input_names:
                if k == "token_type_ids":  # tokenizers always produce it; some exports drop it
                    continue
                raise BbctError(f"input {k!r} is not an input of {self._where} (inputs: {self.input_names})")
            out[k] = np.asarray(v)
        missing = [n for n in self.input_names if n not in out]
        if missing:
            raise BbctError(f"missing input(s) {missing} of {self._where}")
        ids = out.get("input_ids")
        if ids is not None and self.vocab_size is not None and ids.size:
            bad = np.argwhere((ids < 0) | (ids >= self.vocab_size))
            if len(bad):
                i = tuple(int(v) for v in bad[0])
                raise BbctError(
                    f"input_ids{list(i)} = {int(ids[i])} is outside the vocabulary 0..{self.vocab_size - 1} "
                    f"of {self._where}"
                )
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs by name."""
        feeds = self.check_inputs(feeds)
        if self._plain is None:
            self._plain = self._session(self.model)
        vals = self._run(self._plain, feeds)
        return dict(zip(self.output_names, vals, strict=True))

    def reset(self, threads: int | None = None) -> None:
        """Drop the onnxruntime sessions (made again on the next run), with ``threads``: a
        forked process must not use its parent's sessions, whose thread pools it lacks."""
        # the old sessions are kept, never destroyed here: in a forked child their thread pools
        # do not exist, and tearing them down could wait on threads that will never answer
        _FORKED.append((self._plain, self._all, self._some))
        self.threads = threads
        self._plain = self._all = None
        self._some = {}

    def tensor_names(self) -> list[str]:
        """Every tensor :meth:`run_all` returns: node outputs and graph outputs, in graph order."""
        names = dict.fromkeys(t for node in self.model.graph.node for t in node.output if t)
        names.update(dict.fromkeys(self.output_names))
        return list(names)

    def _session_with_outputs(self, names: list[str] | None) -> tuple[ort.InferenceSession, list[str]]:
        """A session whose outputs are the graph outputs and the node outputs ``names`` (None:
        every node output). The outputs are added to the model itself and removed again: a
        copy would hold the weights twice."""
        m = self.model
        typed = _inferred_types(m)
        for node in m.graph.node:
            for t in node.output:
                if t:
                    self.producer[t] = (node.name, node.op_type)
        missing = [t for t in names or () if t not in self.producer]
        if missing:
            raise BbctError(f"{self._where} has no tensor(s) {missing[:3]}")
        have = {o.name for o in m.graph.output}
        n_out = len(m.graph.output)
        for t in list(self.producer) if names is None else names:
            if t not in have:
                # typed from shape inference where it knows the tensor; onnxruntime infers the
                # rest itself from an untyped output
                m.graph.output.append(typed.get(t) or onnx.ValueInfoProto(name=t))
                have.add(t)
        try:
            session = self._session(m)
        finally:
            del m.graph.output[n_out:]
        return session, [o.name for o in session.get_outputs()]

    def run_some(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """The graph outputs and the tensors ``names`` (node outputs) by name: the values
        :meth:`run_all` gives (the same unoptimized graph), without copying out the others."""
        feeds = self.check_inputs(feeds)
        key = tuple(sorted(set(names) - set(self.output_names)))
        if key not in self._some:
            self._some[key] = self._session_with_outputs(list(key))
        session, out_names = self._some[key]
        vals = self._run(session, feeds)
        return dict(zip(out_names, vals, strict=True))

    def run_all(self, feeds: dict[str, np.ndarray]) -> Golden:
        """Every node output (and the graph outputs) by tensor name."""
        feeds = self.check_inputs(feeds)
        if self._all is None:
            self._all, self._all_names = self._session_with_outputs(None)
        vals = self._run(self._all, feeds)
        return Golden(dict(zip(self._all_names, vals, strict=True)), self.producer, self.output_names)


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """value_info of every tensor onnx shape inference can type (empty if it cannot run)."""
    with _large_weights_set_aside(model):  # inference reads their dims, not their values
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # inference is a convenience here; onnxruntime types the outputs anyway
            return {}
    return {v.name: v for v in inferred.graph.value_info if v.type.HasField("tensor_type")}


@contextlib.contextmanager
def _large_weights_set_aside(model: onnx.ModelProto, min_bytes: int = 1 << 16) -> Iterator[None]:
    """Take the raw data of initializers of ``min_bytes`` or more out of ``model`` for the
    duration (dims and type stay), so that what copies or serializes the model meanwhile (shape
    inference does both) handles kilobytes, not the weights. Small ones (shapes, indices,
    constants an inference may read) stay."""
    aside = []
    for t in model.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) >= min_bytes:
            aside.append((t, t.raw_data))
            t.ClearField("raw_data")
    try:
        yield
    finally:
        for t, raw in aside:
            t.raw_data = raw


def run_float(
    model: str | Path | GoldenRunner, inputs: dict[str, np.ndarray], batch: int | None = 64
) -> dict[str, np.ndarray]:
    """The model's float outputs by name, ``batch`` rows at a time (None: all at once).

    ``inputs`` share their first (batch) axis, e.g. the output of
    :func:`bbct.golden.tokenize.encode`; the per-batch outputs are concatenated along it.
    """
    runner = model if isinstance(model, GoldenRunner) else GoldenRunner(model)
    n = len(next(iter(inputs.values())))
    if batch is None or n <= batch:
        return runner.run(inputs)
    parts = [runner.run({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
