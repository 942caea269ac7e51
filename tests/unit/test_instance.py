"""The instance task's parts: targets built from the ID map, the synthetic instances, COCO AP
as pycocotools computes it from files, and Mask R-CNN's float32 heads under autocast."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from seg.data.synthetic import SyntheticInstances, SyntheticScenes
from seg.data.transforms import train_transform
from seg.models import maskrcnn
from seg.tasks.instance import STAT_NAMES, CocoEvaluator, InstanceTask, training_target

CLASSES = ["background", "disc", "box", "triangle", "ring", "cross"]


def test_targets_drop_instances_a_crop_emptied_and_crowds_and_box_like_coco():
    ids = torch.zeros(10, 12, dtype=torch.int16)
    ids[2:5, 3:9] = 1  # rows 2-4, columns 3-8
    ids[6:8, 0:2] = 3  # id 2 is gone (cropped away); id 3 is a crowd
    table = torch.tensor([[4, 0], [2, 0], [5, 1]])
    target = training_target(ids, table)
    assert target["labels"].tolist() == [4]
    assert target["masks"].shape == (1, 10, 12) and target["masks"].sum() == 18
    # COCO's box of that mask: [x, y, w, h] = [3, 2, 6, 3], i.e. exclusive maxima (9, 5)
    encoded = mask_utils.encode(np.asfortranarray(target["masks"][0].numpy()))
    assert mask_utils.toBbox(encoded).tolist() == [3, 2, 6, 3]
    assert target["boxes"].tolist() == [[3.0, 2.0, 9.0, 5.0]]
    empty = training_target(
        torch.zeros(4, 4, dtype=torch.int16), torch.zeros(0, 2, dtype=torch.int64)
    )
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 4, 4)


def test_synthetic_instances_are_the_semantic_scenes_split_into_shapes():
    semantic = SyntheticScenes("val", image_size=64)
    instances = SyntheticInstances("val", image_size=64)
    for index in range(5):
        image, mask = semantic.load(index)
        same_image, ids, table = instances[index]
        assert torch.equal(same_image.permute(1, 2, 0), torch.from_numpy(image))
        labels = torch.cat([torch.zeros(1, dtype=torch.int64), table[:, 0]])
        assert torch.equal(labels[ids.long()], torch.from_numpy(mask).long())  # ids -> classes
        assert (table[:, 1] == 0).all()  # no crowds


def test_the_training_crop_pads_the_id_map_with_background():
    transform = train_transform((80, 80), ignore_index=0, scale_range=(0.5, 0.5))
    dataset = SyntheticInstances("train", image_size=64, transform=transform)
    _, ids, table = dataset[(0, 0, 0)]
    assert ids.shape == (80, 80) and int(ids.max()) <= len(table)
    assert (ids[-10:, -10:] == 0).all()  # the scaled scene is 32 px: the rest is padding


def detections_from(truths, shift: int, generator) -> dict[str, torch.Tensor]:
    """Detections as Mask R-CNN gives them: the truths' masks shifted by ``shift`` pixels, as
    probabilities, with random scores and a wrong class now and then."""
    masks = torch.roll(truths, shifts=shift, dims=-1).float()[:, None] * 0.9
    boxes = torch.stack([torch.tensor([*map(float, np.argwhere(m[0].numpy() > 0.5).min(0)[::-1]),
                                       *map(float, np.argwhere(m[0].numpy() > 0.5).max(0)[::-1] + 1)])
                         for m in masks])  # fmt: skip
    labels = torch.randint(1, len(CLASSES), (len(masks),), generator=generator)
    scores = torch.rand(len(masks), generator=generator)
    return {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks}


def evaluate_scenes(shift: int, count: int = 6):
    """seg's evaluator over ``count`` synthetic scenes against shifted detections; also the
    same ground truth and detections as COCO JSON files, built here independently of seg."""
    dataset = SyntheticInstances("val", image_size=64)
    generator = torch.Generator().manual_seed(0)
    evaluator = CocoEvaluator(len(CLASSES), 0.5, 0.5, num_pictures=2)
    truth = {"images": [], "annotations": [], "categories": [{"id": c} for c in range(1, 6)]}
    results = {"segm": [], "bbox": []}
    for index in range(count):
        image, ids, table = dataset[index]
        present = [k for k in range(len(table)) if (ids == k + 1).any()]
        masks = torch.stack([ids == k + 1 for k in present])
        detections = detections_from(masks, shift, generator)
        evaluator.process(([image], [ids], [table]), [detections], [f"scene{index}"])
        truth["images"].append({"id": index + 1, "height": 64, "width": 64})
        for k in present:
            encoded = mask_utils.encode(np.asfortranarray((ids == k + 1).numpy().astype(np.uint8)))
            encoded["counts"] = encoded["counts"].decode()
            truth["annotations"].append({
                "id": len(truth["annotations"]) + 1, "image_id": index + 1,
                "category_id": int(table[k, 0]), "segmentation": encoded, "iscrowd": 0,
                "area": float(mask_utils.area(encoded)), "bbox": mask_utils.toBbox(encoded).tolist(),
            })  # fmt: skip
        for mask, box, label, score in zip(detections["masks"], detections["boxes"],
                                           detections["labels"], detections["scores"], strict=True):  # fmt: skip
            encoded = mask_utils.encode(np.asfortranarray((mask[0] > 0.5).numpy().astype(np.uint8)))
            encoded["counts"] = encoded["counts"].decode()
            common = {"image_id": index + 1, "category_id": int(label), "score": float(score)}
            results["segm"].append({**common, "segmentation": encoded})
            x0, y0, x1, y1 = box.tolist()
            results["bbox"].append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
    return evaluator.result(), truth, results


def official_stats(tmp_path, truth, results, iou_type):
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "results.json").write_text(json.dumps(results[iou_type]))
    ground_truth = COCO(str(tmp_path / "truth.json"))
    evaluation = COCOeval(ground_truth, ground_truth.loadRes(str(tmp_path / "results.json")),
                          iou_type)  # fmt: skip
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation


def test_seg_ap_equals_cocoeval_run_on_the_same_files(tmp_path):
    result, truth, results = evaluate_scenes(shift=2)
    for kind, iou_type in (("mask", "segm"), ("box", "bbox")):
        evaluation = official_stats(tmp_path, truth, results, iou_type)
        for name, value in zip(STAT_NAMES, evaluation.stats, strict=False):
            # COCOeval's -1 (no objects of that size) is NaN in seg (null in JSON)
            expected = float(value) if value >= 0 else float("nan")
            assert result.metrics[f"{kind}_{name}"] == pytest.approx(
                expected, abs=1e-12, nan_ok=True
            ), name
        assert 0 < result.metrics[f"{kind}_AP"] < 1  # a real test: neither perfect nor empty
    assert len(result.examples) == 2 and result.image_names[0] == "scene0"


def test_ground_truth_scored_against_itself_gives_ap_1():
    dataset = SyntheticInstances("val", image_size=64)
    evaluator = CocoEvaluator(len(CLASSES), 0.5, 0.5, num_pictures=0)
    for index in range(4):
        image, ids, table = dataset[index]
        present = [k for k in range(len(table)) if (ids == k + 1).any()]
        masks = torch.stack([ids == k + 1 for k in present])
        boxes = torch.stack([training_target(ids, table)["boxes"][i] for i in range(len(present))])
        detections = {"boxes": boxes, "labels": table[present, 0], "masks": masks.float()[:, None],
                      "scores": torch.ones(len(present))}  # fmt: skip
        evaluator.process(([image], [ids], [table]), [detections], [str(index)])
    metrics = evaluator.result().metrics
    assert metrics["mask_AP"] == metrics["box_AP"] == 1.0


def test_a_validation_without_detections_reports_ap_0():
    # pycocotools' loadRes([]) raises IndexError: seg must report 0, not crash
    dataset = SyntheticInstances("val", image_size=64)
    evaluator = CocoEvaluator(len(CLASSES), 0.5, 0.5, num_pictures=1)
    image, ids, table = dataset[0]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 64, 64)}  # fmt: skip
    evaluator.process(([image], [ids], [table]), [empty], ["0"])
    result = evaluator.result()
    assert result.metrics["mask_AP"] == 0.0 and result.metrics["box_AP50"] == 0.0
    present = {int(label) for label in table[:, 0]}
    for c, value in enumerate(result.metrics["mask_AP_class"], start=1):
        assert value == 0.0 if c in present else value != value  # NaN: no ground truth
    task = InstanceTask(6, CLASSES, [[0, 0, 0]] * 6, [0.5] * 3, [0.25] * 3)
    report = task.report(result, "val")
    assert report.score == 0.0 and "example_0" in report.pictures
    assert next(iter(report.record)) == "mask_AP"  # the primary metric first (sweeps read it)


def test_mask_rcnn_heads_decode_boxes_and_masks_in_float32_under_bf16():
    model = maskrcnn(6, backbone="mobilenet_v3_small", anchor_sizes=(16, 32, 64), fpn_channels=16,
                     box_head_size=32, mask_head_channels=16).eval()  # fmt: skip
    dtypes = []
    model.roi_heads.box_predictor.register_forward_hook(
        lambda module, args, output: dtypes.extend(o.dtype for o in output)
    )
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        (detections,) = model([torch.rand(3, 64, 64)])
    assert dtypes == [torch.float32, torch.float32]  # after the float32 hook
    assert detections["boxes"].dtype == torch.float32
    assert detections["masks"].dtype == torch.float32


def test_the_model_never_resizes():
    model = maskrcnn(6, backbone="mobilenet_v3_small", anchor_sizes=(16, 32, 64), fpn_channels=16,
                     box_head_size=32, mask_head_channels=16).eval()  # fmt: skip
    with torch.no_grad():
        (detections,) = model([torch.rand(3, 50, 70)])
    assert detections["masks"].shape[-2:] == (50, 70)
    images, _ = model.transform([torch.rand(3, 50, 70)])
    assert images.image_sizes == [(50, 70)] and images.tensors.shape[-2:] == (64, 96)


def test_boxes_past_x_1024_keep_their_precision_under_bf16():
    # In bf16, coordinates between 1024 and 2048 are multiples of 8: decoded there, every box
    # edge would land on that grid (it does with the float32 hooks removed).
    torch.manual_seed(0)
    model = maskrcnn(6, backbone="mobilenet_v3_small", anchor_sizes=(16, 32, 64), fpn_channels=16,
                     box_head_size=32, mask_head_channels=16, score_threshold=0.0).eval()  # fmt: skip
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        (detections,) = model([torch.rand(3, 96, 1600)])
    far = detections["boxes"][detections["boxes"][:, 0] > 1024]
    assert len(far) > 10
    assert ((far[:, 0] % 8) == 0).float().mean() < 0.5


def test_an_image_without_instances_trains_as_an_empty_target():
    task = InstanceTask(6, CLASSES, [[0, 0, 0]] * 6, [0.5] * 3, [0.25] * 3)
    model = maskrcnn(6, backbone="mobilenet_v3_small", anchor_sizes=(16, 32, 64), fpn_channels=16,
                     box_head_size=32, mask_head_channels=16)  # fmt: skip
    image, ids, table = SyntheticInstances("train", image_size=64)[0]
    empty = (torch.zeros(64, 64, dtype=torch.int16), torch.zeros(0, 2, dtype=torch.int64))
    batch = task.prepare(([image, image], [ids, empty[0]], [table, empty[1]]),
                         torch.device("cpu"), torch.contiguous_format)  # fmt: skip
    assert len(batch[1][1]["boxes"]) == 0
    losses = task.loss(model, batch, lambda: torch.autocast("cpu", enabled=False))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg"}  # fmt: skip
    total = sum(losses.values())
    assert torch.isfinite(total) and all(v.dtype == torch.float32 for v in losses.values())
    total.backward()
