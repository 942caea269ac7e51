"""Cityscapes: seg's metrics equal the official evaluator's, and predict.py writes files the
official tools accept."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose
from PIL import Image

from seg import predict
from seg.data.cityscapes import LABEL_TO_TRAIN_ID, TRAIN_ID_TO_LABEL_ID, Cityscapes
from seg.metrics import ConfusionMatrix
from tests.conftest import hydra_context, run_evaluation, run_training

# cityscapesscripts 2.3.0 calls np.in1d, which NumPy 2.4 removed: give it back, here only.
if not hasattr(np, "in1d"):
    np.in1d = np.isin
import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as evaluator


def add_instance_files(root: Path) -> list[Path]:
    """The evaluator reads *_gtFine_instanceIds.png beside every labelIds file."""
    labels = sorted((root / "gtFine").rglob("*_gtFine_labelIds.png"))
    for path in labels:
        label_ids = np.asarray(Image.open(path)).astype(np.uint16)
        instances = np.where(label_ids >= 24, label_ids * 1000 + 1, label_ids)  # things get ids
        Image.fromarray(instances).save(str(path).replace("labelIds", "instanceIds"))
    return labels


def official_scores(predictions: list[Path], labels: list[Path]) -> dict:
    args = evaluator.args
    args.quiet, args.JSONOutput = True, False
    return evaluator.evaluateImgLists([str(p) for p in predictions], [str(p) for p in labels], args)


def test_metrics_equal_the_official_evaluator(cityscapes_root, tmp_path):
    labels = add_instance_files(cityscapes_root)
    generator = torch.Generator().manual_seed(0)
    dataset = Cityscapes(str(cityscapes_root), "train")
    confusion = ConfusionMatrix(19, 255)
    predictions = []
    for index, (_, label_path) in enumerate(dataset.samples):
        _, target = dataset[index]
        # mostly right, partly random: every kind of error appears
        noise = torch.randint(0, 19, target.shape, generator=generator)
        keep = torch.rand(target.shape, generator=generator) < 0.6
        prediction = torch.where(keep & (target != 255), target, noise)
        confusion.update(prediction[None], target[None])
        path = tmp_path / label_path.name.replace("gtFine_labelIds", "pred")
        Image.fromarray(TRAIN_ID_TO_LABEL_ID[prediction.numpy()]).save(path)
        predictions.append(path)
    ours = confusion.compute()
    official = official_scores(predictions, [p for p in labels if "/train/" in str(p)])
    names = {train_id: name for name, train_id in _label_names().items()}
    for train_id, iou in enumerate(ours["IoU"]):
        expected = official["classScores"][names[train_id]]
        if np.isnan(expected):
            assert np.isnan(iou)
        else:
            assert iou == pytest.approx(expected, abs=1e-6), names[train_id]
    assert ours["mIoU"] == pytest.approx(official["averageScoreClasses"], abs=1e-6)


def _label_names() -> dict[str, int]:
    from cityscapesscripts.helpers.labels import id2label

    return {id2label[label_id].name: train_id for label_id, train_id in LABEL_TO_TRAIN_ID.items()}


def test_predict_writes_label_id_files_the_official_evaluator_accepts(cityscapes_root, tmp_path):
    labels = add_instance_files(cityscapes_root)
    run_dir = tmp_path / "run"
    data = (
        "data=cityscapes",
        f"data.root={cityscapes_root}",
        "data.train_transform.crop_size=[32,64]",
    )
    run_training(run_dir, *data, "model.encoder_name=resnet18")
    checkpoint = run_dir / "checkpoints" / "last.pt"
    out = tmp_path / "predictions"
    overrides = [f"checkpoint={checkpoint}", f"input={cityscapes_root / 'leftImg8bit' / 'val'}",
                 f"output={out}", "format=[cityscapes]"]  # fmt: skip
    with hydra_context():
        predict.run(compose("predict", overrides=overrides), overrides)
    (written,) = sorted((out / "cityscapes").iterdir())
    assert written.name == "frankfurt_000000_000019_leftImg8bit.png"  # <city>_<seq>_<frame>*.png
    values = set(np.unique(np.asarray(Image.open(written))).tolist())
    assert values <= set(LABEL_TO_TRAIN_ID) and np.asarray(Image.open(written)).shape == (32, 64)
    official = official_scores([written], [p for p in labels if "/val/" in str(p)])
    ours = run_evaluation(f"checkpoint={checkpoint}", "bootstrap=0", f"report_dir={tmp_path / 'r'}")
    assert ours["mIoU"] == pytest.approx(official["averageScoreClasses"], abs=1e-6)
