"""data=nifti end to end on nibabel's real MRI: train, resume exactly, evaluate per volume, and
predict volumes back in their own orientation, affine and header."""

import json
import shutil

import numpy as np
import pytest
import torch
from hydra import compose

from seg import predict
from tests.conftest import hydra_context, run_evaluation, run_training
from tests.unit.test_nifti import ANATOMICAL, write_nifti

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def nifti_run(tmp_path_factory):
    root = write_nifti(tmp_path_factory.mktemp("nifti") / "data")
    run_dir = tmp_path_factory.mktemp("outputs") / "nifti"
    run_training(run_dir, "data=nifti", f"data.root={root}", "data.dataset.empty_slices=0.5")
    return root, run_dir


def test_resume_is_exact_with_a_seeded_share_of_empty_slices(nifti_run, tmp_path):
    root, straight = nifti_run
    stopped = tmp_path / "resumed"
    common = ("data=nifti", f"data.root={root}", "data.dataset.empty_slices=0.5")
    run_training(stopped, *common, "trainer.max_iters=2", "scheduler.max_iters=4")
    run_training(tmp_path / "ignored", *common, f"resume={stopped / 'checkpoints/last.pt'}",
                 "trainer.max_iters=4")  # fmt: skip
    a = torch.load(straight / "checkpoints/last.pt", weights_only=True)
    b = torch.load(stopped / "checkpoints/last.pt", weights_only=True)
    assert b["iteration"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def dice(prediction: np.ndarray, labels: np.ndarray, label: int) -> float:
    hits = ((prediction == label) & (labels == label)).sum()
    return 2 * hits / ((prediction == label).sum() + (labels == label).sum())


def test_evaluate_per_volume_and_predict_volumes_back(nifti_run, tmp_path):
    root, run_dir = nifti_run
    checkpoint = run_dir / "checkpoints/last.pt"
    out = tmp_path / "metrics.json"
    # val keeps every slice (data.dataset.empty_slices is the training split's): whole volumes
    run_evaluation(f"checkpoint={checkpoint}", f"out={out}", "bootstrap=0")
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 25 and metrics["per_group"]["groups"] == 1
    rows = (run_dir / "eval_val_last/per_group.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == [str(root / "labels/val/c.nii.gz")]
    # The written volumes, in their stored order (LAS), score what evaluate.py scored per volume.
    inputs = tmp_path / "inputs"
    shutil.copytree(root / "images/val", inputs)
    shutil.copy(ANATOMICAL, inputs)  # uncompressed, int16 as scanned
    overrides = [f"checkpoint={checkpoint}", f"input={inputs}", f"output={tmp_path / 'out'}"]
    with hydra_context():
        counts = predict.run(compose("predict", overrides=overrides), overrides)
    assert counts == {"written": 2, "skipped": 0}
    per_volume = []
    for case in ("c",):
        image = nib.load(inputs / f"{case}.nii.gz")
        written = nib.load(tmp_path / "out/volumes" / f"{case}.nii.gz")
        assert written.shape == image.shape and np.array_equal(written.affine, image.affine)
        assert nib.aff2axcodes(written.affine) == ("L", "A", "S")
        assert written.get_data_dtype() == np.uint8
        labels = np.asanyarray(nib.load(root / "labels/val" / f"{case}.nii.gz").dataobj)
        per_volume.append(dice(np.asanyarray(written.dataobj), labels, 1))
    expected = [float(row.split(",")[6]) for row in rows[1:]]  # Dice/foreground
    assert 0 < per_volume[0] < 1  # a real comparison: some foreground right, some wrong
    assert per_volume == pytest.approx(expected, abs=1e-6)
    assert metrics["per_group"]["Dice"]["foreground"] == pytest.approx(np.mean(per_volume))
    original = nib.load(ANATOMICAL)
    written = nib.load(tmp_path / "out/volumes/anatomical.nii")
    assert np.array_equal(written.affine, original.affine)
    assert written.header.get_xyzt_units() == original.header.get_xyzt_units()


def test_volumes_need_a_nifti_checkpoint(tmp_path):
    run_training(tmp_path / "run")  # synthetic images
    shutil.copy(ANATOMICAL, tmp_path)
    overrides = [f"checkpoint={tmp_path / 'run/checkpoints/last.pt'}", f"input={tmp_path}/*.nii"]
    with hydra_context(), pytest.raises(ValueError, match="trained with data=nifti"):
        predict.run(compose("predict", overrides=overrides), overrides)


def test_a_2_5d_run_takes_three_slices_and_predicts_volumes(tmp_path):
    root = write_nifti(tmp_path / "data")
    run_dir = tmp_path / "run"
    run_training(run_dir, "data=nifti", f"data.root={root}", "data.dataset.context=1",
                 "data.mean=[0.449,0.449,0.449]", "data.std=[0.226,0.226,0.226]")  # fmt: skip
    checkpoint = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    first = next(v for k, v in checkpoint["model"].items() if v.ndim == 4)  # the first conv
    assert first.shape[1] == 3  # the slice and its two neighbours
    overrides = [f"checkpoint={run_dir / 'checkpoints/last.pt'}", f"input={ANATOMICAL}",
                 f"output={tmp_path / 'out'}"]  # fmt: skip
    with hydra_context():
        predict.run(compose("predict", overrides=overrides), overrides)
    written = nib.load(tmp_path / "out/volumes/anatomical.nii")
    assert written.shape == (33, 41, 25)
