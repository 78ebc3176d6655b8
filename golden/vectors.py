"""Golden vectors for RTL testbenches: the integer inputs and outputs of any IR node.

For every selected node bbct writes, into one folder (docs/KERNELS.md, "Vector manifest",
describes every field):

* ``<node>.<port>.hex`` — the integer codes, one per line, row-major, as hexadecimal of the
  port's width: two's complement for a signed port, plain binary for an unsigned one (the
  width and signedness come from the tensor's format, :mod:`bbct.golden.params`);
  ``$readmemh`` reads them;
* ``<node>.<port>.exp.hex`` — the per-block exponents (two's complement, 16 bits);
* a float attention mask read by a ``mask`` node is written as 1-bit flags (1 = masked), with
  no exponent file;
* ``<node>.<port>.npy`` — the same codes as a NumPy array (``--format npy``);
* ``<node>.<table>.hex`` — constant tables of the node (weights, biases, LUT contents);
* ``params.json`` and ``bbct_params.sv`` — every node's widths and integer parameters;
* ``vectors.json`` — the manifest: for every file its node, port, shape, width, signedness and
  encoding, format, exponent layout and sha256; the node's parameters and overflow /
  saturation counts; the resolved config, provenance, input texts and token ids.

``constants="per-input"`` (the default) puts every text of the call into one batch, in one
folder, with each node's constants beside its stimulus. ``constants="once"`` writes the
constants once under ``constants/`` and each text's stimulus under ``input<i>/`` (a batch of
one); the linear's wide ``weight`` is then left out, as ``stored`` and its exponents rebuild it
(``rebuild`` in the manifest).

The dump is atomic: it is written into a temporary folder beside ``out`` and renamed into
place when complete. A folder that already holds anything is refused unless ``force``, which
replaces it (only an empty folder or an earlier dump, one with a ``vectors.json``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bbct.golden.atomic import TMP_PREFIX, json_safe, write_bytes, write_text, write_with
from bbct.golden.errors import BbctError
from bbct.golden.params import EXP_BITS, LAYOUTS, Port, constant_port, node_arrays, params_json, params_sv, tensor_ports

CONSTANTS = ("per-input", "once")
MANIFEST_VERSION = 2
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)

REBUILD_WEIGHT = (
    "weight = align(stored, reduce_axes=(0, 1), guard=weight_guard, RND_CONV): e_ref = max(stored.exp over "
    "non-zero blocks) - weight_guard = w_exp; weight[k, n] = (stored[k, n] * mant) >>RND_CONV (e_ref - "
    "stored.exp[block of k, n]), a left shift when negative (mant = 1 for pow2 scales); an all-zero "
    "block (exp = -1024) gives 0. docs/KERNELS.md, linear."
)


@dataclass
class Stimulus:
    """One simulated batch: every traced tensor (graph inputs too), overflow counts by node,
    and what was fed (texts, token ids) for the manifest."""

    tensors: dict[str, Any]
    overflow: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)


def to_hex_bytes(values: np.ndarray, bits: int) -> bytes:
    """``values`` as hex of ``bits`` width (two's complement for negatives, i.e. the low
    ``bits`` bits), ``ceil(bits / 4)`` digits, one per line (``$readmemh``)."""
    v = np.ascontiguousarray(np.asarray(values).astype(np.int64).ravel()).view(np.uint64)
    digits = max(1, -(-bits // 4))
    if bits < 64:
        v = v & np.uint64((1 << bits) - 1)
    out = np.empty((v.size, digits + 1), np.uint8)
    for i in range(digits):
        out[:, i] = _HEX[((v >> np.uint64(4 * (digits - 1 - i))) & np.uint64(15)).astype(np.intp)]
    out[:, digits] = ord("\n")
    return out.tobytes()


def to_hex_lines(values: np.ndarray, bits: int) -> str:
    """:func:`to_hex_bytes` as text."""
    return to_hex_bytes(values, bits).decode("ascii")


def encoding(port: Port, fmt: str) -> str:
    if fmt == "npy":
        return f"npy array of the codes; the port is {'signed' if port.signed else 'unsigned'} {port.bits} bits"
    kind = "two's complement" if port.signed else "unsigned binary"
    return f"hex, {kind}, {port.bits} bits ({max(1, -(-port.bits // 4))} digits), one value per line, row-major"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _fits(arr: np.ndarray, port: Port, where: str) -> None:
    """A value outside its port's range is a bug in a width rule: say where, never wrap it."""
    a = np.asarray(arr)
    if not a.size or a.dtype.kind not in "iub":
        return
    lo, hi = (-(1 << (port.bits - 1)), (1 << (port.bits - 1)) - 1) if port.signed else (0, (1 << port.bits) - 1)
    mn, mx = int(a.min()), int(a.max())
    if mn < lo or mx > hi:
        bad = mn if mn < lo else mx
        sign = "signed" if port.signed else "unsigned"
        raise BbctError(f"{where}: value {bad} does not fit its {sign} {port.bits}-bit port")


