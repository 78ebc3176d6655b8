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

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
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


# where a detached initializer's data is said to be: no file, the values come with the model
DETACHED = "*/bbct_detached/*"
DETACH_MIN_BYTES = 1 << 16  # initializers this large or larger are detached (weights, tables)
# the types of weights and codes that are detached; shapes, axes and indices (int32, int64),
# which shape inference reads, stay in the model whatever their size
_DETACHABLE = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16)}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _copy_fields(src, dst, skip: tuple[str, ...] = ()) -> None:
    """Copy the fields set in message ``src`` into ``dst``, but those named in ``skip``."""
    for fd, v in src.ListFields():
        if fd.name in skip:
            continue
        if hasattr(v, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(v)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(v)
        else:
            setattr(dst, fd.name, v)


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every field but its graph's initializers (each caller adds
    them back, whole or without their data)."""
    small = onnx.ModelProto()
    _copy_fields(model, small, skip=("graph",))
    if model.HasField("graph"):
        _copy_fields(model.graph, small.graph, skip=("initializer",))
    return small


def _raw_values(t: onnx.TensorProto, min_bytes: int) -> np.ndarray | None:
    """The values of initializer ``t`` as a read-only array over one copy of its raw data, when
    it has ``min_bytes`` or more of it, exactly its shape's size, of a detachable type and
    nothing else (tensors the checker accepts as they are); else None."""
    if t.ByteSize() < min_bytes or not t.HasField("raw_data") or t.HasField("segment"):
        return None
    if t.data_location == onnx.TensorProto.EXTERNAL or any(len(getattr(t, f)) for f in _TYPED_FIELDS):
        return None
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    except Exception:  # an unknown or undefined type: left to the checker
        return None
    dims = tuple(t.dims)
    if dtype not in _DETACHABLE or any(d < 0 for d in dims):
        return None
    raw = t.raw_data
    if len(raw) < min_bytes or len(raw) != dtype.itemsize * int(np.prod(dims, dtype=np.int64)):
        return None
    return np.frombuffer(raw, dtype).reshape(dims)


def detach_weights(
    model: onnx.ModelProto, min_bytes: int | None = None
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` without the data of its large initializers, and their values by name.

    An initializer of ``min_bytes`` (default :data:`DETACH_MIN_BYTES`) or more of raw data
    (exactly its shape's size; float or 8/16-bit integer: a weight, a table, codes, not a
    shape) keeps its name, type and dims in the copy, its data marked external at
    :data:`DETACHED` (no file); its values are a read-only array over one copy of the bytes.
    ``model`` is not changed: dropping it then leaves one copy of the weights, not the
    protobuf's and a serialized one besides. :class:`GoldenRunner` takes both back
    (``weights=``) and gives the values to onnxruntime as external initializers: the same
    bits as the whole model (tested), without serializing the weights for each session.
    On a big-endian machine nothing is detached (the raw data is little-endian)."""
    min_bytes = DETACH_MIN_BYTES if min_bytes is None else min_bytes
    if sys.byteorder == "big":
        small = onnx.ModelProto()
        small.CopyFrom(model)
        return small, {}
    small = _without_initializers(model)
    weights: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        v = _raw_values(t, min_bytes)
        if v is None or t.name in weights:
            small.graph.initializer.add().CopyFrom(t)
            continue
        nt = small.graph.initializer.add()
        _copy_fields(t, nt, skip=("raw_data",))
        nt.data_location = onnx.TensorProto.EXTERNAL
        nt.external_data.add(key="location", value=DETACHED)
        weights[t.name] = v
    return small, weights


def checkable(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of a detached ``model`` for ``onnx.checker``: each detached initializer is an
    empty tensor of its name and type. :func:`detach_weights` takes only tensors the checker
    accepts as they are; what it checks elsewhere (nodes, names, opsets) does not read an
    initializer's dims or data."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in weights and _is_detached(t):
            t.ClearField("data_location")
            t.ClearField("external_data")
            del t.dims[:]
            t.dims.append(0)
            t.raw_data = b""
    return m


def _is_detached(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == DETACHED for e in t.external_data
    )


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

    def __init__(
        self,
        model: str | Path | onnx.ModelProto,
        threads: int | None = None,
        weights: dict[str, np.ndarray] | None = None,
    ) -> None:
        """``model``: a file (loaded with its large initializers detached, see
        :func:`detach_weights`) or a model; ``weights``: the values of a model's detached
        initializers by name."""
        if isinstance(model, onnx.ModelProto):
            self.model, self.weights = model, dict(weights or {})
        else:
            self.model, self.weights = detach_weights(load_onnx(model))
        self._values: dict[str, ort.OrtValue] | None = None  # the weights as onnxruntime sees them
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
        so = _options(self.threads)
        if self.weights:  # the detached initializers, from memory (the arrays stay referenced here)
            if self._values is None:
                self._values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.weights.items()}
            # onnxruntime drops an initializer no node reads before it takes the given values
            used = [k for k in _read_names(model.graph) if k in self._values]
            so.add_external_initializers(used, [self._values[k] for k in used])
        try:
            return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
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


def _read_names(graph: onnx.GraphProto) -> list[str]:
    """The tensors read by the nodes of ``graph`` (and of their subgraphs) or given out by it."""
    names = dict.fromkeys(o.name for o in graph.output)
    for n in graph.node:
        names.update(dict.fromkeys(t for t in n.input if t))
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                names.update(dict.fromkeys(_read_names(g)))
    return list(names)


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """value_info of every tensor onnx shape inference can type (empty if it cannot run)."""
    try:  # inference reads the weights' dims, not their values
        inferred = onnx.shape_inference.infer_shapes(_without_large_data(model))
    except Exception:  # inference is a convenience here; onnxruntime types the outputs anyway
        return {}
    return {v.name: v for v in inferred.graph.value_info if v.type.HasField("tensor_type")}


def _without_large_data(model: onnx.ModelProto, min_bytes: int = DETACH_MIN_BYTES) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers of ``min_bytes`` or more of raw data have none
    (dims and type stay), so that what copies or serializes it (shape inference does both)
    handles kilobytes, not the weights. Small ones (shapes, indices, constants an inference
    may read) stay. ``model`` is not changed: taking its data out and putting it back would
    copy the weights into its memory again."""
    small = _without_initializers(model)
    for t in model.graph.initializer:
        nt = small.graph.initializer.add()
        if t.HasField("raw_data") and len(t.raw_data) >= min_bytes:
            _copy_fields(t, nt, skip=("raw_data",))
        else:
            nt.CopyFrom(t)
    return small


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
