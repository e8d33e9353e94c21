"""Small helpers for tests that watch other threads and processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_tick = threading.Event()


def wait_for(condition: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    """Wait until *condition()* holds (state of another thread or process), or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        _tick.wait(0.02)
