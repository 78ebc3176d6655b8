"""Golden vectors for RTL testbenches: the integer inputs and outputs of any IR node.

For every selected node bbct writes, into one folder:

* ``<node>.<port>.hex`` — the integer codes, one per line, row-major, as two's complement
  hexadecimal of the port's width (``$readmemh`` reads them);
* ``<node>.<port>.exp.hex`` — the per-block exponents (two's complement, 16 bits);
* a float attention mask read by a ``mask`` node is written as 1-bit flags (1 = masked), with
  no exponent file;
* ``<node>.<port>.npy`` — the same codes as a NumPy array (``--format npy``);
* ``<node>.<table>.hex`` — constant tables of the node (weights, biases, LUT contents);
* ``vectors.json`` — for every file: node, port, shape, dtype, format (width, signedness,
  block axis and size, scale kind, rounding, saturation), exponent layout, the node's integer
  parameters, and the file's sha256, so a run can be reproduced and checked byte for byte.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from bbct.golden.atomic import json_safe, write_text, write_with
from bbct.golden.errors import BbctError

EXP_BITS = 16


def to_hex_lines(values: np.ndarray, bits: int) -> str:
    """Two's complement hex of ``values`` at ``bits`` width, one per line (``$readmemh``)."""
    v = np.asarray(values).astype(np.int64).ravel()
    digits = max(1, -(-bits // 4))
    mask = (1 << bits) - 1 if bits < 64 else -1
    return "".join(f"{(int(x) & mask):0{digits}x}\n" for x in v)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _params_dict(node: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """JSON-able scalar parameters of a node, and its array constants (dumped as files)."""
    scalars: dict[str, Any] = {"op": node.op}
    arrays: dict[str, np.ndarray] = {}
    for k, v in vars(node).items():
        if k in ("name", "inputs", "onnx_name") or v is None:
            continue
        if hasattr(v, "data") and hasattr(v, "fmt"):  # a stored QTensor (weights, tables)
            arrays[k] = v.data
            arrays[k + ".exp"] = np.asarray(v.exp)
            scalars[k + ".format"] = v.fmt.to_dict()
        elif hasattr(v, "to_dict"):  # IntFormat, kernel parameter records (LUTs inside)
            d = v.to_dict()
            for pk, pv in list(d.items()):
                if isinstance(pv, (list, tuple, np.ndarray)) and np.asarray(pv).size > 8:
                    arrays[f"{k}.{pk}"] = np.asarray(pv)
                    d[pk] = f"<{node.name}.{k}.{pk}.hex>"
            scalars[k] = d
        elif isinstance(v, np.ndarray):
            if v.size > 8:
                arrays[k] = v
            else:
                scalars[k] = v.tolist()
        elif hasattr(v, "name") and hasattr(v, "value"):  # rounding / saturation enums
            scalars[k] = v.name
        elif isinstance(v, (int, float, str, bool, tuple)):
            scalars[k] = v
    return scalars, arrays


def dump_vectors(
    graph: Any,
    tensors: dict[str, Any],
    out_dir: str | Path,
    nodes: list[str] | None = None,
    fmt: str = "hex",
) -> Path:
    """Write vectors for the nodes whose names match any glob in ``nodes`` (all if None).

    ``tensors`` maps tensor names (graph inputs and node outputs) to QTensors, as a traced
    run returns them. Returns the path of ``vectors.json``.
    """
    if fmt not in ("hex", "npy"):
        raise BbctError(f"format={fmt!r}: expected hex or npy")
    out = Path(out_dir)
    selected = [n for n in graph.nodes if nodes is None or any(fnmatch.fnmatch(n.name, pat) for pat in nodes)]
    if not selected:
        names = ", ".join(n.name for n in graph.nodes[:12])
        raise BbctError(f"no node matches {nodes}; nodes are named like: {names}, ...")
    # The manifest is what makes a folder of vectors valid: the old one goes first (a killed
    # dump leaves no manifest, never one listing files that now hold other data), the new one
    # is written last; files of the old dump that this one does not rewrite are removed.
    path = out / "vectors.json"
    stale = _listed(path)
    if path.exists():
        path.unlink()
    files: list[dict[str, Any]] = []

    def write(node: str, port: str, arr: np.ndarray, bits: int, meta: dict[str, Any]) -> None:
        arr = np.asarray(arr)
        if fmt == "npy":
            p = out / f"{node}.{port}.npy"
            write_with(p, lambda f: np.save(f, arr))
        else:
            p = out / f"{node}.{port}.hex"
            write_text(p, to_hex_lines(arr, bits))
        files.append(
            {
                "node": node,
                "port": port,
                "file": p.name,
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "bits": bits,
                "sha256": _sha(p),
                **meta,
            }
        )

    entries = []
    for n in selected:
        ports = [(f"in{i}", t) for i, t in enumerate(n.inputs)] + [("out", n.name)]
        for port, t in ports:
            q = tensors.get(t)
            if q is None:
                raise BbctError(f"tensor {t!r} of node {n.name} was not traced")
            if not hasattr(q, "fmt"):  # a float mask of the index subgraph: a Mask node reads it as flags
                write(n.name, port, _mask_flags(n, t, np.asarray(q)), 1, {"tensor": t, "flags": FLAGS})
                continue
            write(
                n.name,
                port,
                q.data,
                q.fmt.bits,
                {"tensor": t, "format": q.fmt.to_dict(), "exp_shape": list(np.shape(q.exp))},
            )
            write(n.name, port + ".exp", np.asarray(q.exp), EXP_BITS, {"tensor": t})
        scalars, arrays = _params_dict(n)
        for k, a in arrays.items():
            a = np.asarray(a)
            bits = 64 if a.dtype.kind not in "iu" else max(2, int(np.iinfo(a.dtype).bits))
            if a.dtype.kind in "iu" and a.size:
                lo, hi = int(a.min()), int(a.max())
                bits = max(2, max(abs(lo), abs(hi)).bit_length() + 1)
            write(n.name, k, a.astype(np.int64), bits, {"constant": True})
        entries.append(
            {"node": n.name, "op": n.op, "inputs": list(n.inputs), "onnx_name": n.onnx_name, "params": scalars}
        )
    manifest = {
        "config": graph.config_name,
        "nodes": entries,
        "files": files,
        "conventions": {
            "hex": "two's complement at 'bits' width, one value per line, row-major",
            "exp": f"per-block exponent, two's complement {EXP_BITS} bits; real = code * 2**exp",
        },
    }
    write_text(path, json.dumps(json_safe(manifest), indent=1, default=str))
    for name in stale - {f["file"] for f in files}:
        (out / name).unlink(missing_ok=True)
    return path


FLAGS = "1 = masked position (the float mask holds the masking value), 0 = kept"


def _mask_flags(node: Any, tensor: str, mask: np.ndarray) -> np.ndarray:
    """The 1-bit flags a float additive mask stands for, as the Mask node reads it: its values
    are discrete (0 or the one masking value), never computed with."""
    value = getattr(node, "float_value", None)
    if getattr(node, "kind", None) != "add" or value is None or mask.dtype.kind != "f":
        raise BbctError(f"tensor {tensor!r} of node {node.name} is a float array, not integer codes")
    return (mask == value).astype(np.int64)


def _listed(manifest: Path) -> set[str]:
    """Files a previous ``vectors.json`` in the folder lists (plain names, nothing outside it)."""
    try:
        files = json.loads(manifest.read_text()).get("files", [])
        return {f["file"] for f in files if isinstance(f, dict) and Path(str(f.get("file", ""))).name == f["file"]}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return set()
