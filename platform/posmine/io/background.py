"""Work repeated in a daemon thread while a block runs: a lease's heartbeat, a progress bar."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def repeating(fn: Callable[[], None], interval: float, name: str) -> Iterator[None]:
    """`fn()` every `interval` seconds while the body runs; stopped and joined when it ends,
    whatever happened. `fn` handles its own errors: one raised ends the repetition."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            fn()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 5)
