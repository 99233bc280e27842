"""Progress of long driver-side work, with an ETA: a tqdm bar in a terminal, and a plain
line every few seconds otherwise (a log file, `ray job logs`, CI)."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """`update(n)` as work gets done; `close()` at the end. `total` may be unknown (None):
    then there is a count and a rate, but no ETA."""

    def __init__(self, what: str, total: int | None, unit: str = "images", every_s: float = 10.0,
                 stream=None):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit.rstrip("s"), file=self.stream)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.started, 1e-9)
        text = f"{self.what}: {self.done:,}"
        if self.total:
            eta = (self.total - self.done) / rate if rate else float("inf")
            text += f"/{self.total:,} {self.unit} ({self.done / self.total:.0%})"
            return f"{text}, {rate:,.0f}/s, ETA {format_duration(eta) if eta != float('inf') else '?'}"
        return f"{text} {self.unit}, {rate:,.0f}/s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            took = time.monotonic() - self.started
            print(f"{self.what}: {self.done:,} {self.unit} in {format_duration(took)}", file=self.stream, flush=True)
