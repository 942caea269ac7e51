"""Datasets read what is on disk correctly and refuse what is wrong, naming the file."""

import numpy as np
import pytest
import torch
from PIL import Image

from seg.data.base import DataError, mask_dtype
from seg.data.cityscapes import Cityscapes
from seg.data.folder import FolderDataset
from seg.data.sampler import InfiniteSampler
from seg.data.synthetic import SyntheticScenes
from seg.data.transforms import train_transform
from tests.conftest import CITYSCAPES_IDS, write_png


def test_cityscapes_maps_label_ids_to_train_ids(cityscapes_root):
    dataset = Cityscapes(str(cityscapes_root), "train")
    assert len(dataset) == 2
    _, mask = dataset[0]
    raw = np.asarray(Image.open(dataset.samples[0][1]))
    for label_id, train_id in CITYSCAPES_IDS.items():
        assert (mask.numpy()[raw == label_id] == train_id).all()
    assert set(np.unique(mask.numpy())) == set(CITYSCAPES_IDS.values())


def test_cityscapes_missing_root_names_the_path_and_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"cityscapes-dataset.com") as error:
        Cityscapes(str(tmp_path / "nowhere"), "train")
    assert str(tmp_path / "nowhere" / "leftImg8bit" / "train") in str(error.value)


def test_cityscapes_image_without_labels(cityscapes_root):
    next((cityscapes_root / "gtFine" / "val").rglob("*_labelIds.png")).unlink()
    with pytest.raises(DataError, match=r"no label file"):
        Cityscapes(str(cityscapes_root), "val")


def test_folder_pairs_by_stem_and_reads_palette_pngs_as_indices(folder_root):
    mask = np.zeros((40, 48), np.uint8)
    mask[:, 20:] = 1
    palette = [0, 0, 0, 255, 0, 0] + [0] * 762  # index 1 is drawn red
    write_png(folder_root / "masks" / "train" / "img0.png", mask, palette=palette)
    dataset = FolderDataset(str(folder_root), "train", num_classes=2)
    assert [p.stem for p, _ in dataset.samples] == ["img0", "img1", "img2"]
    _, loaded = dataset[0]
    assert torch.equal(loaded, torch.from_numpy(mask))


def test_folder_unmatched_files_are_named(folder_root):
    (folder_root / "masks" / "train" / "img1.png").unlink()
    with pytest.raises(DataError, match=r"img1.png"):
        FolderDataset(str(folder_root), "train", num_classes=2)


def test_folder_missing_split_shows_the_expected_tree(folder_root):
    with pytest.raises(DataError, match=r"<root>/masks/<split>"):
        FolderDataset(str(folder_root), "test", num_classes=2)


def test_label_values_outside_the_classes_are_refused_with_the_file(folder_root):
    bad = np.full((40, 48), 7, np.uint8)
    write_png(folder_root / "masks" / "val" / "img1.png", bad)
    dataset = FolderDataset(str(folder_root), "val", num_classes=2)
    with pytest.raises(DataError, match=r"img1.png: label values \[7\]"):
        dataset[1]


def test_rgb_mask_is_refused(folder_root):
    write_png(folder_root / "masks" / "val" / "img0.png", np.zeros((40, 48, 3), np.uint8))
    with pytest.raises(DataError, match=r"single-channel index PNG"):
        FolderDataset(str(folder_root), "val", num_classes=2)[0]


def test_image_and_mask_size_mismatch(folder_root):
    write_png(folder_root / "masks" / "val" / "img0.png", np.zeros((20, 48), np.uint8))
    with pytest.raises(DataError, match=r"img0.png: image is 48x40 but mask is 48x20"):
        FolderDataset(str(folder_root), "val", num_classes=2)[0]


