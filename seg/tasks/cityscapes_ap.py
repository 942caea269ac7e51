"""Cityscapes' official instance AP and AP50, as cityscapesscripts' ``evalInstanceLevelSemanticLabeling``
computes them, written for seg (cityscapesscripts is only the tests' reference).

Per image, every detection is matched with the raw ``*_gtFine_instanceIds.png``: its pixel
count, its pixels on void labels (``ignoreInEval``) and its intersection with each ground-truth
region of its class (instances, ``id >= 1000``, and groups, ``id < 1000``). Per class and IoU
threshold t in 0.5, 0.55, ..., 0.95 (a match needs IoU strictly above t):

- a counted ground truth (an instance of at least ``MIN_REGION_SIZE`` pixels) is a true
  positive scored by its best matching detection, each other matching detection a false
  positive, and a miss when none matches;
- a detection matching no region of its class is a false positive unless more than t of its
  pixels lie on void labels, groups or uncounted small instances (a pixel on a small group
  counts twice, as in the official code).

AP of a class and threshold is the area under the precision-recall curve, stepwise between
the distinct scores, with the point (recall 0, precision 1) added; a class with ground truth
but no detection of its class at all has AP 0, one without ground truth NaN. AP is the mean
over classes and thresholds, AP50 over classes at t = 0.5 (NaN classes left out).
"""

import warnings
from dataclasses import dataclass

import numpy as np

from seg.data.instance_layouts import THING_LABELS

OVERLAPS = np.arange(0.5, 1.0, 0.05)  # IoU thresholds: 0.5, 0.55, ..., 0.95 (the official array)
MIN_REGION_SIZE = 100  # pixels: smaller ground-truth instances are not counted
# labels.py's ``ignoreInEval`` ids, caravan (29) and trailer (30) among them: a detection on them
# is no false positive (license plate, -1, never appears in an instanceIds PNG)
VOID_LABELS = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)


@dataclass
class ImageMatches:
    """One image's detections against its ground-truth regions of the 8 thing classes."""

    truth_class: np.ndarray  # (G,) class (1-8) of each region
    truth_counted: (
        np.ndarray
    )  # (G,) bool: an instance (id >= 1000) of MIN_REGION_SIZE pixels or more
    truth_group: np.ndarray  # (G,) bool: a group (id < 1000)
    truth_pixels: np.ndarray  # (G,) pixel counts
    classes: np.ndarray  # (P,) class (1-8) of each non-empty detection
    scores: np.ndarray  # (P,) float64
    pixels: np.ndarray  # (P,) pixel counts
    void: np.ndarray  # (P,) pixels on void labels
    intersections: np.ndarray  # (P, G) pixels shared with each region of the same class (else 0)


