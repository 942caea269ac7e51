"""seg.panoptic's PQ equals the official PQ core (cityscapesscripts' evalPanopticSemanticLabeling)
on the same COCO panoptic files; per-image statistics sum to the whole."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg import panoptic
from tests.conftest import REPO

m = pytest.importorskip("cityscapesscripts.evaluation.evalPanopticSemanticLabeling")
# ../shared/data beside the checkout (or beside the folder of worktrees); the tests skip without it
COCO = (
    next(
        (p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if p.is_dir()),
        REPO.parent / "shared",
    )
    / "data"
    / "panoptic_coco"
)
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 7, "name": "road", "isthing": 0},
    {"id": 9, "name": "sky", "isthing": 0},
    {"id": 11, "name": "bus", "isthing": 1},  # no ground truth, no prediction
]


def write(folder: Path, name: str, images: dict[str, tuple[np.ndarray, list[dict]]], categories):
    """COCO panoptic files: ``name``.json and the PNGs (id = R + 256 G + 256^2 B) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    annotations = []
    for i, (file_name, (ids, segments)) in enumerate(images.items()):
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(folder / file_name)
        for s in segments:
            s["area"] = int((ids == s["id"]).sum())
        annotations.append({"image_id": i, "file_name": file_name, "segments_info": segments})
    path = folder.parent / f"{name}.json"
    path.write_text(json.dumps({"annotations": annotations, "categories": categories}))
    return path


def official(monkeypatch, capsys, tmp_path, gt_json, gt_dir, pred_json, pred_dir):
    """evaluatePanoptic in this process (no pool of cpu_count() workers), its printing swallowed."""

    def one_core(matched, gt_folder, pred_folder, categories):
        return m.pq_compute_single_core(0, matched, gt_folder, pred_folder, categories)

    monkeypatch.setattr(m, "pq_compute_multi_core", one_core)
    result = m.evaluatePanoptic(
        str(gt_json), str(gt_dir), str(pred_json), str(pred_dir), str(tmp_path / "r.json")
    )
    capsys.readouterr()
    return result


def assert_equal(ours, theirs):
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == theirs[name]["n"], name
        for k in ("pq", "sq", "rq"):
            assert ours[name][k] == pytest.approx(theirs[name][k], abs=1e-9), (name, k)
    for cid, r in theirs["per_class"].items():
        for k in ("pq", "sq", "rq"):
            # a class with no tp, fp or fn: NaN here, 0 in the official table; out of both means
            expected = r[k] if not np.isnan(ours["per_class"][cid][k]) else 0.0
            assert np.nan_to_num(ours["per_class"][cid][k]) == pytest.approx(expected, abs=1e-9), (
                cid,
                k,
            )


def synthetic_pair():
    """Two 40x48 scenes and a prediction: ids shuffled, one person removed, a car split, two
    persons merged, a crowd of cars, void regions in both, an extra false positive."""
    gt_a = np.full((40, 48), 10)  # road
    gt_a[:12] = 20  # sky
    gt_a[15:25, 2:10] = 31  # person
    gt_a[15:25, 12:20] = 32  # person
    gt_a[15:25, 22:26] = 33  # person, removed from the prediction
    gt_a[28:36, 2:20] = 41  # car, split in the prediction
    gt_a[28:38, 25:45] = 50  # a crowd of cars
    gt_a[12:14] = 0  # void
    seg_a = [
        {"id": 10, "category_id": 7, "iscrowd": 0},
        {"id": 20, "category_id": 9, "iscrowd": 0},
        {"id": 31, "category_id": 1, "iscrowd": 0},
        {"id": 32, "category_id": 1, "iscrowd": 0},
        {"id": 33, "category_id": 1, "iscrowd": 0},
        {"id": 41, "category_id": 2, "iscrowd": 0},
        {"id": 50, "category_id": 2, "iscrowd": 1},
    ]
    pred_a = np.full((40, 48), 1000)  # road, covering the removed person
    pred_a[:13] = 2000  # sky, one void row more
    pred_a[15:25, 2:20] = 3000  # the two persons merged: matches neither, a false positive
    pred_a[28:36, 2:10] = 4100  # the car split: the bigger half matches
    pred_a[28:36, 10:20] = 4200
    pred_a[29:37, 26:44] = 5000  # a car on the crowd: not a false positive
    pred_a[2:6, 40:46] = 6000  # a car in the sky: a false positive
    pred_a[38:40, :4] = 0  # void in the prediction
    seg_pa = [
        {"id": 1000, "category_id": 7},
        {"id": 2000, "category_id": 9},
        {"id": 3000, "category_id": 1},
        {"id": 4100, "category_id": 2},
        {"id": 4200, "category_id": 2},
        {"id": 5000, "category_id": 2},
        {"id": 6000, "category_id": 2},
    ]
    gt_b = np.full((40, 48), 7)
    gt_b[20:30, 20:30] = 8
    seg_b = [{"id": 7, "category_id": 9, "iscrowd": 0}, {"id": 8, "category_id": 1, "iscrowd": 0}]
    pred_b = np.full((40, 48), 70)
    pred_b[21:30, 20:31] = 80  # IoU 0.8 with the person
    seg_pb = [{"id": 70, "category_id": 9}, {"id": 80, "category_id": 1}]
    return {"a.png": (gt_a, seg_a), "b.png": (gt_b, seg_b)}, {
        "a.png": (pred_a, seg_pa),
        "b.png": (pred_b, seg_pb),
    }


