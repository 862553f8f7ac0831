"""The benchmarks' shared timing helpers (stas_core.timing), on a fake clock."""
import pytest

from stas_core import timing


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_seconds_runs_round_robin_after_warmup(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    calls = []

    def work(name, seconds):
        def fn():
            calls.append(name)
            clock.now += seconds
        return fn

    times = timing.interleaved_seconds({"a": work("a", 2.0), "b": work("b", 0.5)},
                                       rounds=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up, then interleaved
    assert times == {"a": [2.0] * 3, "b": [0.5] * 3}


def test_median_rates_is_items_over_the_median_round(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    costs = iter([9.0, 1.0, 2.0, 4.0])  # warm-up 9 s untimed; rounds 1, 2, 4: median 2

    def fn():
        clock.now += next(costs)

    assert timing.median_rates({"x": fn}, 100, rounds=3) == {"x": pytest.approx(50.0)}
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        timing.median_rates({"x": fn}, 1, rounds=0)
