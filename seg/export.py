"""``python scripts/export.py checkpoint=<path> format=onnx|torchscript``: a deployable model file
plus the JSON a deployer needs, verified against PyTorch before it is called done."""

import json
import logging
import sys
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from seg import restore
from seg.checkpoint import load_checkpoint
from seg.config import report_user_errors, run_command
from seg.data import loader
from seg.engine import dist
from seg.engine.evaluation import evaluate

log = logging.getLogger(__name__)

# Default output: <checkpoint stem> + this, never the checkpoint's own name (best.pt would be
# replaced by its TorchScript export).
FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
# protobuf caps a whole ONNX file at 2 GiB: weights up to this size are embedded in the one
# file; larger ones go to a <output>.data file beside it. 64 MiB are left for the graph.
ONNX_EMBED_LIMIT = 2**31 - 2**26
# export.yaml's own keys: everything else on the command line edits the checkpoint's config.
OWN_KEYS = restore.own_keys("export")
EXIT_MISMATCH = 1
# the instance export: its outputs, the ONNX opset (the TorchScript-based exporter needs >= 11
# for Mask R-CNN) and the mask IoU the verification requires
DETECTION_KEYS = ("boxes", "labels", "scores", "masks")
ONNX_OPSET = 17
MASK_IOU = 0.99


def main() -> None:
    """``python scripts/export.py`` and ``seg-export``."""
    run_command("export", hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    report = report_user_errors(lambda: run(cfg, overrides), cfg)
    if not report["verification"]["passed"]:
        sys.exit(EXIT_MISMATCH)


class ExportedModel(nn.Module):
    """An exported file behind the PyTorch model interface (CPU), for verification."""

    def __init__(self, path: Path, format: str):
        super().__init__()
        self.format = format
        if format == "onnx":
            onnxruntime = import_onnxruntime()
            self.session = onnxruntime.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]
            )
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # see export_model
                self.module = torch.jit.load(str(path), map_location="cpu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.format == "onnx":
            (logits,) = self.session.run(["logits"], {"images": images.float().cpu().numpy()})
            return torch.from_numpy(logits)
        return self.module(images.float().cpu())


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "verifying an ONNX export needs onnxruntime: pip install -e '.[export]'"
        ) from error
    return onnxruntime


def default_output(checkpoint: Path, format: str) -> Path:
    """``<checkpoint dir>/<stem>.onnx`` or ``<stem>.torchscript.pt``: beside the checkpoint,
    never the checkpoint itself."""
    return checkpoint.with_name(checkpoint.stem + FORMATS[format])


def check_output(output: Path, checkpoint: Path, format: str) -> None:
    """Refuse an ``output`` that would replace the checkpoint being exported, or another
    seg checkpoint (a TorchScript export is a .pt too), or the export's own .json."""
    if output.suffix == ".json":
        raise ValueError(f"output={output}: .json is the name of the export's description")
    if output.resolve() == checkpoint.resolve():
        raise ValueError(
            f"output={output} is the checkpoint being exported, which the export would replace; "
            f"leave output out (default: {default_output(checkpoint, format)}) or choose another"
        )
    if output.is_file() and is_checkpoint(output):
        raise ValueError(
            f"output={output} is a seg checkpoint, which the export would replace; leave output "
            f"out (default: {default_output(checkpoint, format)}) or choose another"
        )


def is_checkpoint(path: Path) -> bool:
    """True for a seg checkpoint; False for any other file, an earlier export included."""
    try:
        with warnings.catch_warnings():
            # torch.load's note that a TorchScript archive is not for it: we only ask.
            warnings.simplefilter("ignore", UserWarning)
            load_checkpoint(path)
    except ValueError:
        return False
    return True