def _vanished(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class _Folder:
    """Writes into a temporary folder beside ``out``; :meth:`commit` renames it into place."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out = out
        if out.exists() and not out.is_dir():
            raise BbctError(f"{out}: is a file, not a folder for vectors")
        used = out.is_dir() and any(out.iterdir())
        if used and not force:
            raise BbctError(f"{out}: folder is not empty; choose a new --out or pass --force to replace it")
        if used and not (out / "vectors.json").is_file():
            raise BbctError(f"{out}: holds files but no vectors.json (not a bbct dump): refusing to replace it")
        parent = out.parent
        parent.mkdir(parents=True, exist_ok=True)
        stem = f"{TMP_PREFIX}{out.name}."
        for old in parent.glob(stem + "*"):  # what a killed dump left: its process is gone
            pid = old.name[len(stem) :].split(".")[0]
            if pid.isdigit() and _vanished(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        self.tmp = parent / f"{stem}{os.getpid()}.{secrets.token_hex(4)}"
        self.tmp.mkdir()

    def commit(self) -> None:
        if self.out.exists():  # --force: the old dump goes aside, the new one in, the old one away
            aside = self.tmp.with_name(self.tmp.name + ".old")
            os.rename(self.out, aside)
            os.rename(self.tmp, self.out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _Writer:
    def __init__(self, root: Path, fmt: str) -> None:
        self.root, self.fmt, self.files = root, fmt, []

    def write(self, rel: str, node: str, port: str, arr: np.ndarray, p: Port, meta: dict[str, Any]) -> None:
        arr = np.asarray(arr)
        _fits(arr, p, f"node {node} {port}")
        path = self.root / f"{rel}.{self.fmt}"
        if self.fmt == "npy":
            write_with(path, lambda f: np.save(f, arr))
        else:
            write_bytes(path, to_hex_bytes(arr, p.bits))
        self.files.append(
            {
                "node": node,
                "port": port,
                "file": path.relative_to(self.root).as_posix(),
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                **p.to_dict(),
                "encoding": encoding(p, self.fmt),
                "sha256": _sha(path),
                **meta,
            }
        )


def dump_vectors(
    graph: Any,
    tensors: dict[str, Any],
    out_dir: str | Path,
    nodes: list[str] | None = None,
    fmt: str = "hex",
    *,
    overflow: dict[str, int] | None = None,
    inputs: dict[str, Any] | None = None,
    constants: str = "per-input",
    force: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write vectors of one traced batch (``tensors``: graph inputs and node outputs by name,
    as a traced run gives them); see :func:`write_dump`. Returns the path of ``vectors.json``."""
    stim = Stimulus(tensors, overflow or {}, inputs or {})
    return write_dump(graph, [stim], out_dir, nodes, fmt, constants=constants, force=force, extra=extra)


def write_dump(
    graph: Any,
    stimuli: Iterable[Stimulus],
    out_dir: str | Path,
    nodes: list[str] | None = None,
    fmt: str = "hex",
    *,
    constants: str = "per-input",
    force: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write vectors for the nodes whose names match any glob in ``nodes`` (all if None).

    ``stimuli`` is consumed one at a time (a generator keeps one batch in memory). With
    ``constants="per-input"`` there must be one; with ``"once"`` each goes to ``input<i>/``.
    ``extra`` adds top-level manifest fields (config, provenance). Returns ``vectors.json``'s
    path inside ``out_dir``."""
    if fmt not in ("hex", "npy"):
        raise BbctError(f"format={fmt!r}: expected hex or npy")
    if constants not in CONSTANTS:
        raise BbctError(f"constants={constants!r}: expected one of {', '.join(CONSTANTS)}")
    out = Path(out_dir).resolve()  # "." and relative paths: the folder has a name and a parent
    selected = [n for n in graph.nodes if nodes is None or any(fnmatch.fnmatch(n.name, pat) for pat in nodes)]
    if not selected:
        names = ", ".join(n.name for n in graph.nodes[:12])
        raise BbctError(f"no node matches {nodes}; nodes are named like: {names}, ...")
    ports = tensor_ports(graph)
    folder = _Folder(out, force)
    try:
        w = _Writer(folder.tmp, fmt)
        once = constants == "once"
        entries = {n.name: _entry(n) for n in selected}
        for n in selected:
            _write_constants(w, n, "constants/" if once else "", skip=("weight",) if once else ())
        inputs = []
        for i, stim in enumerate(stimuli):
            if not once and i:
                raise BbctError("constants='per-input' takes one batch of stimulus")
            sub = f"input{i}/" if once else ""
            for n in selected:
                _write_ports(w, n, stim.tensors, ports, sub, i if once else None)
                entries[n.name]["overflow"].append(int(stim.overflow.get(n.name, 0)))
            inputs.append({"index": i, "folder": sub.rstrip("/") or ".", **stim.inputs})
        for e in entries.values():
            e["overflow_total"] = sum(e["overflow"])
        write_text(folder.tmp / "params.json", json.dumps(json_safe(params_json(graph)), indent=1) + "\n")
        write_text(folder.tmp / "bbct_params.sv", params_sv(graph))
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "config_name": graph.config_name,
            **(extra or {}),
            "constants": constants,
            "inputs": inputs,
            "nodes": list(entries.values()),
            "files": w.files,
            "params": {"json": "params.json", "sv": "bbct_params.sv", "sv_package": "bbct_params"},
            "rebuild": {"linear.weight": REBUILD_WEIGHT} if once else {},
            "conventions": {
                "hex": "one value per line, row-major (C order) over 'shape'; each file's 'bits', 'signed' and "
                "'encoding' give its width: two's complement when signed, plain binary when unsigned; the "
                "width is the port's, fixed by the tensor's format, not by the values in the file",
                "exp": f"per-block exponent files (*.exp), two's complement {EXP_BITS} bits; real value = code * "
                "2**exp (times the block's mant for mult scales); -1024 marks an all-zero block",
                "flags": FLAGS,
                "overflow": "per node, per input: overflow and saturation events counted by the kernels",
            },
        }
        write_text(folder.tmp / "vectors.json", json.dumps(json_safe(manifest), indent=1, default=str))
        folder.commit()
    except BaseException:
        folder.abort()
        raise
    return out / "vectors.json"


def _entry(n: Any) -> dict[str, Any]:
    scalars, _ = node_arrays(n)
    return {
        "node": n.name,
        "op": n.op,
        "inputs": list(n.inputs),
        "onnx_name": n.onnx_name,
        "params": scalars,
        "overflow": [],
    }


def _write_constants(w: _Writer, n: Any, sub: str, skip: tuple[str, ...]) -> None:
    _, arrays = node_arrays(n)
    for k, a in arrays.items():
        if k in skip:
            continue
        meta: dict[str, Any] = {"constant": True}
        if k in LAYOUTS:
            meta["layout"] = LAYOUTS[k]
        w.write(f"{sub}{n.name}.{k}", n.name, k, np.asarray(a).astype(np.int64), constant_port(n, k), meta)


def _write_ports(w: _Writer, n: Any, tensors: dict[str, Any], ports: dict[str, Port], sub: str, i: int | None) -> None:
    for port, t in [(f"in{k}", t) for k, t in enumerate(n.inputs)] + [("out", n.name)]:
        q = tensors.get(t)
        if q is None:
            raise BbctError(f"tensor {t!r} of node {n.name} was not traced")
        meta: dict[str, Any] = {"tensor": t, "input": i}
        if not hasattr(q, "fmt"):  # a float mask of the index subgraph: a Mask node reads it as flags
            flags = _mask_flags(n, t, np.asarray(q))
            w.write(f"{sub}{n.name}.{port}", n.name, port, flags, Port(1, False), {**meta, "flags": FLAGS})
            continue
        fmt = {**q.fmt.to_dict(), **ports[t].to_dict()}
        meta.update({"format": fmt, "exp_shape": list(np.shape(q.exp))})
        w.write(f"{sub}{n.name}.{port}", n.name, port, q.data, ports[t], meta)
        side = {"tensor": t, "input": i}
        w.write(f"{sub}{n.name}.{port}.exp", n.name, port + ".exp", np.asarray(q.exp), Port(EXP_BITS, True), side)
        if getattr(q, "mant", None) is not None:
            mant = Port(q.fmt.mant_bits, False)
            w.write(f"{sub}{n.name}.{port}.mant", n.name, port + ".mant", np.asarray(q.mant), mant, side)


FLAGS = "1 = masked position (the float mask holds the masking value), 0 = kept"


def _mask_flags(node: Any, tensor: str, mask: np.ndarray) -> np.ndarray:
    """The 1-bit flags a float additive mask stands for, as the Mask node reads it: its values
    are discrete (0 or the one masking value), never computed with."""
    value = getattr(node, "float_value", None)
    if getattr(node, "kind", None) != "add" or value is None or mask.dtype.kind != "f":
        raise BbctError(f"tensor {tensor!r} of node {node.name} is a float array, not integer codes")
    return (mask == value).astype(np.int64)
