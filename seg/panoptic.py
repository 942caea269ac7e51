"""Panoptic quality (PQ = SQ x RQ, Kirillov et al. 2019), computed as the official PQ core does
(cityscapesscripts' ``evalPanopticSemanticLabeling``, the same core as cocodataset/panopticapi),
and a reader for the COCO panoptic format.

Each image's matching gives summable per-category statistics, a float64 array (C, 4) with the
columns ``tp, fp, fn, iou`` (the sum of matched IoUs): under torchrun the ranks all-reduce it and
score once, which equals one process. ``pq_from_stats`` turns the sum into the result.

    python -m seg.panoptic gt.json gt_dir pred.json pred_dir
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from seg.data.panoptic import id_to_rgb, rgb_to_id

VOID = 0  # the segment id of unlabelled pixels, in ground truth and prediction
TP, FP, FN, IOU = range(4)  # the columns of the statistics array


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    isthing: bool


def categories_from_json(coco: dict, path: str = "the JSON") -> list[Category]:
    """The ``categories`` of a COCO panoptic JSON, in its order (the rows of the statistics)."""
    if "categories" not in coco:
        raise ValueError(f"{path} has no 'categories' list: a COCO panoptic ground truth has one")
    return [Category(int(c["id"]), str(c["name"]), c["isthing"] == 1) for c in coco["categories"]]


def encode_ids(ids: np.ndarray) -> bytes:
    """Segment ids as the COCO panoptic PNG's bytes (id = R + 256 G + 256^2 B)."""
    ok, png = cv2.imencode(".png", np.ascontiguousarray(id_to_rgb(ids)[..., ::-1]))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {ids.shape} segment map as PNG")
    return png.tobytes()


def merge(
    semantic: np.ndarray,
    masks: np.ndarray,
    classes: np.ndarray,
    scores: np.ndarray,
    isthing: np.ndarray,
    score_threshold: float = 0.5,
    overlap_threshold: float = 0.5,
    min_stuff_area: int = 0,
) -> tuple[np.ndarray, list[dict]]:
    """Panoptic FPN's inference: a semantic and an instance prediction -> one panoptic one.

    ``semantic`` (H, W) class indices; ``masks`` (N, H, W) bool instance masks with their
    ``classes`` (N,) (semantic class indices, things) and ``scores`` (N,); ``isthing`` (C,) bool
    per class. Instances are painted by descending score, skipping those scored below
    ``score_threshold`` and those more than ``overlap_threshold`` of whose pixels a higher-scoring
    one took (the rest keeps its free pixels); then each stuff class of the semantic prediction
    gets the pixels still free, if at least ``min_stuff_area`` of them. Thing pixels of the
    semantic prediction that no instance covers stay void (0).

    Returns the (H, W) int32 segment ids (0 void, from 1) and their ``segments_info`` entries
    (``id``, ``category_id``: the class index, ``isthing``, ``score``: 1 for stuff).
    """
    ids = np.zeros(semantic.shape, np.int32)
    segments = []
    for k in np.argsort(-np.asarray(scores), kind="stable"):
        if scores[k] < score_threshold:
            break  # sorted: the rest score lower still
        mask = masks[k]
        area = int(mask.sum())
        taken = int((mask & (ids > 0)).sum())
        if area == 0 or taken / area > overlap_threshold:
            continue
        ids[mask & (ids == 0)] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": int(classes[k]), "isthing": True,
                         "score": float(scores[k])})  # fmt: skip
    for label in np.unique(semantic).tolist():
        if label >= len(isthing) or isthing[label]:
            continue  # thing pixels no instance took, or an index past the classes: void
        mask = (semantic == label) & (ids == 0)
        if mask.sum() < max(min_stuff_area, 1):
            continue
        ids[mask] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": label, "isthing": False,
                         "score": 1.0})  # fmt: skip
    return ids, segments


