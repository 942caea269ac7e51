"""Time the pictures of one validation, before and after issue 11, side by side in one run.

    python scripts/profile_pictures.py [--images 4] [--height 1024] [--width 2048] [--classes 19]

Builds what ``seg.engine.evaluation.figures`` builds for synthetic full-resolution images
(confusion and IoU figures, the worst-images gallery and, for training's validation, one
comparison per example), then encodes every picture as ``seg.visualize.save_png`` does and as
TensorBoard's ``add_image`` does (and as ``seg.visualize.add_png`` would, in its place). "before" is the code as it was (full-resolution panels, PIL's
PNG encoder at its default level), copied below; "after" is the current ``seg.visualize``.
Each time is the best of ``--repeats`` runs (the machine may be shared).
"""

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from benchmark import cpu_name  # scripts/ is on the path when a script runs
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from seg import visualize
from seg.visualize import colorize, confusion_figure, iou_figure, overlay


# --- before issue 11 (seg/visualize.py at da3dbf4) ---
def comparison_before(image, mask, prediction, palette) -> torch.Tensor:
    # (it also un-normalized a float image then: images are uint8 now, on both sides here)
    rgb = image
    ground_truth = overlay(rgb, colorize(mask, palette))
    predicted = overlay(rgb, colorize(prediction, palette))
    return torch.cat([rgb, ground_truth, predicted], dim=2)


def gallery_before(rows) -> np.ndarray:
    width = max(row.shape[2] for row in rows)
    padded = [torch.nn.functional.pad(row, (0, width - row.shape[2])) for row in rows]
    return torch.cat(padded, dim=1).permute(1, 2, 0).numpy()


