"""Wall-clock timing that is right on a GPU too.

CUDA kernels run asynchronously: a timer read right after a model call measures the
launch, not the work. :class:`Stopwatch` synchronises the device before it starts and
before it stops (a no-op on the CPU), so images/s and step-cost ratios mean the same on
every device.
"""
from __future__ import annotations

import time
from typing import Union

import torch

DeviceLike = Union[str, torch.device]


def synchronize(device: DeviceLike) -> None:
    """Wait for ``device``'s queued work (CUDA only)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates seconds over ``with watch:`` blocks of work on ``device``."""

    def __init__(self, device: DeviceLike = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds = 0.0
        self._start = 0.0

    def start(self) -> "Stopwatch":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def stop(self) -> float:
        """Add the time since :meth:`start`; returns the total."""
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start
        return self.seconds

    def __enter__(self) -> "Stopwatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