def match_image(
    gt_ids: np.ndarray,
    gt_segments: list[dict],
    pred_ids: np.ndarray,
    pred_segments: list[dict],
    categories: list[Category],
    image: str = "the image",
) -> np.ndarray:
    """One image's statistics, a float64 array (len(categories), 4) of ``tp, fp, fn, iou``.

    ``gt_ids`` and ``pred_ids`` are (H, W) segment-id maps; the segments are ``segments_info``
    entries (``id``, ``category_id``, ground truth also ``iscrowd`` and, optionally, ``area``,
    which the official code takes from the JSON rather than the pixels). A pair of the same
    category matches with IoU > 0.5, where void ground-truth pixels leave the predicted
    segment's area; a crowd ground-truth segment matches nothing; an unmatched prediction is a
    false positive unless more than half of it lies on void or on its category's crowd region.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(
            f"{image}: prediction {pred_ids.shape} and ground truth {gt_ids.shape} differ in size"
        )
    row = {c.id: i for i, c in enumerate(categories)}
    gt = {int(s["id"]): s for s in gt_segments}
    pred = {int(s["id"]): s for s in pred_segments}
    for s in (*gt_segments, *pred_segments):
        if s["category_id"] not in row:
            raise ValueError(
                f"{image}: segment {s['id']} has category_id {s['category_id']}, which the "
                "ground truth's categories do not list"
            )
    ids, counts = np.unique(pred_ids, return_counts=True)
    pred_area = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    pred_area.pop(VOID, None)
    if set(pred_area) != set(pred):
        raise ValueError(
            f"{image}: the prediction's PNG segment ids {sorted(pred_area)} and its JSON "
            f"segments_info ids {sorted(pred)} differ; each segment must be in both"
        )
    ids, counts = np.unique(gt_ids, return_counts=True)
    gt_area = {
        i: gt[i].get("area", c)
        for i, c in zip(ids.tolist(), counts.tolist(), strict=True)
        if i in gt
    }
    # Every (gt id, pred id) pair that shares pixels, with its intersection.
    pairs, counts = np.unique(
        gt_ids.astype(np.int64) * 2**24 + pred_ids.astype(np.int64), return_counts=True
    )
    overlap = {
        (int(p >> 24), int(p & (2**24 - 1))): int(c) for p, c in zip(pairs, counts, strict=True)
    }

    stats = np.zeros((len(categories), 4))
    gt_matched, pred_matched = set(), set()
    for (g, p), inter in overlap.items():
        if g not in gt or p not in pred or gt[g]["iscrowd"] == 1:
            continue
        category = gt[g]["category_id"]
        if category != pred[p]["category_id"]:
            continue
        iou = inter / (pred_area[p] + gt_area[g] - inter - overlap.get((VOID, p), 0))
        if iou > 0.5:  # at most one partner each, since segments do not overlap
            stats[row[category], [TP, IOU]] += (1, iou)
            gt_matched.add(g)
            pred_matched.add(p)
    crowd = {}  # category -> its crowd segment; the official code keeps the last one listed
    for g, s in gt.items():
        if s["iscrowd"] == 1:
            crowd[s["category_id"]] = g
        elif g not in gt_matched:
            stats[row[s["category_id"]], FN] += 1
    for p, s in pred.items():
        if p in pred_matched:
            continue
        ignored = overlap.get((VOID, p), 0) + overlap.get((crowd.get(s["category_id"], -1), p), 0)
        if ignored / pred_area[p] <= 0.5:
            stats[row[s["category_id"]], FP] += 1
    return stats


def pq_from_stats(stats: np.ndarray, categories: list[Category]) -> dict:
    """Summed statistics -> ``{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class":
    {category id: {"pq", "sq", "rq"}}}``, values in [0, 1]. As in the official code a category
    counts in a mean only with tp + fp + fn > 0 (``n`` says how many did); one without any is NaN
    here (the official code writes 0), and a group with none has NaN means."""
    tp, fp, fn, iou = stats.T
    counted = tp + fp + fn > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        pq = np.where(counted, iou / (tp + 0.5 * fp + 0.5 * fn), np.nan)
        sq = np.where(counted, np.where(tp > 0, iou / np.maximum(tp, 1), 0.0), np.nan)
        rq = np.where(counted, tp / (tp + 0.5 * fp + 0.5 * fn), np.nan)
    isthing = np.array([c.isthing for c in categories], dtype=bool)
    result = {}
    for name, keep in (("All", np.ones_like(isthing)), ("Things", isthing), ("Stuff", ~isthing)):
        n = int((keep & counted).sum())
        means = {
            k: float(v[keep & counted].mean()) if n else float("nan")
            for k, v in (("pq", pq), ("sq", sq), ("rq", rq))
        }
        result[name] = {**means, "n": n}
    result["per_class"] = {
        c.id: {"pq": float(pq[i]), "sq": float(sq[i]), "rq": float(rq[i])}
        for i, c in enumerate(categories)
    }
    return result


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: give a COCO panoptic JSON") from None


def read_ids(folder: Path, annotation: dict) -> np.ndarray:
    """The (H, W) segment-id map of one ``annotations`` entry, read from ``folder``."""
    path = Path(folder) / annotation["file_name"]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist (file_name of image_id {annotation['image_id']})"
        )
    rgb = np.asarray(Image.open(path).convert("RGB"))
    return rgb_to_id(rgb)


def score_folders(
    gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path
) -> tuple[np.ndarray, list[Category]]:
    """The summed statistics of every ground-truth image against its prediction (by image_id),
    and the ground truth's categories."""
    gt, pred = read_json(gt_json), read_json(pred_json)
    categories = categories_from_json(gt, str(gt_json))
    predicted = {a["image_id"]: a for a in pred.get("annotations", [])}
    stats = np.zeros((len(categories), 4))
    for g in gt["annotations"]:
        if g["image_id"] not in predicted:
            raise ValueError(
                f"{pred_json} has no annotation for image_id {g['image_id']} ({g['file_name']})"
            )
        p = predicted[g["image_id"]]
        stats += match_image(
            read_ids(gt_dir, g), g["segments_info"], read_ids(pred_dir, p), p["segments_info"],
            categories, image=f"image_id {g['image_id']}",
        )  # fmt: skip
    return stats, categories


