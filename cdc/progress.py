"""Progress of a long replay or catch-up: a log line every few seconds (done, total, rate, ETA),
a bar on a terminal, and the backlog in /readyz and the metrics while it lasts.

One object a phase; `update` is cheap (a clock read and a compare) so the hot loop may call it
every batch.
"""

from __future__ import annotations

import logging
import sys
import time

from . import metrics

LOG_EVERY = 5.0  # seconds between progress log lines
BAR_EVERY = 0.1  # seconds between redraws of the terminal bar


def counted(n: int, noun: str) -> str:
    """``1 event``, ``2,000 events``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def size_text(n: int) -> str:
    """``512 bytes``, ``3.2 MB``: for WAL and slot sizes in logs and command output."""
    if abs(n) < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1024
        if abs(value) < 1024 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


class Progress:
    """`what` names the phase in logs and /readyz (e.g. "hand-off replay"). `total`, when known,
    is how many events the phase has to deliver; else pass `fraction` to `update`.

    With `backlog`, the phase is a backlog the consumer must deliver before it is ready:
    /readyz says 503 with what is left, and `cdc_backlog_events` counts it down.
    """

    def __init__(self, what: str, total: int | None = None, *, log: logging.Logger, bar: bool = False,
                 backlog: bool = False, status: metrics.Status = metrics.STATUS):
        self.what = what
        self.total = total
        self.log = log
        self.bar = bar and sys.stderr.isatty()
        self.backlog = backlog
        self.status = status
        self.started = time.monotonic()
        self._logged = self.started
        self._drawn = 0.0
        self.done = 0
        if backlog:
            status.catching_up = what
            status.backlog_events = total
            metrics.BACKLOG_EVENTS.set(total if total is not None else 0)

    def update(self, done: int, fraction: float | None = None) -> None:
        self.done = done
        now = time.monotonic()
        if self.backlog and self.total is not None:
            left = max(self.total - done, 0)
            self.status.backlog_events = left
            metrics.BACKLOG_EVENTS.set(left)
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            self.log.info("%s: %s", self.what, self.line(now, fraction))
        if self.bar and now - self._drawn >= BAR_EVERY:
            self._drawn = now
            sys.stderr.write(f"\r{self.line(now, fraction)}  \033[K")
            sys.stderr.flush()

    def line(self, now: float | None = None, fraction: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if fraction is None and self.total:
            fraction = min(self.done / self.total, 1.0)
        text = f"{self.done:,}" + (f" of {self.total:,}" if self.total is not None else "") + " events"
        if fraction is not None:
            text += f" ({fraction:.0%})"
        text += f", {rate:,.0f} events/s"
        if fraction:
            text += f", ETA {elapsed * (1 - fraction) / fraction:,.0f} s"
        return text

    def end(self) -> None:
        if self.bar:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        if self.backlog:
            self.status.catching_up = None
            self.status.backlog_events = 0
            metrics.BACKLOG_EVENTS.set(0)
