"""benchmark.py's input-path figures: end to end per model (data_bound) and the per-core data
pipeline with the decoded-sample cache, on tiny sizes."""

from argparse import Namespace

import pytest
import torch

from tests.conftest import load_script

benchmark = load_script("benchmark")


@pytest.fixture
def tiny(monkeypatch, tmp_path) -> Namespace:
    monkeypatch.setattr(benchmark, "CITYSCAPES_SIZE", (64, 128))  # instead of 1024x2048 PNGs
    return Namespace(size=[32, 64], batch=2, reps=1, warmup=1, eval_batches=1, compile=False, trace=None,
                     data_images=2, data_batches=1, data_rounds=1, work_dir=tmp_path)  # fmt: skip


def test_each_model_gets_end_to_end_figures_with_and_without_the_cache(tiny):
    ceilings = {"fp32_gemm_gflops": 1e-3, "bf16_gemm_gflops": 1e-3}  # a probe far too low
    result = benchmark.bench_model("unet", tiny, torch.device("cpu"), lambda: None, ceilings)
    assert result["ceiling_share"] == 1 and result["probe_underestimated"]
    assert not result["compiled"] and "trainer_overhead_compiled" not in result  # eager: one
    assert result["e2e_workers"] == benchmark.loader_workers() >= 1
    for suffix in ("", "_cached"):
        assert result[f"e2e{suffix}_img_s"] > 0
        # the step alone, timed beside it, over end to end: the same step waiting for the loader
        assert result[f"data_bound{suffix}"] == pytest.approx(
            result["e2e_step_only_img_s"] / result[f"e2e{suffix}_img_s"]
        )
    assert len(list((tiny.work_dir / "cache").rglob("*.image.npy"))) == tiny.data_images


def test_the_data_section_times_the_cached_pipeline_beside_the_others(tiny):
    result = benchmark.bench_data(tiny)
    per_core = result["pipeline_img_s_per_core"]
    assert set(per_core) == {"seg", "seg_cached", "seg_before_issue_11", "torchvision_v2"}
    assert all(value > 0 for value in per_core.values())
    assert result["cache_speedup"] == pytest.approx(per_core["seg_cached"] / per_core["seg"])
    assert result["seg_cached_img_s_2_workers"] > 0 and result["cache_cold_img_s_per_core"] > 0
    assert result["cache_cold_slowdown"] > 0
    # an image (3 bytes per pixel) and a uint8 mask (1) per sample, plus two .npy headers
    assert result["cache_mb_per_sample"] == pytest.approx(64 * 128 * 4 / 1e6, abs=300 / 1e6)
