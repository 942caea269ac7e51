"""evaluate (slide, TTA, report), predict (formats, bad inputs) and export (verified) end to end."""

import csv
import json

import numpy as np
import pytest
import torch
from hydra import compose
from PIL import Image

from seg import export, predict
from seg.data.synthetic import PALETTE, SyntheticScenes
from tests.conftest import hydra_context, run_evaluation, run_training


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("outputs") / "run"
    run_training(run_dir, "model.encoder_name=resnet18")
    return run_dir / "checkpoints" / "best.pt"


def run_entry(module, config_name, *overrides):
    with hydra_context():
        return module.run(compose(config_name, overrides=list(overrides)), list(overrides))


def test_evaluate_writes_the_report_and_figures(checkpoint, tmp_path):
    out = tmp_path / "metrics.json"
    result = run_evaluation(f"checkpoint={checkpoint}", f"out={out}", "num_worst=2")
    low, high = json.loads(out.read_text())["mIoU_ci95"]
    assert low <= result["mIoU"] <= high
    report = checkpoint.parent.parent / "eval_val_best"
    with open(report / "per_image.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == result["images"] == 4
    assert set(rows[0]) >= {"image", "mIoU", "aAcc", "IoU/disc"}
    for name in ("confusion", "iou", "worst"):
        with Image.open(report / f"{name}.png") as picture:
            picture.verify()  # a valid PNG
    # training validation wrote the same figures
    for name in ("confusion", "iou", "worst"):
        assert (checkpoint.parent.parent / "figures" / f"val_{name}.png").is_file()


def test_evaluate_slide_and_tta(checkpoint, tmp_path):
    whole = run_evaluation(f"checkpoint={checkpoint}", f"report_dir={tmp_path / 'a'}")
    # windows as large as the (96x96) val images: the same as whole-image inference
    slide = run_evaluation(
        f"checkpoint={checkpoint}", "mode=slide", "crop=[96,96]", f"report_dir={tmp_path / 'b'}"
    )
    assert slide["mIoU"] == pytest.approx(whole["mIoU"], abs=1e-9)
    tta = run_evaluation(
        f"checkpoint={checkpoint}", "mode=slide", "crop=[64,64]", "scales=[0.75,1.0]", "flip=true",
        f"report_dir={tmp_path / 'c'}",
    )  # fmt: skip
    assert 0 <= tta["mIoU"] <= 1


def test_predict_writes_three_formats_and_skips_unreadable_files(checkpoint, tmp_path):
    images = tmp_path / "in"
    (images / "nested").mkdir(parents=True)
    for i, size in enumerate((96, 96, 72)):
        image, _ = SyntheticScenes("test", image_size=size).load(i)
        folder = images / "nested" if i == 2 else images
        Image.fromarray(image).save(folder / f"scene{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    counts = run_entry(
        predict, "predict", f"checkpoint={checkpoint}", f"input={images}", f"output={out}"
    )
    assert counts == {"written": 3, "skipped": 1}
    index = np.asarray(Image.open(out / "index" / "nested" / "scene2.png"))
    assert index.shape == (72, 72) and index.max() < 6
    color = np.asarray(Image.open(out / "color" / "nested" / "scene2.png"))
    assert color.shape == (72, 72, 3)
    assert np.array_equal(color, np.array(PALETTE, np.uint8)[index])
    overlay = np.asarray(Image.open(out / "overlay" / "scene0.png"))
    assert overlay.shape == (96, 96, 3)


def test_predict_refuses_unknown_formats_and_empty_inputs(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="options"):
        run_entry(
            predict, "predict", f"checkpoint={checkpoint}", f"input={tmp_path}", "format=[heatmap]"
        )
    with pytest.raises(FileNotFoundError, match="no image files"):
        run_entry(predict, "predict", f"checkpoint={checkpoint}", f"input={tmp_path}/*.png")


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_export_matches_pytorch(checkpoint, tmp_path, format):
    output = tmp_path / f"model.{format}"
    report = run_entry(
        export, "export", f"checkpoint={checkpoint}", f"format={format}", f"output={output}",
        "verify_split=val",
    )  # fmt: skip
    verification = report["verification"]
    assert verification["passed"] and verification["max_abs_diff"] < 1e-3
    assert len(verification["inputs"]) == 3  # traced size, off-stride size, another batch size
    assert verification["mIoU_exported"] == pytest.approx(verification["mIoU_pytorch"], abs=1e-3)
    sidecar = json.loads(output.with_suffix(".json").read_text())
    assert sidecar["class_names"][1] == "disc" and sidecar["input"]["mean"] == [0.485, 0.456, 0.406]
    exported = export.ExportedModel(output, format)
    assert exported(torch.randn(1, 3, 50, 40)).shape == (1, 6, 50, 40)