def export_model(
    model: nn.Module, sample: torch.Tensor, path: Path, format: str, dynamic: bool
) -> list[Path]:
    """Write ``model`` (fp32, eval mode) to ``path``, traced on ``sample``; returns the files
    written: ``path``, and for ONNX weights over ``ONNX_EMBED_LIMIT`` also ``<path>.data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
        except ImportError as error:
            raise ImportError(
                "ONNX export needs onnx and onnxscript: pip install -e '.[export]'"
            ) from error
        dims = torch.export.Dim
        shapes = ({0: dims("batch"), 2: dims("height"), 3: dims("width")},) if dynamic else None
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        # One self-contained file where protobuf allows it: easier to copy and deploy.
        external = weight_bytes > ONNX_EMBED_LIMIT
        weights = path.with_name(path.name + ".data")  # where torch.onnx puts external weights
        torch.onnx.export(
            model, (sample,), str(path), dynamo=True, input_names=["images"],
            output_names=["logits"], dynamic_shapes=shapes, external_data=external,
            verbose=False,  # its progress lines ("[torch.onnx] Run decompositions...")
        )  # fmt: skip
        if external:
            return [path, weights]
        if weights.is_file():  # an earlier export's weights: the new file no longer reads them
            log.info("Removing %s, left by an earlier export of %s", weights, path.name)
            weights.unlink()
        return [path]
    with warnings.catch_warnings():
        # The tracer warns about shape checks; the verification below is the real test.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # TorchScript is deprecated upstream but still what many C++/mobile runtimes load.
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(model, sample).save(str(path))
    return [path]


def verification_inputs(sample: torch.Tensor, dynamic: bool, stride: int) -> list[torch.Tensor]:
    """The traced size, and with ``dynamic`` other batch sizes and sizes off the stride."""
    generator = torch.Generator().manual_seed(0)
    shapes = [tuple(sample.shape)]
    if dynamic:
        _, channels, height, width = sample.shape
        shapes += [
            (1, channels, height + stride // 2 + 3, width - stride // 2 + 1),
            (3, channels, height, width),
        ]
    return [torch.randn(*shape, generator=generator) for shape in shapes]


def run(cfg: DictConfig, overrides: list[str]) -> dict:
    if dist.launched_by_torchrun():  # every rank would write the same files
        raise ValueError(
            "export runs in one process (it writes one file): python scripts/export.py ..., "
            "not under torchrun"
        )
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}; options: {list(FORMATS)}")
    checkpoint_path = Path(cfg.checkpoint)
    checkpoint, train_cfg = restore.load(cfg, overrides, OWN_KEYS)
    task = restore.task_from(train_cfg)
    if task.name not in EXPORTERS:
        raise ValueError(
            f"export.py does not yet export models of the {task.name} task ({checkpoint_path}); "
            "evaluate.py scores them"
        )
    output = Path(cfg.output) if cfg.output else default_output(checkpoint_path, cfg.format)
    check_output(output, checkpoint_path, cfg.format)
    # Exported graphs are fp32 and CPU-traced; runtimes pick their own precision and device.
    model = restore.model_from(checkpoint, train_cfg)
    height, width = cfg.sample_size or train_cfg.data.train_transform.crop_size
    log.info("Exporting %s to %s (%s)", checkpoint_path, output, cfg.format)
    files, described, verification = EXPORTERS[task.name](
        cfg, overrides, model, train_cfg, output, (height, width)
    )
    data = train_cfg.data
    sidecar = output.with_suffix(".json")
    report = {
        "format": cfg.format,
        "model": output.name,
        # every file of the export, named relative to this JSON's folder: copy them together
        "files": [file.name for file in [*files, sidecar]],
        "checkpoint": str(checkpoint_path),
        "iteration": checkpoint["iteration"],
        "class_names": list(checkpoint["class_names"]),
        "palette": checkpoint["palette"],
        "ignore_index": data.ignore_index,
        **described,  # input, output (and the task's own keys)
        "verification": verification,
    }
    sidecar.write_text(json.dumps(report, indent=2) + "\n")
    written = ", ".join(str(file) for file in [*files, sidecar])
    log.info("Verification %s; wrote %s", verification["summary"], written)
    return report


def normalized_input(data: DictConfig, name: str, layout: str, size: str) -> dict:
    """The JSON's ``input``: what a deployer feeds the exported model."""
    pixels = OmegaConf.to_container(data, resolve=True)  # plain values for the JSON
    return {
        "name": name,
        "layout": layout,
        "dtype": "float32",
        "channels": OmegaConf.select(data, "in_channels", default=3),  # the model's input bands
        # 1-based bands of the source files, in input order (null: all, as stored; RGB photos)
        "bands": pixels.get("bands"),
        "normalization": "(pixel / scale - mean) / std, per channel; nodata pixels: 0",
        "scale": pixels.get("scale", 255),  # 255: RGB photos' (before data.scale existed)
        "nodata": pixels.get("nodata"),
        "mean": list(data.mean),
        "std": list(data.std),
        "size": size,
    }


