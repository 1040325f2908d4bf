"""A small progress bar on stderr (redrawn in place on a terminal, a line per step otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 28


class Progress:
    """``start(label, seconds)`` a step expected to take ``seconds``; ``tick()`` redraws it;
    ``done(summary)`` ends the line. ``note(text)`` prints a line of its own."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.label = ""
        self.detail = ""
        self.started = time.monotonic()
        self.seconds = 1.0
        self._last_draw = 0.0

    def start(self, label: str, seconds: float, detail: str = "") -> None:
        self.label, self.detail = label, detail
        self.started = time.monotonic()
        self.seconds = max(0.1, seconds)
        if self.enabled and not self.tty:
            print(f"... {label} {detail}".rstrip(), file=self.stream, flush=True)
        self.tick(force=True)

    def set_detail(self, detail: str) -> None:
        self.detail = detail
        self.tick()

    def tick(self, force: bool = False) -> None:
        if not (self.enabled and self.tty):
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        elapsed = now - self.started
        fraction = min(1.0, elapsed / self.seconds)
        filled = int(fraction * WIDTH)
        bar = "#" * filled + "-" * (WIDTH - filled)
        line = (
            f"\r{self.label[:38]:<38} [{bar}] {fraction * 100:3.0f}% {elapsed:5.1f}s {self.detail}"
        )
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def done(self, summary: str = "") -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * 160 + "\r")
        print(f"    {self.label}: {summary}".rstrip(), file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                self.stream.write("\r" + " " * 160 + "\r")
            print(text, file=self.stream, flush=True)