def format_table(result: dict, categories: list[Category]) -> str:
    """PQ, SQ, RQ in percent: a row per class that counts (COCO lists 133, an image shows few),
    then All, Things and Stuff."""
    lines = [f"{'class':20s} {'PQ':>6s} {'SQ':>6s} {'RQ':>6s}"]
    for c in categories:
        r = result["per_class"][c.id]
        if np.isnan(r["pq"]):  # no tp, fp or fn
            continue
        lines.append(
            f"{c.name[:20]:20s} {100 * r['pq']:6.1f} {100 * r['sq']:6.1f} {100 * r['rq']:6.1f}"
        )
    lines.append(f"{'':20s} {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>4s}")
    for name in ("All", "Things", "Stuff"):
        r = result[name]
        lines.append(
            f"{name:20s} {100 * r['pq']:6.1f} {100 * r['sq']:6.1f} {100 * r['rq']:6.1f} {r['n']:4d}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m seg.panoptic", description="PQ of COCO panoptic predictions"
    )
    parser.add_argument("gt_json", type=Path, help="ground truth: COCO panoptic JSON")
    parser.add_argument("gt_dir", type=Path, help="ground truth: folder of its PNGs")
    parser.add_argument("pred_json", type=Path, help="prediction: COCO panoptic JSON")
    parser.add_argument("pred_dir", type=Path, help="prediction: folder of its PNGs")
    args = parser.parse_args(argv)
    stats, categories = score_folders(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir)
    result = pq_from_stats(stats, categories)
    print(format_table(result, categories))
    return result


if __name__ == "__main__":
    main()
