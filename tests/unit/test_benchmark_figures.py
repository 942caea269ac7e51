"""benchmark.py's figures: the Trainer's overhead like with like, the share of the GEMM ceiling."""

from types import SimpleNamespace

import pytest
import torch

from tests.conftest import load_script

benchmark = load_script("benchmark")


def test_the_overhead_compares_eager_with_eager_and_compiled_with_compiled():
    eager = benchmark.overheads({"seg": 80.0, "plain_same_settings": 100.0})
    assert eager == {"trainer_overhead": pytest.approx(0.25)}
    # On CUDA the Trainer compiles: its compiled step against the compiled plain loop, and
    # the eager Trainer against the eager loop; never the compiled step against an eager loop.
    both = benchmark.overheads({"seg": 150.0, "seg_eager": 90.0, "plain_same_settings": 99.0,
                                "plain_same_settings_compiled": 165.0})  # fmt: skip
    assert both == {"trainer_overhead": pytest.approx(0.1),
                    "trainer_overhead_compiled": pytest.approx(0.1)}  # fmt: skip


def test_a_share_of_the_ceiling_is_never_above_100_percent():
    assert benchmark.ceiling_share(150, 200) == {"ceiling_share": 0.75,
                                                 "probe_underestimated": False}  # fmt: skip
    # A Zen 4 read a bf16 ceiling of 207 GFLOP/s while a U-Net step achieved 291.
    assert benchmark.ceiling_share(291, 207) == {"ceiling_share": 1.0, "probe_underestimated": True}


def test_the_ceiling_is_the_best_over_sizes_and_repeats(monkeypatch):
    sizes, repeats = (32, 64), 3
    # every timed product takes 1 s but the third at size 64: 0.5 s, the best rate
    durations = [1.0] * 5 + [0.5]
    readings = []

    def perf_counter():  # start and stop of each timed product, in turn
        readings.append(0.0 if len(readings) % 2 == 0 else durations[len(readings) // 2])
        return readings[-1]

    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=perf_counter))
    best = benchmark.gemm_ceiling(torch.float32, torch.device("cpu"), lambda: None, sizes, repeats)
    assert len(readings) == 2 * len(sizes) * repeats
    assert best == pytest.approx(2 * 64**3 / 0.5 / 1e9)


def test_the_busy_share_merges_overlapping_kernels_and_finds_the_longest_gap():
    # kernels (start, end): two overlapping on two streams, then a 3-unit gap, then a 1-unit one
    kernels = [(10.0, 12.0), (0.0, 4.0), (2.0, 6.0), (9.0, 10.0)]
    assert benchmark.busy_share(kernels) == {"busy_share": 9 / 12, "longest_gap": 3.0}
    assert benchmark.busy_share([]) == {"busy_share": 0.0, "longest_gap": 0.0}