def image_matches(
    instance_ids: np.ndarray, masks: np.ndarray, classes: np.ndarray, scores: np.ndarray
) -> ImageMatches:
    """``instance_ids``: the (H, W) instanceIds PNG as read; ``masks`` (P, H, W) bool, their
    ``classes`` (seg's, 1-8) and ``scores``. Empty masks are left out, as the official code
    skips them."""
    values, inverse, pixels = np.unique(instance_ids, return_inverse=True, return_counts=True)
    label_ids = np.where(values >= 1000, values // 1000, values)
    lookup = np.zeros(max(int(label_ids.max(initial=0)), max(THING_LABELS)) + 1, np.int64)
    lookup[list(THING_LABELS)] = list(THING_LABELS.values())
    value_class = lookup[label_ids]  # 0: no thing class
    things = np.flatnonzero(value_class > 0)
    region = np.full(len(values), -1, np.int64)  # value -> region index, -1 for non-things
    region[things] = np.arange(len(things))
    region_map = region[inverse.reshape(instance_ids.shape)]
    void_map = np.isin(instance_ids, VOID_LABELS)
    truth_class = value_class[things]
    masks = masks.reshape(len(masks), *instance_ids.shape)
    counts = masks.reshape(len(masks), -1).sum(1)
    kept = np.flatnonzero(counts > 0)
    intersections = np.zeros((len(kept), len(things)), np.int64)
    void = np.zeros(len(kept), np.int64)
    for row, p in enumerate(kept):
        on = region_map[masks[p]]
        intersections[row] = np.bincount(on[on >= 0], minlength=len(things))
        void[row] = np.count_nonzero(void_map[masks[p]])
    classes = np.asarray(classes, np.int64)[kept]
    intersections[classes[:, None] != truth_class[None, :]] = 0  # matched within a class only
    return ImageMatches(
        truth_class=truth_class,
        truth_counted=(values[things] >= 1000) & (pixels[things] >= MIN_REGION_SIZE),
        truth_group=values[things] < 1000,
        truth_pixels=pixels[things],
        classes=classes,
        scores=np.asarray(scores, np.float64)[kept],
        pixels=counts[kept],
        void=void,
        intersections=intersections,
    )


def average_precision(scores: np.ndarray, true: np.ndarray, misses: int) -> float:
    """The area under the precision-recall curve of ``scores`` (true positives and false
    positives by ``true``) with ``misses`` ground truths never detected: precision and recall
    at each distinct score as threshold, the point (0, 1) added, integrated stepwise with each
    point weighing half the recall gap to its two neighbours."""
    if not len(scores):
        return 0.0  # nothing matched nor falsely detected (the official code fails here)
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_true = scores[order], true[order]
    below = np.concatenate([[0], np.cumsum(sorted_true)])  # true positives below position i
    _, first = np.unique(sorted_scores, return_index=True)  # each distinct score's first position
    tp = below[-1] - below[first]  # true positives scored at least that score
    fp = len(sorted_scores) - first - tp
    precision = np.append(tp / (tp + fp), 1.0)
    recall = np.append(tp / (below[-1] + misses), 0.0)
    before = np.concatenate([[recall[0]], recall[:-1]])
    after = np.append(recall[1:], 0.0)
    return float(np.dot(precision, 0.5 * (before - after)))


def class_ap(images: list[ImageMatches], label: int, threshold: float) -> float:
    """The AP of class ``label`` (1-8) at IoU ``threshold``; NaN without ground truth."""
    scores, true, misses = [], [], 0
    have_truth = have_detections = False
    for image in images:
        regions = np.flatnonzero(image.truth_class == label)
        detections = np.flatnonzero(image.classes == label)
        have_truth |= bool(image.truth_counted[regions].any())
        have_detections |= len(detections) > 0
        inter = image.intersections[np.ix_(detections, regions)].astype(np.float64)
        union = image.truth_pixels[regions][None, :] + image.pixels[detections][:, None] - inter
        match = inter / np.maximum(union, 1) > threshold  # (D, R); inter 0 where no overlap
        for column in np.flatnonzero(image.truth_counted[regions]):
            matched = image.scores[detections][match[:, column]]
            if not len(matched):
                misses += 1
                continue
            best = int(np.argmax(matched))  # the best one is the hit, the others false
            scores += [matched[best], *np.delete(matched, best)]
            true += [1] + [0] * (len(matched) - 1)
        # detections matching no region: false unless mostly on what is not scored
        ignored_regions = image.truth_group[regions].astype(np.int64) + (
            image.truth_pixels[regions] < MIN_REGION_SIZE
        )  # a small group counts twice, as in the official code
        for row in np.flatnonzero(~match.any(1)):
            ignored = image.void[detections[row]] + np.dot(inter[row], ignored_regions)
            if ignored / image.pixels[detections[row]] <= threshold:
                scores.append(image.scores[detections[row]])
                true.append(0)
    if not have_truth:
        return float("nan")
    if not have_detections:
        return 0.0
    return average_precision(np.array(scores, np.float64), np.array(true), misses)


def cityscapes_metrics(images: list[ImageMatches]) -> dict:
    """``cityscapes_AP``, ``cityscapes_AP50`` (0-1) and ``cityscapes_AP_class`` (the 8 classes'
    AP over the thresholds, NaN without ground truth)."""
    labels = sorted(THING_LABELS.values())
    ap = np.array([[class_ap(images, label, t) for t in OVERLAPS] for label in labels])
    with warnings.catch_warnings():  # all NaN: no ground truth at all, NaN is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "cityscapes_AP": float(np.nanmean(ap)),
            "cityscapes_AP50": float(np.nanmean(ap[:, 0])),
            "cityscapes_AP_class": [float(value) for value in ap.mean(1)],
        }