def test_unreadable_image_is_named(folder_root):
    (folder_root / "images" / "val" / "img0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"img0.png: cannot decode image"):
        FolderDataset(str(folder_root), "val", num_classes=2)[0]


def test_synthetic_is_deterministic_per_seed_split_and_index():
    a, b = SyntheticScenes("train", image_size=64), SyntheticScenes("train", image_size=64)
    for x, y in zip(a.load(3), b.load(3), strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(a.load(3)[0], a.load(4)[0])
    assert not np.array_equal(a.load(3)[0], SyntheticScenes("val", image_size=64).load(3)[0])
    assert not np.array_equal(
        a.load(3)[0], SyntheticScenes("train", image_size=64, seed=1).load(3)[0]
    )


def test_synthetic_has_every_class_and_colour_does_not_give_the_class_away():
    dataset = SyntheticScenes("train", image_size=64)
    images, masks = zip(*(dataset.load(i) for i in range(40)), strict=True)
    pixels, labels = (
        np.concatenate([i.reshape(-1, 3) for i in images]),
        np.concatenate(masks).ravel(),
    )
    assert set(np.unique(labels)) == set(range(6))
    for label in range(6):
        # every class spans most of the colour range in every channel
        spread = np.percentile(pixels[labels == label], 95, axis=0) - np.percentile(
            pixels[labels == label], 5, axis=0
        )
        assert (spread > 120).all(), (label, spread)


def test_synthetic_rejects_unknown_splits_and_class_counts():
    with pytest.raises(ValueError, match=r"num_samples"):
        SyntheticScenes("holdout")
    with pytest.raises(ValueError, match=r"2 to 6 classes"):
        SyntheticScenes("train", num_classes=9)


def test_sampler_order_is_a_function_of_seed_and_position():
    sampler = InfiniteSampler(5, seed=3)
    stream = [next(it) for it in [iter(sampler)] for _ in range(17)]
    assert sorted(i for i, _, _ in stream[:5]) == list(range(5))  # each epoch a permutation
    assert sorted(i for i, _, _ in stream[5:10]) == list(range(5))
    assert [p for _, _, p in stream] == list(range(17))
    resumed = iter(InfiniteSampler(5, seed=3, start=7))
    assert [next(resumed) for _ in range(10)] == stream[7:]
    other = iter(InfiniteSampler(5, seed=4))
    assert [next(other)[0] for _ in range(10)] != [i for i, _, _ in stream[:10]]


def test_truncated_png_and_jpeg_are_named(folder_root):
    import cv2

    png = folder_root / "images" / "val" / "img0.png"
    png.write_bytes(png.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"img0.png: image file is truncated"):
        FolderDataset(str(folder_root), "val", num_classes=2)[0]
    jpeg = folder_root / "images" / "val" / "img1.jpg"
    cv2.imwrite(str(jpeg), np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    (folder_root / "images" / "val" / "img1.png").unlink()
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"img1.jpg: image file is truncated"):
        FolderDataset(str(folder_root), "val", num_classes=2)[1]


def test_a_bad_file_is_named_also_from_a_dataloader_worker(folder_root):
    (folder_root / "images" / "train" / "img2.png").write_bytes(b"\x89PNG garbage IEND....")
    dataset = FolderDataset(str(folder_root), "train", num_classes=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1)
    with pytest.raises(DataError) as error:
        next(iter(loader))
    # the one line it is without workers, not torch's "Caught DataError in DataLoader worker
    # process 0" and the worker's traceback
    with pytest.raises(DataError) as direct:
        dataset[2]
    assert str(error.value) == str(direct.value)
    assert str(error.value).startswith(f"{folder_root}/images/train/img2.png: cannot decode")


def test_skip_bad_samples_replaces_and_reports_up_to_the_fraction(folder_root, caplog):
    (folder_root / "images" / "train" / "img1.png").write_bytes(b"not an image")
    dataset = FolderDataset(str(folder_root), "train", num_classes=2, skip_bad_samples=0.5)
    images = [dataset[i][0] for i in range(3)]
    assert torch.equal(images[1], images[2])  # img1 was replaced by the next good sample
    dataset[1]  # met again (a second epoch): warned once, counted twice
    assert caplog.text.count("Skipping a bad sample") == 1
    caplog.clear()
    dataset.report_skipped()
    # the bad file once, with its error: the image, not the sample's mask
    image = folder_root / "images" / "train" / "img1.png"
    assert caplog.messages == [
        "Skipped 2 bad samples of 4 read (data.skip_bad_samples):\n"
        f"  {image}: cannot decode image (not an image file, or corrupted)"
    ]
    strict = FolderDataset(str(folder_root), "train", num_classes=2, skip_bad_samples=0.1)
    strict[0]
    with pytest.raises(DataError, match=r"more than data.skip_bad_samples=0.1"):
        strict[1]


def test_binary_0_255_masks_are_caught_and_readable_with_mask_format_binary(folder_root):
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 10:30] = 255
    write_png(folder_root / "masks" / "val" / "img0.png", mask)
    with pytest.raises(DataError, match=r"binary mask stored as 0/255.*mask_format=binary"):
        FolderDataset(str(folder_root), "val", num_classes=2)[0]
    _, loaded = FolderDataset(str(folder_root), "val", num_classes=2, mask_format="binary")[0]
    assert torch.equal(loaded, torch.from_numpy(mask // 255).long())


def test_missing_root_and_empty_split(folder_root, tmp_path):
    with pytest.raises(DataError, match=r"nowhere/images/train: directory not found"):
        FolderDataset(str(tmp_path / "nowhere"), "train", num_classes=2)
    (folder_root / "images" / "empty").mkdir()
    (folder_root / "masks" / "empty").mkdir()
    with pytest.raises(DataError, match="split 'empty' has no images"):
        FolderDataset(str(folder_root), "empty", num_classes=2)


def test_training_batches_are_always_full(folder_root):
    from seg.data.loader import train_loader

    dataset = FolderDataset(str(folder_root), "train", num_classes=2)  # 3 samples, batch 2
    batches = iter(train_loader(dataset, batch_size=2, num_workers=0, seed=0))
    assert all(next(batches)[0].shape[0] == 2 for _ in range(7))  # never a BatchNorm batch of 1


def test_workers_start_after_the_parent_used_opencv_threads(folder_root):
    import cv2

    # The parent decodes and resizes (OpenCV starts its thread pool), then workers fork: an
    # OpenCV call that reconfigures threads inside a forked worker would deadlock here.
    cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000))
    dataset = FolderDataset(str(folder_root), "train", num_classes=2)
    dataset.load(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, timeout=60)
    assert len(list(loader)) == 3


@pytest.mark.parametrize("transform", [None, train_transform((24, 40), 255, (0.5, 1.5))])
def test_samples_and_batches_travel_as_uint8(transform):
    """The contract of issue 11: (3, H, W) uint8 images, not normalized, and uint8 masks; the
    consumers normalize and widen on the device."""
    dataset = SyntheticScenes("train", image_size=32, num_samples={"train": 4}, transform=transform)
    image, mask = dataset[(1, 0, 5)]  # an InfiniteSampler key: (index, seed, position)
    size = (32, 32) if transform is None else (24, 40)
    assert image.dtype == torch.uint8 and image.shape == (3, *size)
    assert mask.dtype == torch.uint8 and mask.shape == size
    if transform is None:  # the decoded pixels, untouched
        raw_image, raw_mask = dataset.load(1)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), raw_image)
        assert np.array_equal(mask.numpy(), raw_mask)
    images, masks = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, *size)
    assert masks.dtype == torch.uint8 and masks.shape == (2, *size)


