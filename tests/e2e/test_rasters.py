"""C-band rasters end to end (issue 22): train, resume exactly, evaluate, predict and export.

A 4-band uint16 TIFF dataset made here, and the 13 Sentinel-2 bands of ../shared/data as uint16
GeoTIFF chips on a spatial split (skipped without it).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hydra import compose
from omegaconf import OmegaConf

from seg import evaluate, export, predict
from tests.conftest import hydra_context, load_script, run_training

SHARED = Path(os.environ.get("SEG_SHARED_DATA", "/work/shared/data"))  # ../shared/data
SENTINEL2 = SHARED / "sentinel2_eolearn"
sentinel2_split = load_script("sentinel2_split")


def write_tiff(path: Path, array: np.ndarray) -> None:
    """(H, W, C) as one page with its bands as samples, as GDAL writes a GeoTIFF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    contig = array.ndim == 3 and array.shape[2] > 1
    tifffile.imwrite(path, array, photometric="minisblack", compression="deflate",
                     planarconfig="contig" if contig else None)  # fmt: skip


def four_band_root(root: Path) -> tuple[Path, list[str]]:
    """3 train and 2 val 40x48 images of 4 uint16 bands (values past 8 bits): the foreground
    square is brighter in band 4."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            mask = np.zeros((40, 48), np.uint8)
            mask[8 + i : 30, 6 : 28 + i] = 1
            image = rng.integers(1000, 3000, (40, 48, 4)).astype(np.uint16)
            image[..., 3] += mask.astype(np.uint16) * 40000
            write_tiff(root / "images" / split / f"img{i}.tif", image)
            write_tiff(root / "masks" / split / f"img{i}.tif", mask)
    stats = ["data.mean=[0.03,0.03,0.03,0.3]", "data.std=[0.01,0.01,0.01,0.3]"]
    return root, [f"data.root={root}", *stats]


def sentinel2_root(root: Path) -> tuple[Path, list[str]]:
    """Clear scenes 2 and 3 as 13-band uint16 GeoTIFFs (reflectance x 10000) with the land
    cover mask (0: no data, ignored), split by rows (scripts/sentinel2_split.py)."""
    if not SENTINEL2.is_dir():
        pytest.skip(f"{SENTINEL2} not present")
    sentinel2_split.write_split(SENTINEL2, root, [2, 3])
    palette = [[i * 20, 255 - i * 20, (i * 70) % 256] for i in range(11)]
    return root, [
        *sentinel2_split.DATA_KEYS[1:], f"data.root={root}",
        f"data.palette=[{','.join(f'[{r},{g},{b}]' for r, g, b in palette)}]",
        f"data.mean=[{','.join(['0.1'] * 13)}]", f"data.std=[{','.join(['0.05'] * 13)}]",
    ]  # fmt: skip


def run_entry(module, config_name, *overrides):
    with hydra_context():
        return module.run(compose(config_name, overrides=list(overrides)), list(overrides))


@pytest.mark.parametrize(
    ("make", "channels", "scale"), [(four_band_root, 4, 65535.0), (sentinel2_root, 13, 10000.0)]
)
def test_a_c_band_run_trains_resumes_evaluates_predicts_and_exports(
    tmp_path, make, channels, scale
):
    root, data = make(tmp_path / "data")
    data = ["data=folder", *data]
    straight, resumed = tmp_path / "out" / "straight", tmp_path / "out" / "resumed"
    run_training(straight, *data)
    run_training(resumed, *data, "trainer.max_iters=2", "scheduler.max_iters=4")
    run_training(tmp_path / "out" / "unused", *data, "trainer.max_iters=4",
                 f"resume={resumed / 'checkpoints/last.pt'}")  # fmt: skip
    a = torch.load(straight / "checkpoints/last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints/last.pt", weights_only=True)
    assert b["iteration"] == 4 and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    stored = OmegaConf.create(a["config"]).data  # settled: the numbers, not null and auto
    assert stored.in_channels == channels and stored.scale == scale
    assert next(iter(a["model"].values())).shape[1] == channels  # the first convolution's input

    checkpoint = f"checkpoint={straight / 'checkpoints' / 'last.pt'}"
    logged = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])["mIoU"]
    assert run_entry(evaluate, "evaluate", checkpoint)["mIoU"] == pytest.approx(logged)

    out = tmp_path / "pred"
    written = run_entry(predict, "predict", checkpoint, f"input={root / 'images' / 'val'}",
                        f"output={out}", "format=[index,overlay]")  # fmt: skip
    assert written == {"written": 2, "skipped": 0}
    assert len(list((out / "overlay").glob("*.png"))) == 2

    onnx = tmp_path / "model.onnx"
    report = run_entry(export, "export", checkpoint, "format=onnx", f"output={onnx}",
                       "verify_split=val")  # fmt: skip
    assert report["verification"]["passed"]
    assert report["input"]["channels"] == channels and report["input"]["scale"] == scale
    assert len(report["input"]["mean"]) == channels
    logits = export.ExportedModel(onnx, "onnx")(torch.randn(1, channels, 40, 48))
    assert logits.shape[1] == len(report["class_names"])


def test_a_resume_with_reordered_bands_is_refused(tmp_path):
    _, data = four_band_root(tmp_path / "data")
    run_dir = tmp_path / "out" / "run"
    run_training(run_dir, "data=folder", *data, "data.bands=[1,2,3,4]", "trainer.max_iters=2")
    with pytest.raises(ValueError, match=r"data\.bands=\[1, 2, 3, 4\] in the checkpoint"):
        run_training(tmp_path / "out" / "again", "data=folder", *data, "data.bands=[4,3,2,1]",
                     f"resume={run_dir / 'checkpoints/last.pt'}")  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda image: image[..., :3], r"img1\.tif: 3 bands of uint16 .* 4 of uint16"),
        (lambda image: image.astype(np.float32), r"img1\.tif: 4 bands of float32"),
    ],
)
def test_an_image_unlike_the_others_stops_the_run_before_it_writes(tmp_path, damage, message):
    root, data = four_band_root(tmp_path / "data")
    path = root / "images" / "train" / "img1.tif"
    write_tiff(path, damage(tifffile.imread(path)))
    with pytest.raises(Exception, match=message):
        run_training(tmp_path / "out" / "run", "data=folder", *data)
    assert not (tmp_path / "out").exists()


def test_bands_out_of_range_and_auto_scale_of_floats_name_the_file(tmp_path):
    root, data = four_band_root(tmp_path / "data")
    with pytest.raises(Exception, match=r"img0\.tif: data\.bands=\[2, 5\] asks for bands \[5\]"):
        run_training(tmp_path / "out" / "a", "data=folder", *data, "data.bands=[2,5]")
    with pytest.raises(ValueError, match=r"data\.mean has 4 values but the images have 2 bands"):
        run_training(tmp_path / "out" / "a", "data=folder", *data, "data.bands=[2,4]")
    with pytest.raises(ValueError, match=r"data\.rgb_bands=\[4, 3, 5\]: give three input bands"):
        run_training(tmp_path / "out" / "a", "data=folder", *data, "data.rgb_bands=[4,3,5]")
    with pytest.raises(ValueError, match=r"data\.mean has 4 values but the images have 2 bands"):
        run_training(tmp_path / "out" / "a", "data=folder", *data, "data.bands=[2,4]")
    with pytest.raises(
        ValueError, match=r"data\.rgb_bands=\[4, 3, 5\]: give three input bands in 1-4"
    ):
        run_training(tmp_path / "out" / "a", "data=folder", *data, "data.rgb_bands=[4,3,5]")
    for split in ("train", "val"):
        for path in (root / "images" / split).iterdir():
            write_tiff(path, tifffile.imread(path).astype(np.float32) / 65535)
    with pytest.raises(Exception, match=r"img0\.tif: pixels are float32.*data\.scale"):
        run_training(tmp_path / "out" / "b", "data=folder", *data)
    assert not (tmp_path / "out").exists()
