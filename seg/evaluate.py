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

from seg.config import apply_overrides, build, override_keys, report_user_errors, run_command
from seg.data import loader
from seg.engine.checkpoint import check_compatible, load_checkpoint
from seg.engine.evaluation import Evaluation, evaluate, figures
from seg.engine.trainer import resolve_channels_last, resolve_device, resolve_precision
from seg.inference import Predictor, memory_advice, progress
from seg.metrics import bootstrap_miou, format_table, iou_from_counts, named
from seg.visualize import save_png

log = logging.getLogger(__name__)

# evaluate.yaml's own keys: everything else on the command line edits the checkpoint's config.
OWN_KEYS = (
    "checkpoint", "split", "max_samples", "out", "report_dir", "mode", "crop", "stride", "scales",
    "flip", "window_batch", "num_worst", "bootstrap",
)  # fmt: skip
# The keys that may limit the images evaluated, when given on this command line.
LIMIT_KEYS = ("max_samples", "data.max_val_samples")


def main() -> None:
    """``python evaluate.py`` and ``seg-evaluate``: check the command line, then evaluate."""
    run_command("evaluate", hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    report_user_errors(lambda: run(cfg, overrides))


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


def sample_limit(cfg: DictConfig, overrides: list[str]) -> tuple[int | None, str | None]:
    """The number of images to evaluate and the key that set it; (None, None): the whole split.

    Only this command line counts: the training config's ``data.max_val_samples`` (set to
    validate quickly during training) would otherwise cut the split without a word.
    """
    keys = [key for key in override_keys(overrides) if key in LIMIT_KEYS]
    if len(keys) > 1:
        raise ValueError(f"{' and '.join(keys)} both limit the images evaluated: give one")
    if not keys:
        return None, None
    value = OmegaConf.select(cfg, keys[0])
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"{keys[0]}={value}: give the number of images to evaluate (>= 1), or null for "
            "the whole split"
        )
    return value, keys[0]


def report_name(predictor: Predictor, max_samples: int | None) -> str:
    """What sets this evaluation apart from a whole-image pass over the whole split, as a
    folder-name suffix (``_slide-crop64x64-stride42x42_scales0.75-1-1.25_flip_first4``), so
    that evaluations with different settings never share a report folder."""
    parts = []
    if predictor.mode == "slide":
        crop, stride = ("x".join(map(str, size)) for size in (predictor.crop, predictor.stride))
        parts.append(f"slide-crop{crop}-stride{stride}")
    if predictor.scales != (1.0,):
        parts.append("scales" + "-".join(f"{scale:g}" for scale in predictor.scales))
    if predictor.flip:
        parts.append("flip")
    if max_samples is not None:
        parts.append(f"first{max_samples}")
    return "".join(f"_{part}" for part in parts)


def default_report_dir(checkpoint: Path, split: str, settings: str = "") -> Path:
    """``<run>/eval_<split>_<name><settings>/`` for a checkpoint in ``<run>/checkpoints/``,
    else beside it; ``settings`` is ``report_name``'s suffix."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / f"eval_{split}_{checkpoint.stem}{settings}"
    return checkpoint.with_name(f"{checkpoint.stem}_eval_{split}{settings}")


def run(cfg: DictConfig, overrides: list[str]) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.split``; returns metrics keyed by class name."""
    max_samples, limit_key = sample_limit(cfg, overrides)
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
        max_samples=max_samples,
        pin_memory=predictor.device.type == "cuda",
    )
    total = len(data_loader.dataset)
    if total < len(dataset):
        log.warning(
            "Evaluating the first %d of the %d images of split '%s' (%s=%d on the command line); "
            "drop it to evaluate the whole split",
            total, len(dataset), cfg.split, limit_key, max_samples,
        )  # fmt: skip
    log.info(
        "Evaluating %s (iteration %d) on split '%s' (%d images): %s inference, %d pass(es), %s, %s",
        checkpoint_path, checkpoint["iteration"], cfg.split, total, cfg.mode,
        predictor.num_passes, predictor.device, predictor.precision,
    )  # fmt: skip
    with progress("evaluate", total) as bar:
        result = evaluate(
            predictor,
            data_loader,
            data.num_classes,
            data.ignore_index,
            num_worst=cfg.num_worst,
            progress=bar.update,
            memory_advice=memory_advice(predictor, "data.val_batch_size"),
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

    settings = report_name(predictor, max_samples if total < len(dataset) else None)
    report_dir = (
        Path(cfg.report_dir)
        if cfg.report_dir
        else default_report_dir(checkpoint_path, cfg.split, settings)
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
    """Per-image CSV and figures in ``report_dir``; the figures also in the run's TensorBoard,
    as the run ``tb/<report_dir name>`` (one per report: settings never mix)."""
    if (report_dir / "per_image.csv").is_file():
        log.info(
            "Replacing the earlier report in %s (report_dir=<dir> writes elsewhere)", report_dir
        )
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
    if report_dir.parent.joinpath("checkpoints").is_dir():  # a run directory: add to its TB
        # purge_step: TensorBoard hides what an earlier evaluation of the same checkpoint
        # iteration wrote here, so that a repeated evaluation replaces, not doubles, its images.
        tb_dir = report_dir.parent / "tb" / report_dir.name
        with SummaryWriter(tb_dir, purge_step=checkpoint["iteration"]) as writer:
            for name, array in pictures.items():
                writer.add_image(
                    f"eval_{split}/{name}", array, checkpoint["iteration"], dataformats="HWC"
                )
    log.info("Per-image metrics and figures in %s", report_dir)


def _cell(value: float) -> str:
    return "" if value != value else f"{value:.6f}"
