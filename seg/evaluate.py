"""``python evaluate.py checkpoint=<path>``: metrics of a checkpoint on a dataset split."""

import csv
import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from seg.config import apply_overrides, build, run_command
from seg.data import loader
from seg.engine.checkpoint import check_compatible, load_checkpoint
from seg.engine.evaluation import Evaluation, evaluate, figures
from seg.engine.trainer import resolve_channels_last, resolve_device, resolve_precision
from seg.inference import Predictor
from seg.metrics import bootstrap_miou, format_table, iou_from_counts, named
from seg.visualize import save_png

log = logging.getLogger(__name__)

# evaluate.yaml's own keys: everything else on the command line edits the checkpoint's config.
OWN_KEYS = (
    "checkpoint", "split", "out", "report_dir", "mode", "crop", "stride", "scales", "flip",
    "window_batch", "num_worst", "bootstrap",
)  # fmt: skip


def main() -> None:
    """``python evaluate.py`` and ``seg-evaluate``: check the command line, then evaluate."""
    run_command("evaluate", hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    run(cfg, list(HydraConfig.get().overrides.task))


def load_model(
    checkpoint: dict, train_cfg: DictConfig
) -> tuple[torch.nn.Module, torch.device, str, bool]:
    """Rebuild the checkpoint's model on the configured device, with its precision and layout."""
    # The weights come from the checkpoint: never download pretrained ones here.
    model = build(train_cfg.model, pretrained=False)
    model.load_state_dict(checkpoint["model"])
    device = resolve_device(train_cfg.trainer.device)
    precision = resolve_precision(train_cfg.trainer.precision, device)
    channels_last = resolve_channels_last(train_cfg.trainer.channels_last, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format).eval(), device, precision, channels_last


def predictor_from(cfg: DictConfig, train_cfg: DictConfig, checkpoint: dict) -> Predictor:
    """The Predictor that ``mode``, ``crop``, ``stride``, ``scales``, ``flip`` ask for."""
    model, device, precision, channels_last = load_model(checkpoint, train_cfg)
    crop = cfg.crop if cfg.crop is not None else train_cfg.data.train_transform.crop_size
    return Predictor(
        model,
        device,
        precision,
        channels_last,
        mode=cfg.mode,
        crop=list(crop) if cfg.mode == "slide" else None,
        stride=list(cfg.stride) if cfg.stride is not None else None,
        scales=list(cfg.scales),
        flip=cfg.flip,
        window_batch=cfg.window_batch,
    )


def checkpoint_config(cfg: DictConfig, overrides: list[str], checkpoint: dict) -> DictConfig:
    """The checkpoint's training config with this command line's keys applied."""
    train_cfg = apply_overrides(OmegaConf.create(checkpoint["config"]), cfg, overrides, OWN_KEYS)
    check_compatible(checkpoint, train_cfg, cfg.checkpoint)
    return train_cfg


def default_report_dir(checkpoint: Path, split: str) -> Path:
    """``<run>/eval_<split>_<name>/`` for a checkpoint in ``<run>/checkpoints/``, else beside it."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / f"eval_{split}_{checkpoint.stem}"
    return checkpoint.with_name(f"{checkpoint.stem}_eval_{split}")


def run(cfg: DictConfig, overrides: list[str]) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.split``; returns metrics keyed by class name."""
    checkpoint_path = Path(cfg.checkpoint)
    checkpoint = load_checkpoint(checkpoint_path)
    train_cfg = checkpoint_config(cfg, overrides, checkpoint)
    data = train_cfg.data
    dataset = build(data.dataset, split=cfg.split, transform=build(data.val_transform))
    predictor = predictor_from(cfg, train_cfg, checkpoint)
    data_loader = loader.val_loader(
        dataset,
        batch_size=data.val_batch_size,
        num_workers=data.num_workers,
        max_samples=data.max_val_samples,
        pin_memory=predictor.device.type == "cuda",
    )
    log.info(
        "Evaluating %s (iteration %d) on split '%s' (%d images): %s inference, %d pass(es), %s, %s",
        checkpoint_path, checkpoint["iteration"], cfg.split, len(data_loader.dataset), cfg.mode,
        predictor.num_passes, predictor.device, predictor.precision,
    )  # fmt: skip
    result = evaluate(
        predictor,
        data_loader,
        data.num_classes,
        data.ignore_index,
        num_worst=cfg.num_worst,
        progress=lambda batches: tqdm(batches, desc="evaluate", unit="batch", disable=None),
    )
    dataset.report_skipped()
    class_names = list(checkpoint["class_names"])
    summary = named(result.metrics, class_names)
    summary["images"] = len(result.image_names)
    if cfg.bootstrap:
        low, high = bootstrap_miou(result.image_counts, resamples=cfg.bootstrap)
        summary["mIoU_ci95"] = [low, high]
    log.info("\n%s", format_table(result.metrics, class_names))
    if cfg.bootstrap:
        log.info("mIoU %.4f, 95%% bootstrap interval [%.4f, %.4f]", summary["mIoU"], low, high)

    report_dir = (
        Path(cfg.report_dir) if cfg.report_dir else default_report_dir(checkpoint_path, cfg.split)
    )
    write_report(result, report_dir, class_names, checkpoint, train_cfg, cfg.split)
    if cfg.out is not None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": str(checkpoint_path), "split": cfg.split, **summary}
        out.write_text(json.dumps(record, indent=2) + "\n")
        log.info("Metrics written to %s", out)
    return summary


def write_report(
    result: Evaluation,
    report_dir: Path,
    class_names: list[str],
    checkpoint: dict,
    train_cfg: DictConfig,
    split: str,
) -> None:
    """Per-image CSV and figures in ``report_dir``; the figures also in the run's TensorBoard."""
    report_dir.mkdir(parents=True, exist_ok=True)
    image_iou = iou_from_counts(result.image_counts.double())
    with open(report_dir / "per_image.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "mIoU", "aAcc", *[f"IoU/{name}" for name in class_names]])
        for name, counts, iou in zip(
            result.image_names, result.image_counts, image_iou, strict=True
        ):
            labelled = counts[1].sum().item()
            accuracy = counts[0].sum().item() / labelled if labelled else float("nan")
            writer.writerow(
                [name, _cell(iou.nanmean().item()), _cell(accuracy), *map(_cell, iou.tolist())]
            )
    data = train_cfg.data
    pictures = figures(result, class_names, checkpoint["palette"], data.mean, data.std)
    for name, array in pictures.items():
        save_png(array, report_dir / f"{name}.png")
    tb_dir = report_dir.parent / "tb"
    if report_dir.parent.joinpath("checkpoints").is_dir():  # a run directory: add to its curves
        with SummaryWriter(tb_dir) as writer:
            for name, array in pictures.items():
                writer.add_image(
                    f"eval_{split}/{name}", array, checkpoint["iteration"], dataformats="HWC"
                )
    log.info("Per-image metrics and figures in %s", report_dir)


def _cell(value: float) -> str:
    return "" if value != value else f"{value:.6f}"
