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
            try:
                import onnxruntime
            except ImportError as error:
                raise ImportError(
                    "verifying an ONNX export needs onnxruntime: pip install -e '.[export]'"
                ) from error
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
    if not task.exportable:
        raise ValueError(
            f"export.py does not yet export models of the {task.name} task ({checkpoint_path}); "
            "evaluate.py scores them"
        )
    output = Path(cfg.output) if cfg.output else default_output(checkpoint_path, cfg.format)
    check_output(output, checkpoint_path, cfg.format)
    # Exported graphs are fp32 and CPU-traced; runtimes pick their own precision and device.
    model = restore.model_from(checkpoint, train_cfg)
    height, width = cfg.sample_size or train_cfg.data.train_transform.crop_size
    channels = OmegaConf.select(train_cfg, "data.in_channels", default=3)  # the model's input bands
    sample = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    log.info(
        "Exporting %s to %s (%s, dynamic=%s)", checkpoint_path, output, cfg.format, cfg.dynamic
    )
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

    data = train_cfg.data
    pixels = OmegaConf.to_container(data, resolve=True)  # plain values for the JSON
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
        "input": {
            "name": "images",
            "layout": "NCHW",
            "dtype": "float32",
            "channels": channels,
            # 1-based bands of the source files, in input order (null: all, as stored; RGB photos)
            "bands": pixels.get("bands"),
            "normalization": "(pixel / scale - mean) / std, per channel; nodata pixels: 0",
            "scale": pixels.get("scale", 255),  # 255: RGB photos' (before data.scale existed)
            "nodata": pixels.get("nodata"),
            "mean": list(data.mean),
            "std": list(data.std),
            "size": "any batch, height and width"
            if cfg.dynamic
            else f"exactly {list(sample.shape)}",
            "note": f"inputs are padded inside the model to a multiple of {model.stride}",
        },
        "output": {
            "name": "logits",
            "layout": "NCHW",
            "dtype": "float32",
            "meaning": "class scores at the input's height and width; argmax over C = class index",
        },
        "verification": verification,
    }
    sidecar.write_text(json.dumps(report, indent=2) + "\n")
    status = "passed" if verification["passed"] else "FAILED"
    written = ", ".join(str(file) for file in [*files, sidecar])
    log.info("Verification %s (max abs diff %.3g, tolerance %g); wrote %s", status,
             max_difference, cfg.tolerance, written)  # fmt: skip
    return report


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