def export_semantic(
    cfg: DictConfig, overrides: list[str], model: nn.Module, train_cfg: DictConfig,
    output: Path, size: tuple[int, int],
) -> tuple[list[Path], dict, dict]:  # fmt: skip
    """A segmenter's logits, traced (``dynamic``: any batch and size) and verified on random
    inputs (and ``verify_split``'s mIoU); returns the files, the input and output described
    and the verification."""
    channels = OmegaConf.select(train_cfg, "data.in_channels", default=3)  # the model's input bands
    sample = torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(0))
    log.info("Tracing on %s (dynamic=%s)", list(sample.shape), cfg.dynamic)
    with torch.no_grad():
        files = export_model(model, sample, output, cfg.format, cfg.dynamic)
    exported = ExportedModel(output, cfg.format)

    differences = []
    with torch.no_grad():
        for images in verification_inputs(sample, cfg.dynamic, model.stride):
            difference = (exported(images) - model(images)).abs().max().item()
            differences.append({"shape": list(images.shape), "max_abs_diff": difference})
            log.info("Logits on %s: max abs difference %.3g", list(images.shape), difference)
    max_difference = max(d["max_abs_diff"] for d in differences)
    verification = {
        "inputs": differences,
        "max_abs_diff": max_difference,
        "tolerance": cfg.tolerance,
        "passed": max_difference <= cfg.tolerance,
    }
    if cfg.verify_split:
        limit = restore.sample_limit(cfg, overrides)[0]
        verification |= compare_miou(model, exported, train_cfg, cfg.verify_split, limit)
        verification["passed"] &= (
            abs(verification["mIoU_exported"] - verification["mIoU_pytorch"]) < 1e-3
        )
    verification["summary"] = (f"{'passed' if verification['passed'] else 'FAILED'} (max abs "
                               f"diff {max_difference:.3g}, tolerance {cfg.tolerance:g})")  # fmt: skip
    described = {
        "input": normalized_input(
            train_cfg.data, "images", "NCHW",
            "any batch, height and width" if cfg.dynamic else f"exactly {list(sample.shape)}",
        ) | {"note": f"inputs are padded inside the model to a multiple of {model.stride}"},
        "output": {
            "name": "logits",
            "layout": "NCHW",
            "dtype": "float32",
            "meaning": "class scores at the input's height and width; argmax over C = class index",
        },
    }  # fmt: skip
    return files, described, verification


def export_instance(
    cfg: DictConfig, overrides: list[str], model: nn.Module, train_cfg: DictConfig,
    output: Path, size: tuple[int, int],
) -> tuple[list[Path], dict, dict]:  # fmt: skip
    """Mask R-CNN at one fixed input size: ONNX with the TorchScript-based exporter
    (``dynamo=False``; torch.export fails on R-CNNs, pytorch/vision#9321) or
    ``torch.jit.script`` (tracing would freeze its data-dependent control flow). Verified on
    random images: per image the same detections (count; boxes and scores within
    ``tolerance`` after sorting; mask IoU above ``MASK_IOU``)."""
    # The heads' float32 hooks matter under autocast only, and neither exporter takes them.
    for module in model.modules():
        module._forward_hooks.clear()
    channels = OmegaConf.select(train_cfg, "data.in_channels", default=3)  # the model's input bands
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(channels, *size, generator=generator) for _ in range(3)]
    log.info("Exporting at the fixed size %s (bands, height, width)", list(images[0].shape))
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' tracer and deprecation notes
        if cfg.format == "onnx":
            torch.onnx.export(model, ([images[0]],), str(output), dynamo=False,
                              opset_version=ONNX_OPSET, input_names=["image"],
                              output_names=list(DETECTION_KEYS))  # fmt: skip
        else:
            torch.jit.script(model).save(str(output))
    exported = ExportedDetector(output, cfg.format)
    checks = []
    with torch.no_grad():
        for image in images:
            checks.append(compare_detections(model([image])[0], exported(image), cfg.tolerance))
    passed = all(check["passed"] for check in checks)
    counts = [check["detections"] for check in checks]
    summary = (f"{'passed' if passed else 'FAILED'}: {len(checks)} images, the same detections "
               f"({counts} each) within {cfg.tolerance:g}, mask IoU above {MASK_IOU}"
               if passed else
               f"FAILED: {'; '.join(check['why'] for check in checks if not check['passed'])}")  # fmt: skip
    verification = {"images": checks, "tolerance": cfg.tolerance, "mask_iou": MASK_IOU,
                    "passed": passed, "summary": summary}  # fmt: skip
    fixed = [channels, *size]
    described = {
        "input": normalized_input(train_cfg.data, "image", "CHW (one image)", f"exactly {fixed}"),
        "output": {
            "boxes": "(N, 4) float32 [x0, y0, x1, y1] in pixels, exclusive maxima",
            "labels": "(N,) int64 class index (1 to num_classes - 1; 0 is the background)",
            "scores": "(N,) float32, highest first",
            "masks": "(N, 1, height, width) float32 probabilities; the mask: above mask_threshold",
            "torchscript": "module([image]) returns (losses, [detections]): use [1][0]",
        },
        "mask_threshold": train_cfg.task.mask_threshold,
        "score_threshold": train_cfg.model.score_threshold,
        "detections_per_image": train_cfg.model.detections_per_image,
    }
    if "category_ids" in train_cfg.data:
        described["category_ids"] = list(train_cfg.data.category_ids)  # class -> dataset id
    return [output], described, verification


