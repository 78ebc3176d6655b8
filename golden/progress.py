"""Progress bars for the long steps (fine-tune, float accuracy, eval)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

# a log file or CI pipe gets a line this often instead of a redraw every 0.1 s
LOG_INTERVAL_S = 30.0


def progress(iterable: Iterable | None = None, **kwargs: Any):
    """``tqdm`` that redraws in a terminal and writes one line per ``LOG_INTERVAL_S`` otherwise."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        # tqdm's monitor thread redraws a bar idle for maxinterval (10 s), which repeats each
        # line in a log; it should speak only when a step takes longer than the log interval
        kwargs.setdefault("maxinterval", 2 * LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
