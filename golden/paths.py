"""Where bbct keeps what it prepares: ``$BBCT_HOME``, else ``~/.cache/bbct``.

The manifest names every file by its path relative to that folder (``data/rt-polarity/train.tsv``),
so a copied or moved cache is checked against its own files, never against the original's.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

ENCODER = "minilm-l6-encoder"
CLASSIFIER = "minilm-l6-rt"
TASK = "rt-polarity"
MANIFEST = "manifest.json"
LOCK = ".bbct.lock"  # flock'ed by `bbct prepare` while it writes; never removed (removing a lock file races)


def bbct_home(home: str | Path | None = None) -> Path:
    """The cache folder: ``home`` if given, else ``$BBCT_HOME``, else ``~/.cache/bbct``."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get("BBCT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bbct"


def model_dir(name: str, home: str | Path | None = None) -> Path:
    return bbct_home(home) / "models" / name


def data_dir(home: str | Path | None = None, task: str = TASK) -> Path:
    return bbct_home(home) / "data" / task


def manifest_path(home: str | Path | None = None) -> Path:
    return bbct_home(home) / MANIFEST


def lock_path(home: str | Path | None = None) -> Path:
    return bbct_home(home) / LOCK


def cache_relative(path: Path, home: str | Path | None = None) -> str:
    """``path`` (a file under the cache folder) as the manifest stores it: relative, ``/``-separated."""
    return Path(path).relative_to(bbct_home(home)).as_posix()


def cache_path(stored: str, home: str | Path | None = None) -> Path | None:
    """The file a manifest path names in the cache folder ``home``; None when it would lead
    outside it (an absolute path elsewhere, or ``..``), so a cache only ever vouches for its own files."""
    home = bbct_home(home)
    if not isinstance(stored, str) or not stored:
        return None
    p = Path(stored)
    if p.is_absolute():
        return p if p.resolve().is_relative_to(home.resolve()) else None
    if ".." in PurePosixPath(stored).parts:
        return None
    return home / PurePosixPath(stored)


def default_model(home: str | Path | None = None) -> Path:
    """The prepared RT sentiment classifier (MiniLM-L6 fine-tuned), the embedded default."""
    return model_dir(CLASSIFIER, home) / "model.onnx"
