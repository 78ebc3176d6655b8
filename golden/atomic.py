"""Every file bbct writes goes through here: written to a unique temporary name in the target's
own folder, flushed to disk, then renamed over the target — so a reader sees the old file or
the new one, never half of one, and a full disk or a killed process leaves the old file intact.

Failures (the folder is a file, read-only, full) become one-line :class:`BbctError`\\ s that
name the path. JSON is strict: NaN and infinities are written as ``null`` by
:func:`json_safe`, never as the bare ``NaN`` tokens other readers reject.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from bbct.golden.errors import BbctError

TMP_PREFIX = ".bbct-tmp-"  # leftovers of a killed writer carry this prefix (cleaned by the cache)


def _oserror(path: Path, e: OSError) -> BbctError:
    why = e.strerror or str(e)
    return BbctError(f"{path}: cannot write: {why}")


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` only when the block ends without
    an exception; the temporary file is removed otherwise."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder", str(path))
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
    except OSError as e:
        raise _oserror(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise _oserror(path, e) from None
    except BaseException:
        _unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_with(path: str | Path, writer: Callable[[BinaryIO], None]) -> Path:
    """``writer(f)`` fills the file (``np.save``, ``np.savez``, a zip writer...)."""
    with atomic_open(path) as f:
        writer(f)
    return Path(path)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy scalars
        return json_safe(obj.item())
    return obj


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """Strict JSON (no NaN/Infinity tokens), written atomically."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False)
    return write_text(path, text + "\n")