@pytest.mark.parametrize(
    ("num_classes", "ignore_index", "dtype"),
    [(19, 255, np.uint8), (256, 255, np.uint8), (257, 255, np.int16), (19, -1, np.int16),
     (19, 256, np.int16), (32768, -32768, np.int16)],
)  # fmt: skip
def test_masks_are_uint8_unless_classes_or_ignore_index_pass_255(num_classes, ignore_index, dtype):
    assert mask_dtype(num_classes, ignore_index) is dtype


@pytest.mark.parametrize(("num_classes", "ignore_index"), [(19, 40000), (19, -40000), (40000, 255)])
def test_masks_beyond_int16_are_refused_naming_the_values(num_classes, ignore_index):
    with pytest.raises(
        ValueError, match=rf"num_classes={num_classes}, ignore_index={ignore_index}"
    ):
        mask_dtype(num_classes, ignore_index)


@pytest.mark.parametrize("transform", [None, train_transform((32, 32), -1, (0.5, 2.0))])
def test_an_ignore_index_outside_0_255_gives_int16_masks(cityscapes_root, transform):
    dataset = Cityscapes(str(cityscapes_root), "train", ignore_index=-1, transform=transform)
    values = set()
    for seed in range(8):
        _, mask = dataset[(0, 0, seed)]
        assert mask.dtype == torch.int16
        values |= set(mask.unique().tolist())
    expected = {-1 if train_id == 255 else train_id for train_id in CITYSCAPES_IDS.values()}
    assert -1 in values and values <= expected
