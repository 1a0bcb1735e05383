"""The terminal display: the batch (bar, count, rate, ETA) and every server's state, within the terminal's width."""
from __future__ import annotations

import shutil
import sys
import threading
import time


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The batch and each server's state, redrawn in place on a terminal: on one line when it fits the width, else
    the batch on one line and each server on a line of its own, each cut to the width (a cut line would hide the
    servers after the first). Elsewhere (a log file, CI) a plain line every `every` seconds. Notes go above it."""

    def __init__(self, total: int, stream=None, every: float = 10.0, quiet: bool = False, bar: bool = True):
        self.total, self.stream, self.every, self.quiet, self.bar = total, stream or sys.stderr, every, quiet, bar
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.done = self.failed = 0
        self._last = 0.0
        self._lock = threading.Lock()
        self._shown = 0  # lines of the display on the terminal now (the cursor ends the last one)

    def summary(self) -> str:
        n = self.done + self.failed
        frac = n / self.total if self.total else 1.0
        bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
        elapsed = time.monotonic() - self.start
        rate = n / elapsed if elapsed > 0 and n else 0.0
        eta = clock((self.total - n) / rate) if rate else "?"
        failed = f", {self.failed} failed" if self.failed else ""
        return f"[{bar}] {n}/{self.total}{failed} {frac:4.0%} {rate * 60:.1f}/min elapsed {clock(elapsed)} ETA {eta}"

    def line(self, workers) -> str:
        return " | ".join([self.summary()] + [w.describe() for w in workers])

    def lines(self, workers, width: int) -> list[str]:
        """What the terminal shows: one line if it fits `width`, else one for the batch and one per server."""
        one = self.line(workers)
        if len(one) < width:
            return [one]
        return [l if len(l) < width else l[:max(1, width - 4)] + "..." for l in
                [self.summary()] + ["  " + w.describe() for w in workers]]

    def _write(self, text: str):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _erase(self) -> str:
        """Back to the start of the display and clear it (the cursor is at the end of its last line)."""
        if not self._shown:
            return ""
        up = f"\x1b[{self._shown - 1}A" if self._shown > 1 else ""
        self._shown = 0
        return "\r" + up + "\x1b[J"

    def render(self, workers, force: bool = False):
        if self.quiet or not self.bar:
            return
        with self._lock:
            t = time.monotonic()
            if self.tty:
                shown = self.lines(workers, shutil.get_terminal_size((120, 20)).columns)
                self._write(self._erase() + "\n".join(shown))
                self._shown = len(shown)
            elif force or t - self._last >= self.every:
                self._write(self.line(workers) + "\n")
                self._last = t

    def note(self, text: str):
        if self.quiet:
            return
        with self._lock:
            self._write((self._erase() if self.tty else "") + text + "\n")

    def close(self, workers):
        if self.quiet or not self.bar:
            return
        self.render(workers, force=True)
        if self.tty:
            self._write("\n")
            self._shown = 0
