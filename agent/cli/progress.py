"""Progress display for the CLI: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30


class Progress:
    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_line = ""
        self._last_percent = -10.0

    def update(self, done: int, total: int | None = None, label: str | None = None) -> None:
        total = total if total is not None else self.total
        label = label or self.label
        percent = 100.0 * done / total if total else 0.0
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed / 1e6
        if self.tty:
            filled = int(BAR_WIDTH * percent / 100)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            line = f"\r{label:<18} [{bar}] {percent:5.1f}% {rate:7.1f} MB/s"
            if line != self._last_line:
                self.stream.write(line)
                self.stream.flush()
                self._last_line = line
        elif label != self.label or (total and percent >= self._last_percent + 10):
            self.label = label
            self._last_percent = percent
            self.stream.write(
                f"{label}: {percent:.0f}% ({done} bytes)\n" if total else f"{label}\n"
            )
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_line = ""

    def close(self) -> None:
        if self.tty and self._last_line:
            self.stream.write("\n")
            self.stream.flush()
