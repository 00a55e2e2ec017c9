"""Where the authority reads the time: the system clock in production, a settable one in tests.

Lifecycle deadlines, reservation expiry and ledger timestamps all come from one injected Clock.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch, UTC."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to (tests drive grace and expiry deadlines with it)."""

    def __init__(self, start_ms: int) -> None:
        self._lock = threading.Lock()
        self._now = start_ms

    def now_ms(self) -> int:
        with self._lock:
            return self._now

    def set(self, now_ms: int) -> None:
        with self._lock:
            self._now = now_ms

    def advance(self, *, ms: int = 0, seconds: float = 0) -> int:
        """Move forward by `ms` plus `seconds`; returns the new time."""
        delta = ms + round(seconds * 1000)
        if delta < 0:
            raise ValueError("a clock only moves forward")
        with self._lock:
            self._now += delta
            return self._now
