"""Progress display: tqdm when installed, else a plain line redrawn on stderr.

Shows vectors done, vectors/s and the ETA. Disabled with ``--quiet``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "format_bytes", "format_duration"]


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Count vectors towards ``total``; draws nothing when ``enabled`` is false."""

    def __init__(self, total: int, desc: str, *, enabled: bool, stream: TextIO | None = None):
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream or sys.stderr
        self._bar: Any = None
        self._plain = False
        self._drawn = False  # whether the plain line is on screen (and needs clearing)
        self._start = self._last = time.monotonic()
        if not enabled or total <= 0:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self._plain = True
            return
        self._bar = tqdm(
            total=total,
            desc=desc,
            unit="vec",
            unit_scale=True,
            smoothing=0.1,
            dynamic_ncols=True,
            leave=False,  # the one-line report replaces the bar
            file=self.stream,
        )

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._plain:
            now = time.monotonic()
            if now - self._last >= 1.0 or self.done >= self.total:
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.stream.write(
            f"\r{self.desc}: {self.done:,}/{self.total:,} vectors "
            f"({100 * self.done / self.total:.0f}%) {rate:,.0f} vec/s ETA {format_duration(eta)}"
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._plain:
            if self._drawn:  # clear the line for the report (nothing to clear otherwise)
                self.stream.write("\r\033[K")
                self.stream.flush()
            self._plain = self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