def test_pq_equals_the_official_code_on_perturbed_synthetic_ground_truth(
    tmp_path, monkeypatch, capsys
):
    gt, pred = synthetic_pair()
    gt_json = write(tmp_path / "gt", "gt", gt, CATEGORIES)
    pred_json = write(tmp_path / "pred", "pred", pred, CATEGORIES)
    stats, categories = panoptic.score_folders(
        gt_json, tmp_path / "gt", pred_json, tmp_path / "pred"
    )
    ours = panoptic.pq_from_stats(stats, categories)
    theirs = official(
        monkeypatch, capsys, tmp_path, gt_json, tmp_path / "gt", pred_json, tmp_path / "pred"
    )
    assert_equal(ours, theirs)
    assert 0 < ours["All"]["pq"] < 1 and ours["All"]["n"] == 4  # bus has nothing: not counted
    assert np.isnan(ours["per_class"][11]["pq"])
    # The counts the perturbations should give: persons 1 tp (b), 1 fp (merged), 3 fn; cars 1 tp
    # (the split's bigger half), 2 fp (its smaller half, the one in the sky), the crowd ignored.
    person, car = stats[0], stats[1]
    assert person[:3].tolist() == [1, 1, 3] and car[:3].tolist() == [1, 2, 0]


def test_the_stats_of_two_halves_sum_to_the_whole(tmp_path):
    gt, pred = synthetic_pair()
    categories = panoptic.categories_from_json({"categories": CATEGORIES})
    per_image = [panoptic.match_image(*gt[k], *pred[k], categories) for k in gt]
    gt_json = write(tmp_path / "gt", "gt", gt, CATEGORIES)
    pred_json = write(tmp_path / "pred", "pred", pred, CATEGORIES)
    whole, _ = panoptic.score_folders(gt_json, tmp_path / "gt", pred_json, tmp_path / "pred")
    np.testing.assert_allclose(per_image[0] + per_image[1], whole, rtol=0, atol=1e-12)


def test_a_segment_missing_from_the_json_is_named(tmp_path):
    gt, pred = synthetic_pair()
    categories = panoptic.categories_from_json({"categories": CATEGORIES})
    ids, segments = pred["b.png"]
    with pytest.raises(ValueError, match=r"image b: .*\[70, 80\].*\[70\]"):
        panoptic.match_image(*gt["b.png"], ids, segments[:1], categories, image="image b")
    with pytest.raises(ValueError, match="category_id 5"):
        panoptic.match_image(
            *gt["b.png"], ids, [segments[0], {"id": 80, "category_id": 5}], categories
        )


needs_coco = pytest.mark.skipif(not COCO.is_dir(), reason=f"{COCO} is absent")


@needs_coco
def test_coco_ground_truth_against_itself_is_pq_1(capsys):
    gt_json, gt_dir = COCO / "panoptic_examples.json", COCO / "panoptic_examples"
    result = panoptic.main([str(gt_json), str(gt_dir), str(gt_json), str(gt_dir)])
    assert result["All"]["pq"] == result["Things"]["pq"] == result["Stuff"]["pq"] == 1.0
    assert "All" in capsys.readouterr().out


@needs_coco
def test_coco_perturbed_equals_the_official_code_and_halves_sum(tmp_path, monkeypatch, capsys):
    coco = json.loads((COCO / "panoptic_examples.json").read_text())
    rng = np.random.default_rng(0)
    images = {}
    for a in coco["annotations"]:
        ids = panoptic.read_ids(COCO / "panoptic_examples", a)
        segments = [dict(s) for s in a["segments_info"]]
        # shuffle the ids, drop one segment to void, merge the second into the third, shift a stripe
        new = {
            s["id"]: int(v)
            for s, v in zip(segments, rng.permutation(len(segments)) + 1, strict=True)
        }
        out = np.zeros_like(ids)
        for old, v in new.items():
            out[ids == old] = v
        out[ids == segments[0]["id"]] = 0
        out[ids == segments[1]["id"]] = new[segments[2]["id"]]
        out[:, 100:140] = np.roll(out[:, 100:140], 15, axis=0)
        kept = [{"id": new[s["id"]], "category_id": s["category_id"]} for s in segments[2:]]
        present = set(np.unique(out).tolist())
        images[a["file_name"].replace(".jpg", ".png")] = (
            out,
            [s for s in kept if s["id"] in present],
        )
    pred_json = write(tmp_path / "pred", "pred", images, coco["categories"])
    # image_ids follow the order of the annotations, as write() numbers them
    gt = dict(coco, annotations=[dict(a, image_id=i) for i, a in enumerate(coco["annotations"])])
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(json.dumps(gt))
    stats, categories = panoptic.score_folders(
        gt_json, COCO / "panoptic_examples", pred_json, tmp_path / "pred"
    )
    ours = panoptic.pq_from_stats(stats, categories)
    theirs = official(
        monkeypatch,
        capsys,
        tmp_path,
        gt_json,
        COCO / "panoptic_examples",
        pred_json,
        tmp_path / "pred",
    )
    assert_equal(ours, theirs)
    assert 0.3 < ours["All"]["pq"] < 1
    halves = sum(
        panoptic.match_image(
            panoptic.read_ids(COCO / "panoptic_examples", g), g["segments_info"],
            *images[g["file_name"]], categories,
        )
        for g in gt["annotations"]
    )  # fmt: skip
    np.testing.assert_allclose(halves, stats, rtol=0, atol=1e-12)
