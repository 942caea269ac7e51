"""seg's Cityscapes instance AP and AP50 equal cityscapesscripts' evalInstanceLevelSemanticLabeling
run on the same files in the official layout: perturbed ground truth (misses, duplicates, wrong
classes, detections on void, groups and small instances) and a Mask R-CNN's own detections."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from seg.data.instance_layouts import THING_LABELS, CityscapesInstances
from seg.tasks.cityscapes_ap import average_precision
from tests.conftest import compose_config, write_png

# cityscapesscripts 2.3.0 calls np.in1d, which NumPy 2.4 removed: give it back, here only.
if not hasattr(np, "in1d"):
    np.in1d = np.isin
import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as official

LABEL_ID = {label: label_id for label_id, label in THING_LABELS.items()}  # class -> label id
HEIGHT, WIDTH = 64, 96


def write_split(root, count: int = 3) -> None:
    """Random scenes: road, void labels (static 4, dynamic 5), things of each class (some under
    100 pixels), a car group (26), caravans (29001) and a bare trailer (30)."""
    rng = np.random.default_rng(0)
    for index in range(count):
        ids = np.full((HEIGHT, WIDTH), 7, np.uint16)
        ids[rng.integers(0, 40) :][:8, :20] = 4
        ids[:, rng.integers(60, 90) :][:10] = 5
        ids[40:56, 0:30] = 26  # a group of cars nobody separated
        ids[rng.integers(0, 50) :][:12, 70:90] = 29001
        ids[0:6, 40:60] = 30
        for n in range(10):
            label = list(THING_LABELS)[n % 8]
            y, x = rng.integers(0, HEIGHT - 8), rng.integers(0, WIDTH - 8)
            h, w = rng.integers(4, 24), rng.integers(4, 30)  # some below 100 pixels
            ids[y : y + h, x : x + w] = label * 1000 + n + 1
        name = f"frankfurt_000000_{index:06d}"
        image = np.repeat((ids % 251).astype(np.uint8)[..., None], 3, 2)  # the objects visible
        write_png(root / "leftImg8bit" / "val" / "frankfurt" / f"{name}_leftImg8bit.png", image)
        path = root / "gtFine" / "val" / "frankfurt" / f"{name}_gtFine_instanceIds.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), ids)


def perturbed_truth(dataset: CityscapesInstances, index: int, rng) -> dict:
    """Detections from the ground truth of sample ``index``: each region (instances and groups)
    shifted and grown or shrunk a little, a class wrong now and then, some found twice, some
    missed, and false ones on void, the caravan and the background."""
    ids = np.asarray(Image.open(dataset.samples[index][1])).astype(np.int64)
    masks, labels = [], []
    for value in np.unique(ids):
        label_id = value // 1000 if value >= 1000 else value
        if label_id not in THING_LABELS or rng.random() < 0.15:
            continue  # not a thing, or missed
        mask = np.roll(ids == value, rng.integers(-2, 3, 2), (0, 1)).astype(np.uint8)
        mask = cv2.dilate(mask, np.ones((3, 3))) if rng.random() < 0.5 else mask
        label = THING_LABELS[label_id] if rng.random() < 0.85 else int(rng.integers(1, 9))
        for _ in range(1 + (rng.random() < 0.3)):  # now and then twice
            masks.append(mask)
            labels.append(label)
    for _ in range(4):  # false detections anywhere, on void and caravans included
        y, x = rng.integers(0, HEIGHT - 10), rng.integers(0, WIDTH - 10)
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        mask[y : y + rng.integers(4, 20), x : x + rng.integers(4, 20)] = 1
        masks.append(mask)
        labels.append(int(rng.integers(1, 9)))
    masks = torch.from_numpy(np.stack(masks)).float()[:, None]
    return {"masks": masks, "labels": torch.tensor(labels), "boxes": torch.zeros(len(labels), 4),
            "scores": torch.from_numpy(rng.random(len(labels))).float()}  # fmt: skip


def model_detections(dataset: CityscapesInstances):
    """debug=tiny's Mask R-CNN, untrained, keeping every detection: seg's own predictions."""
    cfg = compose_config("task=instance", "debug=tiny", "data=cityscapes_instances")
    model = instantiate(cfg.model, score_threshold=0.0).eval()
    task = instantiate(cfg.task)
    predict = task.predictor(model, torch.device("cpu"), "fp32", False)
    return lambda index, rng: predict(([dataset[index][0]], None), ["x"])[0]


def official_metrics(dataset, detections: list[dict], tmp_path, monkeypatch) -> dict:
    """evalInstanceLevelSemanticLabeling on the detections written in the official layout
    (a text file per image listing mask PNGs, label ids and scores), its cached ground truth
    and matches.json in ``tmp_path``, not beside the module or in the working directory."""
    predictions = tmp_path / "results"
    lists = []
    for (_, gt_path), found in zip(dataset.samples, detections, strict=True):
        stem = gt_path.name.removesuffix("_gtFine_instanceIds.png")
        lines = []
        for k, (mask, label, score) in enumerate(
            zip(found["masks"][:, 0] > 0.5, found["labels"], found["scores"], strict=True)
        ):
            relative = f"masks/{stem}_{k}.png"
            write_png(predictions / relative, mask.numpy().astype(np.uint8) * 255)
            lines.append(f"{relative} {LABEL_ID[int(label)]} {float(score)!r}\n")
        (predictions / f"{stem}_pred.txt").write_text("".join(lines))
        lists.append(str(predictions / f"{stem}_pred.txt"))
    monkeypatch.chdir(tmp_path)  # matches.json goes to the working directory
    # its JSON writer knows no NumPy integers (a pixel count is np.int64 under NumPy 2)
    monkeypatch.setattr(
        official,
        "writeDict2JSON",
        lambda data, path: Path(path).write_text(
            json.dumps(
                data, default=lambda o: o.item() if isinstance(o, np.generic) else o.__dict__
            )
        ),
    )
    args = official.args
    for key, value in {"gtInstancesFile": str(tmp_path / "gtInstances.json"),
                       "predictionPath": str(predictions.resolve()), "quiet": True,
                       "JSONOutput": False}.items():  # fmt: skip
        monkeypatch.setattr(args, key, value)
    gts = [str(path) for _, path in dataset.samples]
    return official.evaluateImgLists(lists, gts, args)["averages"]


@pytest.mark.parametrize("source", ["perturbed_truth", "model"])
def test_seg_equals_eval_instance_level_semantic_labeling(source, tmp_path, monkeypatch):
    write_split(tmp_path / "cityscapes")
    dataset = CityscapesInstances(str(tmp_path / "cityscapes"), "val")
    detect = model_detections(dataset) if source == "model" else (
        lambda index, rng: perturbed_truth(dataset, index, rng))  # fmt: skip
    rng = np.random.default_rng(1)
    detections = [detect(index, rng) for index in range(len(dataset))]
    cfg = compose_config("task=instance", "debug=tiny", "data=cityscapes_instances")
    evaluator = instantiate(cfg.task).evaluator(torch.device("cpu"), dataset=dataset)
    for index, found in enumerate(detections):
        image, ids, table = dataset[index]
        evaluator.process(([image], [ids], [table]), [found], [dataset.describe(index)])
    ours = evaluator.result().metrics
    expected = official_metrics(dataset, detections, tmp_path, monkeypatch)
    assert not (tmp_path / "cityscapes" / "gtInstances.json").exists()
    assert (tmp_path / "gtInstances.json").is_file() and (tmp_path / "matches.json").is_file()
    assert ours["cityscapes_AP"] == pytest.approx(expected["allAp"], abs=1e-12)
    assert ours["cityscapes_AP50"] == pytest.approx(expected["allAp50%"], abs=1e-12)
    for name, value in zip(cfg.data.class_names[1:], ours["cityscapes_AP_class"], strict=True):
        assert value == pytest.approx(expected["classes"][name]["ap"], abs=1e-12, nan_ok=True)
    if source == "perturbed_truth":  # a real test: neither perfect nor empty
        assert 0.1 < ours["cityscapes_AP"] < ours["cityscapes_AP50"] < 0.9


def test_the_curve_is_integrated_stepwise_with_the_point_at_recall_0():
    # two hits and a false positive between them, one object never found: recall 1/3, 2/3
    scores, true = np.array([0.9, 0.5, 0.7]), np.array([1, 1, 0])
    # thresholds 0.5, 0.7, 0.9: (p, r) = (2/3, 2/3), (1/2, 1/3), (1, 1/3), then (1, 0)
    expected = (
        2 / 3 * (0.5 * (2 / 3 - 1 / 3))
        + 1 / 2 * (0.5 * (2 / 3 - 1 / 3))
        + 1 * (0.5 * (1 / 3 - 0))
        + 1 * (0.5 * (1 / 3 - 0))
    )
    assert average_precision(scores, true, misses=1) == pytest.approx(expected, abs=1e-15)
    assert average_precision(np.zeros(0), np.zeros(0), misses=2) == 0.0
