"""Progress where a person waits: a tqdm bar (rate, ETA) in a terminal, one line per `every_percent` in logs.

    with Progress(total=len(files), desc="enhance", unit="image") as progress:
        for item in work:
            ...
            progress.update()

A log file or `ray job logs` is not a terminal: a redrawn bar there is thousands of carriage returns, so
the same information comes as a plain line at each 10% (and at the end).
"""

from __future__ import annotations

import sys
import time
from typing import IO


def format_seconds(seconds: float) -> str:
    """0:42, 12:05, 3:07:40."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Counts done items of a known total and shows rate and ETA (see the module docstring)."""

    def __init__(self, total: int, desc: str, unit: str = "item", *, stream: IO[str] | None = None,
                 every_percent: int = 10, bar: bool | None = None):
        """Args:
            total: how many items there are.
            desc: what is being done ("enhance", "shards").
            unit: the item's name, singular.
            stream: where to write (default stderr).
            every_percent: without a terminal, one line each time this many percent more are done.
            bar: force the tqdm bar on or off (default: when `stream` is a terminal).
        """
        self.total, self.desc, self.unit = max(0, int(total)), desc, unit
        self.stream = stream or sys.stderr
        self.every_percent = max(1, every_percent)
        self.done = 0
        self._start = time.monotonic()
        self._next_percent = self.every_percent
        use_bar = bar if bar is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=f" {unit}s", file=self.stream, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, count: int = 1) -> None:
        """`count` more items are done."""
        self.set(self.done + count)

    def set(self, done: int) -> None:
        """`done` items are done in all (the callback form: `write_shards(..., progress=lambda d, t: p.set(d))`)."""
        step, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.update(step)
            return
        if not self.total:
            return
        percent = 100 * self.done // self.total
        if percent >= self._next_percent or self.done == self.total:
            print(self.line(), file=self.stream, flush=True)
            self._next_percent = (percent // self.every_percent + 1) * self.every_percent

    def line(self) -> str:
        """`enhance: 40% (12/30 images), 2.31 images/s, elapsed 0:05, ETA 0:08`."""
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        percent = 100 * self.done // self.total if self.total else 100
        eta_text = format_seconds(eta) if eta == eta else "?"
        return (f"{self.desc}: {percent}% ({self.done}/{self.total} {self.unit}s), {rate:.2f} {self.unit}s/s, "
                f"elapsed {format_seconds(elapsed)}, ETA {eta_text}")

    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
