"""Wall-clock timing that is right on a GPU too.

CUDA kernels run asynchronously: a timer read right after a model call measures the
launch, not the work. :class:`Stopwatch` synchronises the device before it starts and
before it stops (a no-op on the CPU), so images/s and step-cost ratios mean the same on
every device. :func:`interleaved_seconds` and :func:`median_rates` are the benchmarks'
one way to time two or more things side by side.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Union

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


def interleaved_seconds(fns: Mapping[str, Callable[[], object]], *, rounds: int,
                        warmup: int = 1, device: DeviceLike = "cpu") -> dict[str, list[float]]:
    """Seconds of each of ``fns`` per round, called round-robin (every round runs each
    once, so a slow phase of the machine hits all alike), each call device-synchronised;
    ``warmup`` untimed calls of each first."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0; got {rounds} and {warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            watch = Stopwatch(device)
            with watch:
                fn()
            times[name].append(watch.seconds)
    return times


def median_rates(fns: Mapping[str, Callable[[], object]], items: int, *, rounds: int,
                 warmup: int = 1, device: DeviceLike = "cpu") -> dict[str, float]:
    """``items`` per second of each of ``fns`` (one call processes ``items``: images, say),
    from the median of :func:`interleaved_seconds`."""
    import statistics

    return {name: items / statistics.median(t) for name, t in
            interleaved_seconds(fns, rounds=rounds, warmup=warmup, device=device).items()}
