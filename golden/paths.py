"""Where bbct keeps what it prepares: ``$BBCT_HOME``, else ``~/.cache/bbct``."""

from __future__ import annotations

import os
from pathlib import Path

ENCODER = "minilm-l6-encoder"
CLASSIFIER = "minilm-l6-rt"
TASK = "rt-polarity"


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


def default_model(home: str | Path | None = None) -> Path:
    """The prepared RT sentiment classifier (MiniLM-L6 fine-tuned), the embedded default."""
    return model_dir(CLASSIFIER, home) / "model.onnx"
