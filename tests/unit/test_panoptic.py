"""The panoptic merge (Panoptic FPN's rule), the panoptic targets derived from one annotation
map, class matching by name, and the evaluator's sum of per-image matchings."""

import re

import numpy as np
import pytest
import torch

from seg import panoptic
from seg.data.panoptic import semantic_mask
from seg.data.synthetic import PANOPTIC_CLASS_NAMES, SyntheticPanoptic
from seg.tasks.panoptic import PanopticTask, Part

ISTHING = np.array([False, False, True, True])  # road, sky, car, person


def box(y0, y1, x0, x1, shape=(10, 10)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_instances_are_painted_by_score_and_mostly_covered_ones_dropped():
    semantic = np.zeros((10, 10), np.int64)  # road everywhere
    masks = np.stack([box(0, 4, 0, 4), box(0, 4, 2, 6), box(0, 4, 1, 4), box(6, 9, 6, 9)])
    scores = np.array([0.9, 0.8, 0.7, 0.3])
    ids, segments = panoptic.merge(semantic, masks, np.array([2, 3, 2, 2]), scores, ISTHING)
    # the 0.8 one keeps the half not under the 0.9 one; the 0.7 one, all covered, is dropped;
    # the 0.3 one is below the score threshold; road takes the rest
    assert [(s["category_id"], s["score"]) for s in segments] == [(2, 0.9), (3, 0.8), (0, 1.0)]
    assert (ids == 1).sum() == 16 and (ids == 2).sum() == 8
    assert (ids[box(0, 4, 4, 6)] == 2).all() and (ids == 3).sum() == 100 - 24
    # with the overlap threshold raised, the 0.7 one stays with no free pixel: dropped as empty
    _, segments = panoptic.merge(semantic, masks, np.array([2, 3, 2, 2]), scores, ISTHING,
                                 overlap_threshold=1.0, score_threshold=0.2)  # fmt: skip
    assert [s["score"] for s in segments] == [0.9, 0.8, 0.7, 0.3, 1.0]


def test_small_stuff_is_dropped_and_uncovered_semantic_things_are_void():
    semantic = np.zeros((10, 10), np.int64)
    semantic[:2] = 1  # 20 pixels of sky
    semantic[5:8, 5:8] = 3  # person pixels that no instance covers
    ids, segments = panoptic.merge(semantic, np.zeros((0, 10, 10), bool), np.zeros(0, np.int64),
                                   np.zeros(0), ISTHING, min_stuff_area=21)  # fmt: skip
    assert [s["category_id"] for s in segments] == [0]  # road; sky is below 21 pixels
    assert (ids[semantic == 0] == 1).all() and (ids[semantic != 0] == 0).all()  # sky, person: void
    _, segments = panoptic.merge(semantic, np.zeros((0, 10, 10), bool), np.zeros(0, np.int64),
                                 np.zeros(0), ISTHING, min_stuff_area=20)  # fmt: skip
    assert [s["category_id"] for s in segments] == [0, 1]


def task(**keys) -> PanopticTask:
    return PanopticTask(["road", "sky", "car", "person"], [2, 3], [[0, 0, 0]] * 4, **keys)


class Fake:
    """A part's predictor: a fixed semantic prediction or fixed detections."""

    model = torch.nn.Identity()
    precision = "fp32"

    def __init__(self, labels=None, detections=None):
        self.fixed_labels, self.detections = labels, detections

    def labels(self, images, names):
        return torch.from_numpy(self.fixed_labels)[None], 0

    def __call__(self, batch, names):
        return [self.detections]


def test_classes_are_matched_by_name_whatever_their_order():
    labels = np.array([[0, 1], [2, 3]])  # the semantic model's own order: sky, road, person, car
    mask = torch.tensor([[[[0.0, 0.0], [0.9, 0.0]]]])
    detections = {"masks": mask, "labels": torch.tensor([2]), "scores": torch.tensor([0.9])}
    parts = {"semantic": Part(Fake(labels), ["sky", "road", "person", "car"]),
             "instance": Part(Fake(detections=detections), ["background", "person", "car"])}  # fmt: skip
    predict = task(min_stuff_area=1).predictor(parts, torch.device("cpu"), "fp32", False)
    ((ids, segments),) = predict(([torch.zeros(3, 2, 2, dtype=torch.uint8)],), ["x"])
    named = {s["id"]: task().class_names[s["category_id"]] for s in segments}
    assert [[named.get(i) for i in row] for row in ids.tolist()] == [["sky", "road"], ["car", None]]
    # min_stuff_area below 1: a fraction of the image, 0.3 of 4 pixels -> 2: 1-pixel stuff is void
    predict = task(min_stuff_area=0.3).predictor(parts, torch.device("cpu"), "fp32", False)
    ((ids, segments),) = predict(([torch.zeros(3, 2, 2, dtype=torch.uint8)],), ["x"])
    assert [s["category_id"] for s in segments] == [2] and (ids == 0).sum() == 3


@pytest.mark.parametrize(
    ("part", "names", "message"),
    [
        ("semantic", ["road", "sky", "car", "bus"], "missing ['person']; unknown ['bus']"),
        ("instance", ["background", "car"], "missing ['person']"),
    ],
)
def test_class_lists_that_do_not_match_name_the_difference(part, names, message):
    parts = {"semantic": Part(Fake(), ["road", "sky", "car", "person"]),
             "instance": Part(Fake(), ["background", "car", "person"])}  # fmt: skip
    parts[part] = Part(Fake(), names)
    with pytest.raises(
        ValueError, match=rf"the {part} checkpoint.s classes .*{re.escape(message)}"
    ):
        task().predictor(parts, torch.device("cpu"), "fp32", False)


def test_one_annotation_map_gives_the_panoptic_semantic_and_instance_targets():
    _, ids, table = SyntheticPanoptic("val")[3]
    _, mask = SyntheticPanoptic("val", target="semantic")[3]
    _, thing_ids, thing_table = SyntheticPanoptic("val", target="instance", num_classes=4)[3]
    classes = table[:, 0][ids.long() - 1]
    assert torch.equal(mask.long(), classes)  # every pixel has a class: no void here
    things = classes >= 3
    assert things.any() and (~things).any()
    assert torch.equal(thing_ids > 0, things)  # things only, stuff is background
    # the same segments, classes renumbered from 1 (disc, box, triangle)
    for k, (label, crowd) in enumerate(thing_table.tolist()):
        pixels = thing_ids == k + 1
        assert crowd == 0 and set((classes[pixels] - 2).tolist()) == {label}
        assert len(set(ids[pixels].tolist())) == 1
    assert len(thing_table) == len(set(ids[things].tolist()))
    assert semantic_mask(np.zeros((2, 2), np.int32), 255).tolist() == [[255, 255], [255, 255]]
    assert len(PANOPTIC_CLASS_NAMES) == 6


def test_the_evaluator_sums_the_images_matchings():
    pq_task = PanopticTask(PANOPTIC_CLASS_NAMES, [3, 4, 5], [[0, 0, 0]] * 6)
    evaluator = pq_task.evaluator(torch.device("cpu"), num_pictures=1)
    dataset, stats = SyntheticPanoptic("val"), 0
    for i in range(3):
        image, ids, table = dataset[i]
        pred_ids = ids.numpy().astype(np.int32)
        pred_ids[:10] = 0  # a strip left void
        segments = [{"id": k + 1, "category_id": int(c)} for k, (c, _) in enumerate(table)
                    if (pred_ids == k + 1).any()]  # fmt: skip
        evaluator.process(([image], [ids], [table]), [(pred_ids, segments)], [f"s{i}"])
        truth = [{**s, "iscrowd": 0} for s in segments]
        stats = stats + panoptic.match_image(ids.numpy(), truth, pred_ids, segments,
                                             pq_task.categories)  # fmt: skip
    result = evaluator.result()
    assert np.array_equal(result.stats, stats)
    assert result.pq["All"]["pq"] == panoptic.pq_from_stats(stats, pq_task.categories)["All"]["pq"]
    assert 0.5 < result.pq["All"]["pq"] < 1.0
    report = pq_task.report(result, "val")
    assert report.score == result.pq["All"]["pq"] and report.scalars["val/PQ"] == report.score
    assert "val_class/PQ/sky" in report.scalars and report.pictures["examples"].shape[1] == 3 * 96


def test_evaluate_task_panoptic_needs_its_parts_not_a_checkpoint():
    from seg.config import check_required
    from tests.conftest import compose_config

    check_required(compose_config("task=panoptic", config_name="evaluate"))  # what the CLI checks
    with pytest.raises(ValueError, match="Required but not set: checkpoint"):
        check_required(compose_config(config_name="evaluate"))
