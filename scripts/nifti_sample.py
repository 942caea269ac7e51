"""Write a data=nifti tree of cases made from the real MRI volume nibabel ships
(``nibabel/tests/data/anatomical.nii``: 33x41x25 voxels, int16, stored LAS, not canonical),
for the tests and the measured example in docs/results/nifti_example:

    python scripts/nifti_sample.py /tmp/nifti --train 6 --val 2 --noise 0.1

Case k (named a, b, c, ...) is the volume mirrored along the axes ``FLIPS[k]`` (the first
cases train, the next ones validate: whole volumes, never slices of one case in two splits),
its intensities times a gain drawn per case in [0.7, 1.3] plus Gaussian noise of ``noise``
times the volume's standard deviation (seeded per case; ``noise=0``: the plain mirrored
volume). Its label volume, from the clean intensities (``threshold_labels``), stands in for an
organ's annotation: bright tissue in the middle axial slices, none in the first and last five.
Both keep the sample's affine and orientation, so every case goes through seg's reorientation.
"""

import argparse
from pathlib import Path

import numpy as np

# The axes each case is mirrored along, in case order: train takes the first, val the next.
FLIPS = [(), (1,), (0,), (0, 1), (2,), (1, 2), (0, 2), (0, 1, 2)]


def anatomical_path() -> Path:
    import nibabel  # the medical extra: pip install -e ".[medical]"

    return Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"


def threshold_labels(data: np.ndarray) -> np.ndarray:
    """Foreground: the brightest quarter of the voxels (a stand-in for an organ's label), in
    the middle 15 of the 25 axial slices: the others have none."""
    labels = (data > np.percentile(data, 75)).astype(np.uint8)
    labels[..., :5] = labels[..., -5:] = 0
    return labels


def write_case(root: Path, split: str, case: str, data: np.ndarray, affine, labels=None) -> None:
    """``case``'s image (int16, as stored) and label volumes (the threshold of ``data``)."""
    import nibabel as nib

    for kind, array in (("images", data.astype(np.int16)),
                        ("labels", threshold_labels(data) if labels is None else labels)):  # fmt: skip
        (root / kind / split).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), root / kind / split / f"{case}.nii.gz")


def write_sample(root: Path, train: int, val: int, noise: float = 0.0) -> Path:
    """``train`` + ``val`` cases (at most ``len(FLIPS)``) under ``root``; returns ``root``."""
    import nibabel as nib

    if train < 1 or val < 1 or train + val > len(FLIPS):
        raise SystemExit(f"--train {train} --val {val}: give 1 or more each, {len(FLIPS)} in all")
    image = nib.load(anatomical_path())
    clean = np.asanyarray(image.dataobj).astype(np.float32)
    for k, axes in enumerate(FLIPS[: train + val]):
        mirrored = np.flip(clean, axes).copy() if axes else clean
        data = mirrored
        if noise:
            rng = np.random.default_rng(k)
            gain = rng.uniform(0.7, 1.3)
            data = mirrored * gain + rng.normal(0, noise * clean.std(), clean.shape)
        split = "train" if k < train else "val"
        write_case(root, split, chr(ord("a") + k), data, image.affine, threshold_labels(mirrored))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the data.root to write")
    parser.add_argument("--train", type=int, default=6, help="training cases")
    parser.add_argument("--val", type=int, default=2, help="validation cases")
    parser.add_argument("--noise", type=float, default=0.1,
                        help="noise per case, in the volume's standard deviations")  # fmt: skip
    args = parser.parse_args()
    write_sample(args.out, args.train, args.val, args.noise)
    print(f"wrote {args.train} training and {args.val} validation cases to {args.out}")


if __name__ == "__main__":
    main()
