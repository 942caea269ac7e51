"""What a run leaves on disk: debug=tiny stays small, best.pt can hold the weights alone (and
then cannot resume), periodic checkpoints can be kept."""

import json

import pytest

from seg.checkpoint import load_checkpoint, newest_loadable_checkpoint
from tests.conftest import run_evaluation, run_training

TINY_RUN_BYTES = 20 * 2**20  # docs: "about 11 MB"


def test_debug_tiny_writes_a_few_megabytes(tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir)
    size = sum(path.stat().st_size for path in run_dir.rglob("*") if path.is_file())
    assert size < TINY_RUN_BYTES, size


def test_a_weights_only_best_pt_evaluates_but_never_resumes(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_training(run_dir, "trainer.best_checkpoint=weights")
    best_path, last_path = run_dir / "checkpoints/best.pt", run_dir / "checkpoints/last.pt"
    best = load_checkpoint(best_path)
    assert best["kind"] == "weights" and "optimizer" not in best and "rng" not in best
    assert best_path.stat().st_size < last_path.stat().st_size / 2  # no AdamW moments
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best_line = max(lines, key=lambda line: line["mIoU"])
    assert best["iteration"] == best_line["iteration"]
    evaluated = run_evaluation(f"checkpoint={best_path}", "max_samples=4")
    assert evaluated["mIoU"] == best_line["mIoU"]  # the weights that validation scored
    with pytest.raises(ValueError, match=r"holds the weights alone.*init_from="):
        run_training(tmp_path / "again", f"resume={best_path}")
    last_path.write_bytes(last_path.read_bytes()[:1000])  # last.pt damaged: nothing resumes
    assert newest_loadable_checkpoint(run_dir) is None
    assert "holds the weights alone" in caplog.text


def test_best_checkpoint_none_writes_no_best_pt(tmp_path):
    run_training(tmp_path / "run", "trainer.best_checkpoint=none")
    assert not (tmp_path / "run/checkpoints/best.pt").exists()
    assert (tmp_path / "run/checkpoints/last.pt").is_file()


def test_keep_checkpoints_keeps_the_newest_periodic_ones(tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, "trainer.keep_checkpoints=2", "trainer.max_iters=6")
    kept = sorted(path.name for path in (run_dir / "checkpoints").glob("iter_*.pt"))
    assert kept == ["iter_0000004.pt", "iter_0000006.pt"]
    for name, iteration in zip(kept, (4, 6), strict=True):
        assert load_checkpoint(run_dir / "checkpoints" / name)["iteration"] == iteration
