"""Shared fixtures: config composition, tiny dataset trees written on the fly, tiny runs."""

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from seg import evaluate, train

# On 2 cores, one thread makes small steps 5-10x faster and steadier.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIG_GROUPS = (
    "model",
    "data",
    "loss",
    "optimizer",
    "scheduler",
    "trainer",
    "tracker",
    "debug",
    "experiment",
)


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module: scripts/ is no package, its files run as commands."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    return module


def semantic_models() -> list[str]:
    """The model options of the semantic task: those with the segmenter contract (logits),
    not Mask R-CNN's (``seg.models.maskrcnn``, also through a config's defaults)."""
    targets = {option: compose_config(f"model={option}").model._target_
               for option in group_options("model")}  # fmt: skip
    return [option for option, target in targets.items() if target != "seg.models.maskrcnn"]


def group_options(group: str) -> list[str]:
    """A config group's options, those in subfolders too (``model=tiny/semantic``)."""
    folder = REPO / "configs" / group
    return sorted(str(path.relative_to(folder).with_suffix("")) for path in folder.rglob("*.yaml"))


@contextmanager
def hydra_context():
    """Hydra initialised on the packaged configs, as ``@hydra.main`` sees them."""
    with initialize_config_module(config_module="seg.configs", version_base="1.3"):
        yield


def compose_config(*overrides: str, config_name: str = "train"):
    with hydra_context():
        return compose(config_name=config_name, overrides=list(overrides))


def write_png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette is not None:
        image = image.convert("P") if image.mode != "P" else image
        image.putpalette(palette)
    image.save(path)


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """A 2-class folder dataset: 3 train and 2 val pairs of 40x48 images."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            mask = np.zeros((40, 48), np.uint8)
            mask[10:30, 5 + i : 25 + i] = 1
            image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            write_png(tmp_path / "images" / split / f"img{i}.png", image)
            write_png(tmp_path / "masks" / split / f"img{i}.png", mask)
    return tmp_path


# A few Cityscapes labelIds with their trainIds (255: ignored).
CITYSCAPES_IDS = {0: 255, 1: 255, 7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18}


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    """The official layout with 2 train and 1 val image of 32x64, labelIds in stripes."""
    rng = np.random.default_rng(0)
    label_ids = np.array(list(CITYSCAPES_IDS), np.uint8)
    for split, city, count in (("train", "aachen", 2), ("val", "frankfurt", 1)):
        for i in range(count):
            name = f"{city}_{i:06d}_000019"
            labels = np.repeat(label_ids, 7)[:64][None].repeat(32, 0)
            image = rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)
            write_png(tmp_path / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", image)
            write_png(tmp_path / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", labels)
    return tmp_path


TINY = ("debug=tiny", "trainer.precision=fp32")


def run_training(run_dir: Path, *overrides: str) -> float:
    """train.run as `python train.py debug=tiny ...` would call it, in this process."""
    overrides = [*TINY, f"output_root={run_dir.parent}", *overrides]
    with hydra_context():
        return train.run(compose("train", overrides=overrides), run_dir, overrides)


def run_evaluation(*overrides: str) -> dict:
    with hydra_context():
        return evaluate.run(compose("evaluate", overrides=list(overrides)), list(overrides))


def _random_image(rng, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def camvid_root(tmp_path: Path) -> Path:
    """SegNet's CamVid layout: 2 images per split, 24x32, labels 0-11 (11 = void)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for i in range(2):
            write_png(tmp_path / split / f"0001TP_{i:06d}.png", _random_image(rng, 24, 32))
            labels = rng.integers(0, 12, (24, 32), dtype=np.uint8)
            write_png(tmp_path / f"{split}annot" / f"0001TP_{i:06d}.png", labels)
    return tmp_path


VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (252 * 3) + [224, 224, 192]


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """VOC2012's layout: 2007_000032 in train, 2007_000033 in val, both in trainaug."""
    rng = np.random.default_rng(0)
    ids = ("2007_000032", "2007_000033")
    (tmp_path / "JPEGImages").mkdir(parents=True)
    for i, name in enumerate(ids):
        Image.fromarray(_random_image(rng, 24, 32)).save(tmp_path / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((24, 32), np.uint8)
        mask[5:15, 5:20] = 1 + i
        mask[4, 5:20] = 255  # the object boundary, ignored
        write_png(tmp_path / "SegmentationClass" / f"{name}.png", mask, palette=VOC_PALETTE)
        write_png(tmp_path / "SegmentationClassAug" / f"{name}.png", mask)
    sets = tmp_path / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text(f"{ids[0]}\n")
    (sets / "val.txt").write_text(f"{ids[1]}\n")
    (sets / "trainaug.txt").write_text("\n".join(ids) + "\n")
    return tmp_path


@pytest.fixture
def ade20k_root(tmp_path: Path) -> Path:
    """ADEChallengeData2016's layout: one training and one validation image, labels 0-150."""
    rng = np.random.default_rng(0)
    for folder in ("training", "validation"):
        (tmp_path / "images" / folder).mkdir(parents=True)
        name = f"ADE_{folder[:5]}_00000001"
        Image.fromarray(_random_image(rng, 24, 32)).save(
            tmp_path / "images" / folder / f"{name}.jpg"
        )
        labels = np.array([[0, 1, 2, 150]], np.uint8).repeat(24, 0).repeat(8, 1)
        write_png(tmp_path / "annotations" / folder / f"{name}.png", labels)
    return tmp_path
