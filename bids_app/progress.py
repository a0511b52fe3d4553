"""Progress a person can follow: one line per session and stage, with an ETA.

``[sub-01 ses-1] predict: member 2/3, tile 40/96, ETA 1 min 10 s`` on stderr. On a terminal
the line is rewritten in place (at most every ``refresh`` seconds); when stderr is a file or a
pipe (batch jobs, CI) a line is printed per finished step (a member, the whole stage) and at
most one every ``interval`` seconds in between, so logs stay short. Every finished step also
goes to the ``bids_app.progress`` logger, i.e. into the run's log file.

Used inside Nipype worker processes (the prediction and explanation nodes), which share the
terminal's stderr with the main process.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

LOGGER = logging.getLogger("bids_app.progress")


def format_duration(seconds: float) -> str:
    """``75`` -> ``'1 min 15 s'``; ``3700`` -> ``'1 h 1 min'``; ``4.2`` -> ``'4 s'``."""
    seconds = max(0, int(round(float(seconds))))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def session_label(session_name: str) -> str:
    """``'sub-01_ses-1'`` -> ``'sub-01 ses-1'`` (the prefix of every progress line)."""
    return str(session_name).replace("_", " ")


class ProgressLine:
    """Progress of one stage of one session.

    Parameters
    ----------
    label : str
        Who, e.g. ``'sub-01 ses-1'``.
    stage : str
        What, e.g. ``'predict'``.
    stream : text stream, optional
        Default: ``sys.stderr`` at the time of each write.
    interval : float
        Seconds between two in-between lines when the stream is not a terminal.
    refresh : float
        Seconds between two in-place rewrites on a terminal.
    clock : callable
        Monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(self, label: str, stage: str, *, stream: TextIO | None = None, interval: float = 30.0,
                 refresh: float = 0.25, clock=time.monotonic):
        self.label = label
        self.stage = stage
        self._stream = stream
        self.interval = float(interval)
        self.refresh = float(refresh)
        self._clock = clock
        self._start = clock()
        self._last_write = float("-inf")
        self._in_place = False

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def _is_terminal(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    def text(self, fraction: float, detail: str) -> str:
        """The line for ``fraction`` (0-1) of the stage done, with an ETA extrapolated from the
        elapsed time (none before the first progress, ``done in ...`` at the end)."""
        elapsed = self._clock() - self._start
        line = f"[{self.label}] {self.stage}: {detail}"
        if fraction >= 1.0:
            return f"{line}, done in {format_duration(elapsed)}"
        if fraction > 0:
            return f"{line}, ETA {format_duration(elapsed * (1.0 - fraction) / fraction)}"
        return line

    def update(self, fraction: float, detail: str, *, step: bool = False) -> None:
        """Report progress; ``step=True`` marks a finished step (always shown and logged)."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = self._clock()
        line = self.text(fraction, detail)
        if self._is_terminal():
            if step or fraction >= 1.0 or now - self._last_write >= self.refresh:
                self.stream.write("\r\x1b[2K" + line + ("\n" if fraction >= 1.0 else ""))
                self.stream.flush()
                self._in_place = fraction < 1.0
                self._last_write = now
        elif step or fraction >= 1.0 or now - self._last_write >= self.interval:
            self.stream.write(time.strftime("%H:%M:%S") + " | PROGRESS | " + line + "\n")
            self.stream.flush()
            self._last_write = now
        if step or fraction >= 1.0:
            LOGGER.info("%s", line)

    def close(self) -> None:
        """End an in-place line (so the next output starts on a fresh line)."""
        if self._in_place:
            self.stream.write("\n")
            self.stream.flush()
            self._in_place = False
