"""data.cache_dir: decoded samples written once, read back bit for bit, never stale or torn."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Subset

import seg.data.base
from seg.config import build
from seg.data.ade20k import ADE20K
from seg.data.cityscapes import Cityscapes
from seg.data.folder import FolderDataset
from seg.data.transforms import train_transform, val_transform
from tests.conftest import compose_config, run_evaluation, run_training, write_png

TRAIN = dict(crop_size=[24, 32], ignore_index=255, scale_range=[0.5, 2.0], color_jitter=0.5)


def cityscapes(root: Path, cache_dir: Path | None, transform=None) -> Cityscapes:
    return Cityscapes(str(root), "train", transform=transform, cache_dir=cache_dir)


def folder(root: Path, cache_dir: Path | None, transform=None, **kwargs) -> FolderDataset:
    return FolderDataset(str(root), "train", 2, transform=transform, cache_dir=cache_dir, **kwargs)


@pytest.fixture(params=["cityscapes", "folder"])
def dataset_kind(request, cityscapes_root, folder_root):
    """(constructor, root): Cityscapes maps labelIds to trainIds; folder reads index PNGs."""
    if request.param == "cityscapes":
        return cityscapes, cityscapes_root
    return folder, folder_root


def samples(dataset, seeds=True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [dataset[(i, 7, i) if seeds else i] for i in range(len(dataset))]


def count_file_reads(monkeypatch) -> list[Path]:
    """Every image/mask file that the decoders read from now on."""
    reads, read_file = [], seg.data.base.read_file
    monkeypatch.setattr(seg.data.base, "read_file", lambda p, k: reads.append(p) or read_file(p, k))
    return reads


def assert_same(a, b) -> None:
    for (image_a, mask_a), (image_b, mask_b) in zip(a, b, strict=True):
        assert image_a.dtype == image_b.dtype and mask_a.dtype == mask_b.dtype
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)


@pytest.mark.parametrize("transform", [None, "val", "train"])
def test_cached_samples_equal_decoded_ones_bit_for_bit(dataset_kind, tmp_path, transform):
    make, root = dataset_kind
    build_transform = {None: lambda: None, "val": val_transform,
                       "train": lambda: train_transform(**TRAIN)}[transform]  # fmt: skip
    expected = samples(make(root, None, build_transform()))
    cached = make(root, tmp_path / "cache", build_transform())
    assert_same(samples(cached), expected)  # the first pass decodes and writes
    assert_same(samples(cached), expected)  # the second reads the cache
    # and so does a new dataset over the same files (another run, worker or rank)
    assert_same(samples(make(root, tmp_path / "cache", build_transform())), expected)
    # the label mapping was applied before caching: trainIds, not labelIds
    image, mask = cached.decoded(0)
    assert not image.flags.writeable and set(np.unique(mask).tolist()) <= {
        0,
        1,
        2,
        8,
        10,
        11,
        13,
        18,
        255,
    }


def test_the_second_epoch_reads_no_image_file(dataset_kind, tmp_path, monkeypatch):
    make, root = dataset_kind
    dataset = make(root, tmp_path / "cache", train_transform(**TRAIN))
    reads = count_file_reads(monkeypatch)
    samples(dataset)
    assert len(reads) == 2 * len(dataset)  # an image and a mask each
    reads.clear()
    samples(dataset)
    samples(make(root, tmp_path / "cache", train_transform(**TRAIN)))
    assert reads == []


def test_a_modified_source_file_is_decoded_again_and_its_old_entry_removed(
    cityscapes_root, tmp_path
):
    dataset = cityscapes(cityscapes_root, tmp_path / "cache")
    samples(dataset, seeds=False)
    entries = sorted(dataset.cache.directory.rglob("*.npy"))
    assert len(entries) == 2 * len(dataset)
    label_path = dataset.samples[0][1]
    labels = np.full((32, 64), 26, np.uint8)  # car everywhere: trainId 13
    write_png(label_path, labels)
    os.utime(label_path, ns=(0, 1))  # a different mtime even on coarse-grained file systems
    _, mask = dataset[0]
    assert (mask == 13).all()
    assert torch.equal(mask, cityscapes(cityscapes_root, None)[0][1])
    # the new entry replaced the old one: the cache holds one entry per sample
    assert len(sorted(dataset.cache.directory.rglob("*.npy"))) == len(entries)


def test_a_file_replaced_with_the_same_size_and_modification_time_is_decoded_again(
    cityscapes_root, tmp_path
):
    # Uncompressed PNGs: the same size for any labels. cp -p, rsync -a or touch -r keep mtimes.
    label_path = cityscapes(cityscapes_root, None).samples[0][1]
    Image.fromarray(np.full((32, 64), 7, np.uint8)).save(label_path, compress_level=0)
    dataset = cityscapes(cityscapes_root, tmp_path / "cache")
    samples(dataset, seeds=False)
    before = os.stat(label_path)
    Image.fromarray(np.full((32, 64), 26, np.uint8)).save(label_path, compress_level=0)
    os.utime(label_path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(label_path).st_size == before.st_size
    _, mask = dataset[0]
    assert (mask == 13).all()  # car (labelId 26), not road


def test_torn_files_are_ignored_and_rewritten(cityscapes_root, tmp_path, monkeypatch):
    dataset = cityscapes(cityscapes_root, tmp_path / "cache")
    expected = samples(dataset, seeds=False)
    entry = dataset.cache.entry(dataset.source_files(0))
    image_file = Path(f"{entry}.image.npy")
    # a killed writer's temporary file beside the entry, and an entry cut short (a power loss)
    (entry.parent / f".{image_file.name}.123-abcd.tmp").write_bytes(image_file.read_bytes()[:100])
    image_file.write_bytes(image_file.read_bytes()[:1000])
    reads = count_file_reads(monkeypatch)
    assert_same(samples(dataset, seeds=False), expected)
    assert len(reads) == 2  # sample 0 decoded again, sample 1 from the cache
    assert np.load(image_file, mmap_mode="r").shape == (32, 64, 3)  # rewritten whole


def test_a_cached_mask_with_values_beyond_the_classes_is_decoded_again(
    cityscapes_root, tmp_path, monkeypatch
):
    dataset = cityscapes(cityscapes_root, tmp_path / "cache")
    expected = samples(dataset, seeds=False)
    mask_file = Path(f"{dataset.cache.entry(dataset.source_files(0))}.mask.npy")
    np.save(mask_file, np.full_like(np.load(mask_file), 200))  # a valid header, bad class ids
    reads = count_file_reads(monkeypatch)
    assert_same(samples(dataset, seeds=False), expected)  # not served: an IndexError in the loss
    assert len(reads) == 2  # sample 0 decoded again, and its entry rewritten
    assert np.array_equal(np.load(mask_file), expected[0][1].numpy())


def test_workers_writing_the_same_entries_at_once_leave_whole_files(cityscapes_root, tmp_path):
    dataset = cityscapes(cityscapes_root, tmp_path / "cache", train_transform(**TRAIN))
    twice = Subset(dataset, [0, 1, 0, 1, 0, 1])  # both workers decode both samples
    loader = DataLoader(twice, batch_size=1, num_workers=2)
    first = [sample for sample in loader]
    assert_same([sample for sample in loader], first)
    assert not list(dataset.cache.directory.rglob("*.tmp"))
    assert len(list(dataset.cache.directory.rglob("*.npy"))) == 2 * len(dataset)


def test_other_label_mappings_and_mask_formats_get_their_own_entries(
    ade20k_root, folder_root, tmp_path
):
    def directory(dataset):
        return dataset.cache.directory

    ade = [
        ADE20K(
            str(ade20k_root), "train", num_classes=151 - r, reduce_zero_label=r, cache_dir=tmp_path
        )
        for r in (True, False)
    ]  # 0-150 are classes without the reduction
    assert directory(ade[0]) != directory(ade[1])
    assert ade[0][0][1].tolist() != ade[1][0][1].tolist()  # each from its own entry
    assert ade[0][0][1].tolist() == ADE20K(str(ade20k_root), "train")[0][1].tolist()
    index, binary = (folder(folder_root, tmp_path, mask_format=f) for f in ("index", "binary"))
    assert directory(index) != directory(binary)
    # the same settings in another dataset object share the entries
    assert directory(folder(folder_root, tmp_path)) == directory(index)


def test_a_cache_dir_that_cannot_be_written_names_the_key(cityscapes_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"data.cache_dir=.*a_file/cache: cannot write"):
        cityscapes(cityscapes_root, blocker / "cache")


def test_the_expected_size_is_logged(cityscapes_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="seg.data.cache"):
        cityscapes(cityscapes_root, tmp_path / "cache")
    # 2 samples of 64x32: 3 bytes of image and 1 of mask per pixel, plus the .npy headers
    assert "2 samples x 0.0 MB = 0.0 GB" in caplog.text and "64x32" in caplog.text


@pytest.mark.parametrize("data", ["cityscapes", "folder", "camvid", "voc", "ade20k"])
def test_data_configs_pass_cache_dir_and_old_configs_without_it_still_build(
    data, request, tmp_path
):
    root = request.getfixturevalue(f"{data}_root")
    cfg = compose_config(f"data={data}", f"data.root={root}", f"data.cache_dir={tmp_path}")
    dataset = build(cfg.data.dataset, split="val" if data != "ade20k" else "train",
                    transform=build(cfg.data.val_transform))  # fmt: skip
    assert dataset.cache.directory.parent == tmp_path
    # a checkpoint's config from before data.cache_dir (evaluate/predict rebuild from it)
    old = OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))
    del old.data["cache_dir"], old.data.dataset["cache_dir"]
    assert build(old.data.dataset, split="val" if data != "ade20k" else "train").cache is None


def test_the_key_covers_a_label_table_by_its_values_and_refuses_unstable_settings():
    from seg.data.cache import fingerprint

    table = np.arange(256, dtype=np.uint8)
    changed = table.copy()
    changed[7] = 0
    assert fingerprint({"label_map": table}) == fingerprint({"label_map": table.copy()})
    assert fingerprint({"label_map": table}) != fingerprint({"label_map": changed})
    with pytest.raises(TypeError, match="CACHE_NEUTRAL"):
        fingerprint({"reader": object()})


def test_train_py_fills_the_cache_from_its_workers_and_evaluate_reads_it(cityscapes_root, tmp_path):
    cache = tmp_path / "cache"
    data = ("data=cityscapes", f"data.root={cityscapes_root}", f"data.cache_dir={cache}",
            "data.train_transform.crop_size=[32,64]", "data.num_workers=2")  # fmt: skip
    run_training(tmp_path / "run", *data, "model.encoder_name=resnet18", "trainer.max_iters=2")
    # 2 train and 1 val sample, an image and a mask each, and no temporary file left behind
    assert len(list(cache.rglob("*.npy"))) == 6 and not list(cache.rglob("*.tmp"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    metrics = run_evaluation(
        f"checkpoint={checkpoint}", "bootstrap=0", f"report_dir={tmp_path / 'r'}"
    )
    assert 0 <= metrics["mIoU"] <= 1
