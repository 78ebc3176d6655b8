"""Where a result came from: bbct's version and commit, the model file's sha256, the library
versions that can change a float golden output, and when it was made.

Every report and vector manifest bbct writes carries this record, so a number or a dump can be
traced back to the exact model and code that produced it, and two results can be told apart.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import bbct
from bbct.golden.data import sha256_file

_ROOT = Path(bbct.__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the checkout bbct runs from, with ``-dirty`` when files differ from it;
    None for an installed copy outside git."""
    if not (_ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# sha256 of a model file keyed by (path, size, mtime): a 90 MB model is hashed once per process
_SHA: dict[tuple[str, int, int], str] = {}


def model_sha256(path: str | Path) -> str:
    """Hex sha256 of the model file (cached while the file's size and mtime are unchanged)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = sha256_file(p)
    return _SHA[key]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance(model: str | Path | None = None) -> dict[str, Any]:
    """The provenance record: ``bbct_version``, ``bbct_commit`` (None outside a git checkout),
    ``model`` and ``model_sha256`` when a model path is given, library versions, the host's
    Python and a UTC timestamp."""
    rec: dict[str, Any] = {
        "bbct_version": bbct.__version__,
        "bbct_commit": source_commit(),
    }
    if model is not None:
        rec["model"] = str(model)
        rec["model_sha256"] = model_sha256(model)
    rec["libraries"] = {d: _version(d) for d in ("numpy", "numba", "onnx", "onnxruntime")}
    rec["python"] = platform.python_version()
    rec["created_utc"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rec["host_cpus"] = os.cpu_count()
    return rec
