"""Progress for the long steps (fine-tune, float accuracy, eval).

In a terminal, a ``tqdm`` bar redraws in place. In a log file or CI pipe, redraws would put
an hour of fine-tuning on one ``\\r``-separated line, so :class:`LogProgress` writes whole
lines instead: one every ``LOG_INTERVAL_S`` while the step runs, and one final line when it
ends — each newline-terminated, none repeated.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

LOG_INTERVAL_S = 30.0


class LogProgress:
    """The part of tqdm's interface bbct uses (iterate, ``update``, ``set_postfix``,
    ``close``), printing plain lines: ``desc: n/total steps (pct) elapsed s, eta s [postfix]``."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        file: TextIO | None = None,
        interval: float = LOG_INTERVAL_S,
        **_: Any,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for x in self.iterable or ():
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, refresh: bool = True, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def _line(self, final: bool = False) -> None:
        if self.disable:
            return
        el = time.monotonic() - self.start
        head = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        if self.total:
            head += f" ({100.0 * self.n / self.total:.0f} %)"
        tail = f", {el:.0f} s" + (" (done)" if final else "")
        if not final and self.total and self.n:
            tail += f", about {el / self.n * (self.total - self.n):.0f} s left"
        print(head + tail + (f" [{self.postfix}]" if self.postfix else ""), file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(final=True)


def progress(iterable: Iterable | None = None, **kwargs: Any):
    """A ``tqdm`` bar in a terminal, :class:`LogProgress` lines otherwise."""
    if not sys.stderr.isatty():
        return LogProgress(iterable, **kwargs)
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)