def save_png_before(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# --- synthetic data ---
def synthetic(num_images: int, height: int, width: int, num_classes: int, seed: int = 0):
    """(image, mask, prediction) triples like a street scene's: a smooth picture with sensor
    noise, masks of blocky regions (some ignored), predictions wrong in about a tenth of them."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width)
    examples = []
    for _ in range(num_images):
        phase = torch.rand(3, 1, 1, generator=generator) * 6.28
        rgb = 0.5 + 0.3 * torch.sin(8 * x + 5 * y + phase) * torch.cos(3 * y - 2 * x + phase)
        rgb = rgb + 0.02 * torch.randn(3, height, width, generator=generator)  # sensor noise
        image = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)  # as the datasets give it
        grid = (height // 32, width // 32)
        coarse = torch.randint(0, num_classes, grid, generator=generator)
        coarse[torch.rand(grid, generator=generator) < 0.05] = 255  # ignore regions
        mask = coarse.repeat_interleave(32, 0).repeat_interleave(32, 1)
        wrong = torch.rand(grid, generator=generator) < 0.1
        guess = torch.where(wrong, torch.randint(0, num_classes, grid, generator=generator), coarse)
        prediction = guess.clamp_max(num_classes - 1).repeat_interleave(32, 0)
        prediction = prediction.repeat_interleave(32, 1)
        examples.append((image, mask, prediction))
    return examples


def build(examples, num_classes, with_examples: bool, comparison, gallery) -> dict:
    """What ``figures()`` returns: the ``worst`` gallery of all images and, for training's
    validation, ``example_<i>`` pictures of the same images."""
    palette = [[(37 * c) % 256, (91 * c) % 256, (173 * c) % 256] for c in range(num_classes)]
    names = [f"class{c}" for c in range(num_classes)]
    confusion = torch.randint(0, 10_000, (num_classes, num_classes))
    iou = torch.rand(num_classes).tolist()

    def picture(example):
        return comparison(*example, palette)

    pictures = {
        "confusion": confusion_figure(confusion, names),
        "iou": iou_figure(iou, names),
        "worst": gallery([picture(example) for example in examples]),
    }
    if with_examples:
        for i, example in enumerate(examples):
            pictures[f"example_{i}"] = picture(example).permute(1, 2, 0).numpy()
    return pictures


def best_of(repeats: int, work: Callable[[], object]) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return min(times), result


def profile(examples, num_classes, with_examples, repeats, folder: Path) -> None:
    ways = {
        "before": (comparison_before, gallery_before, save_png_before),
        "after": (visualize.comparison, visualize.gallery, visualize.save_png),
    }
    rows: dict[str, dict[str, float]] = {}
    sizes: dict[str, str] = {}
    for way, (comparison, gallery, save_png) in ways.items():
        seconds, pictures = best_of(
            repeats,
            lambda c=comparison, g=gallery: build(examples, num_classes, with_examples, c, g),
        )
        rows.setdefault("build pictures", {})[way] = seconds
        out = folder / way

        def save(pictures=pictures, save_png=save_png, out=out):
            for name, array in pictures.items():
                if not (with_examples and name.startswith("example")):  # as the recorder does
                    save_png(array, out / f"{name}.png")

        rows.setdefault("save_png (figures/)", {})[way] = best_of(repeats, save)[0]
        megabytes = sum(f.stat().st_size for f in out.glob("*.png")) / 1e6
        sizes[way] = f"{megabytes:.1f} MB"

        with SummaryWriter(folder / f"tb_{way}") as writer:

            def add(pictures=pictures, writer=writer):
                for name, array in pictures.items():
                    writer.add_image(f"val/{name}", array, 0, dataformats="HWC")

            rows.setdefault("TensorBoard add_image", {})[way] = best_of(repeats, add)[0]
        if way == "after":  # the opt-in visualize.add_png in place of add_image
            with SummaryWriter(folder / "tb_add_png") as writer:

                def add_png(pictures=pictures, writer=writer):
                    for name, array in pictures.items():
                        visualize.add_png(writer, f"val/{name}", array, 0)

                opt_in = best_of(repeats, add_png)[0]
        worst = pictures["worst"].shape
        sizes[f"{way} worst"] = f"{worst[0]}x{worst[1]}"
    rows["total"] = {way: sum(row[way] for row in list(rows.values())) for way in ways}
    print(f"{'':24s}{'before':>10s}{'after':>10s}")
    for stage, row in rows.items():
        print(f"{stage:24s}{row['before']:9.2f}s{row['after']:9.2f}s")
    with_add_png = rows["total"]["after"] - rows["TensorBoard add_image"]["after"] + opt_in
    print(f"{'TensorBoard add_png':24s}{'':10s}{opt_in:9.2f}s  (opt-in: visualize.add_png)")
    print(f"{'total with add_png':24s}{'':10s}{with_add_png:9.2f}s")
    print(f"{'PNG files written':24s}{sizes['before']:>10s}{sizes['after']:>10s}")
    print(f"{'worst gallery (HxW)':24s}{sizes['before worst']:>10s}{sizes['after worst']:>10s}")


def encoders(repeats: int, examples) -> None:
    """PIL against OpenCV at several zlib levels, on one full-resolution comparison panel and
    one gallery."""
    import cv2

    palette = [[(37 * c) % 256, (91 * c) % 256, (173 * c) % 256] for c in range(19)]
    photo = examples[0][0]
    arrays = {
        "photo": photo.permute(1, 2, 0).numpy(),
        "gallery (after)": visualize.gallery(
            [visualize.comparison(*example, palette) for example in examples]
        ),
    }
    for label, array in arrays.items():
        print(f"\n{label} {array.shape[0]}x{array.shape[1]}:")

        def pil(level, array=array):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG", compress_level=level)
            return buffer.getvalue()

        def opencv(level, array=array):
            bgr = np.ascontiguousarray(array[..., ::-1])
            return cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, level])[1].tobytes()

        for name, encode, level in [
            ("PIL level 6 (its default)", pil, 6),
            ("PIL level 1", pil, 1),
            ("OpenCV level 1", opencv, 1),
            ("OpenCV level 3", opencv, 3),
            ("OpenCV level 6", opencv, 6),
        ]:
            seconds, data = best_of(repeats, lambda e=encode, v=level: e(v))
            print(f"  {name:28s}{seconds:7.3f}s {len(data) / 1e6:6.2f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-encoders", action="store_true", help="skip the encoder table")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}, torch threads: {torch.get_num_threads()}")
    examples = synthetic(args.images, args.height, args.width, args.classes)
    with tempfile.TemporaryDirectory() as folder:
        print(
            f"\nevaluate.py: {args.images} images of {args.height}x{args.width}, "
            f"{args.classes} classes (worst gallery of all images)"
        )
        profile(examples, args.classes, False, args.repeats, Path(folder) / "evaluate")
        print(f"\ntraining validation: the same plus {args.images} example pictures")
        profile(examples, args.classes, True, args.repeats, Path(folder) / "train")
    if not args.no_encoders:
        encoders(args.repeats, examples)


if __name__ == "__main__":
    main()