class ExportedDetector:
    """An exported Mask R-CNN file, for verification: one (C, H, W) image -> its detections."""

    def __init__(self, path: Path, format: str):
        self.format = format
        if format == "onnx":
            onnxruntime = import_onnxruntime()
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # its notes on shapes that vary with the detections
            self.session = onnxruntime.InferenceSession(str(path), options,
                                                        providers=["CPUExecutionProvider"])  # fmt: skip
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # see export_model
                self.module = torch.jit.load(str(path), map_location="cpu")

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.format == "onnx":
            outputs = self.session.run(list(DETECTION_KEYS), {"image": image.numpy()})
            return {key: torch.from_numpy(value) for key, value in zip(DETECTION_KEYS, outputs,
                                                                        strict=True)}  # fmt: skip
        with warnings.catch_warnings():
            # its note that scripted R-CNNs return (losses, detections): read as such here
            warnings.filterwarnings("ignore", "RCNN always returns", UserWarning)
            return self.module([image])[1][0]


def compare_detections(ours: dict, theirs: dict, tolerance: float) -> dict:
    """One image's detections through PyTorch and the export: equal in count, and each of
    ours (highest score first) paired with the closest unpaired exported one of its label
    whose score is within ``tolerance`` (equal scores may come in either order): the pair's
    boxes within ``tolerance``, their masks' IoU (at 0.5) above ``MASK_IOU``."""
    count, exported = len(ours["scores"]), len(theirs["scores"])
    check = {"detections": count, "exported_detections": exported}
    if exported != count:
        return check | {"passed": False, "why": f"{count} detections, exported {exported}"}
    box = score = 0.0
    iou = 1.0
    unpaired = torch.ones(count, dtype=torch.bool)
    for i in ours["scores"].argsort(descending=True, stable=True).tolist():
        candidates = unpaired & (theirs["labels"] == ours["labels"][i]) & (
            (theirs["scores"] - ours["scores"][i]).abs() <= tolerance)  # fmt: skip
        if not candidates.any():
            return check | {"passed": False,
                            "why": f"no exported detection of label {int(ours['labels'][i])} "
                                   f"scored {float(ours['scores'][i]):.4f}"}  # fmt: skip
        distance = (theirs["boxes"] - ours["boxes"][i]).abs().amax(1).where(candidates, torch.inf)
        j = int(distance.argmin())
        unpaired[j] = False
        box = max(box, float(distance[j]))
        score = max(score, float((theirs["scores"][j] - ours["scores"][i]).abs()))
        a, b = ours["masks"][i, 0] > 0.5, theirs["masks"][j, 0] > 0.5
        union = int((a | b).sum())
        iou = min(iou, int((a & b).sum()) / union if union else 1.0)
    passed = box <= tolerance and iou > MASK_IOU
    why = f"boxes {box:.3g}, scores {score:.3g}, mask IoU {iou:.4f}"
    return check | {"max_box_diff": box, "max_score_diff": score, "min_mask_iou": iou,
                    "passed": passed, "why": why}  # fmt: skip


def compare_miou(
    model: nn.Module,
    exported: nn.Module,
    train_cfg: DictConfig,
    split: str,
    max_samples: int | None,
) -> dict:
    """``split``'s mIoU through PyTorch (fp32, CPU) and through the exported file, on the same
    data: its first ``max_samples`` images (None: all)."""
    data = train_cfg.data
    task = restore.task_from(train_cfg)
    dataset = restore.split_dataset(train_cfg, split)
    data_loader = loader.val_loader(dataset, data.val_batch_size, data.num_workers, max_samples,
                                    collate_fn=task.collate)  # fmt: skip
    if len(data_loader.dataset) < len(dataset):
        log.warning(
            "Comparing on the first %d of the %d images of split '%s' (data.max_val_samples)",
            len(data_loader.dataset), len(dataset), split,
        )  # fmt: skip
    results = {}
    cpu = torch.device("cpu")
    for name, candidate in (("pytorch", model), ("exported", exported)):
        predict = task.predictor(candidate, cpu, "fp32", channels_last=False)
        result = evaluate(candidate, predict, data_loader, task.evaluator(cpu), cpu)
        results[f"mIoU_{name}"] = result.metrics["mIoU"]
    log.info(
        "%s mIoU in fp32 on the CPU: PyTorch %.6f, exported %.6f (evaluate.py's may differ a "
        "little: it runs at the checkpoint's precision, e.g. bf16, on its device)",
        split,
        results["mIoU_pytorch"],
        results["mIoU_exported"],
    )
    return results


# the exporter of each task: (cfg, overrides, model, train_cfg, output, (height, width)) ->
# (files written, the JSON's input/output description, verification)
EXPORTERS = {"semantic": export_semantic, "instance": export_instance}
