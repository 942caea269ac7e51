"""``python evaluate.py checkpoint=<path>``: metrics of a checkpoint on a dataset split."""

import json
import logging
from contextlib import ExitStack, nullcontext
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from seg import restore
from seg.config import build, report_user_errors, run_command
from seg.data import loader
from seg.device import resolve_device
from seg.engine import dist
from seg.engine.evaluation import evaluate
from seg.engine.task import Report
from seg.engine.trackers import Tracker
from seg.inference import progress

log = logging.getLogger(__name__)

# evaluate.yaml's own keys: everything else on the command line edits the checkpoint's config.
OWN_KEYS = restore.own_keys("evaluate")


def main() -> None:
    """``python evaluate.py`` and ``seg-evaluate``: check the command line, then evaluate."""
    run_command("evaluate", hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    report_user_errors(lambda: run(cfg, overrides), cfg)


def report_name(predictor, max_samples: int | None) -> str:
    """What sets this evaluation apart from a whole-image pass over the whole split, as a
    folder-name suffix (``_slide-crop64x64-stride42x42_scales0.75-1-1.25_flip_first4``), so
    that evaluations with different settings never share a report folder. ``predictor``: the
    task's; the inference settings are the semantic task's (others have none)."""
    parts = []
    if getattr(predictor, "mode", "whole") == "slide":
        crop, stride = ("x".join(map(str, size)) for size in (predictor.crop, predictor.stride))
        parts.append(f"slide-crop{crop}-stride{stride}")
    if getattr(predictor, "scales", (1.0,)) != (1.0,):
        parts.append("scales" + "-".join(f"{scale:g}" for scale in predictor.scales))
    if getattr(predictor, "flip", False):
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
    """Evaluate ``cfg.checkpoint`` on ``cfg.split``; returns metrics keyed by class name.

    Under torchrun each process evaluates its share of the split; all return the metrics of
    the whole split, and rank 0 alone logs them and writes the report and ``out``."""
    max_samples, limit_key = restore.sample_limit(cfg, overrides)
    checkpoint, train_cfg = restore.load(cfg, overrides, OWN_KEYS)
    device = dist.init(resolve_device(train_cfg.trainer.device))  # this rank's, under torchrun
    try:
        # The run's trackers (a checkpoint from before them: TensorBoard), on rank 0 alone, which
        # reports; a tracker's missing package fails here, before the evaluation.
        tracker_cfg = OmegaConf.select(train_cfg, "tracker", default=None) or cfg.tracker
        trackers = [build(tracker) for tracker in tracker_cfg.values()] if dist.is_main() else []
        return evaluate_split(cfg, checkpoint, train_cfg, device, max_samples, limit_key, trackers)
    finally:
        dist.shutdown()


def evaluate_split(
    cfg: DictConfig,
    checkpoint: dict,
    train_cfg: DictConfig,
    device: torch.device,
    max_samples: int | None,
    limit_key: str | None,
    trackers: list[Tracker],
) -> dict:
    """``run`` once the checkpoint is loaded and the process group joined."""
    checkpoint_path = restore.checkpoint_path(cfg, checkpoint)
    data = train_cfg.data
    task = restore.task_from(train_cfg)
    dataset = restore.split_dataset(train_cfg, cfg.split)
    predict = restore.predictor_from(cfg, train_cfg, checkpoint, device)
    data_loader = loader.val_loader(
        dataset,
        batch_size=data.val_batch_size,
        num_workers=data.num_workers,
        max_samples=max_samples,
        pin_memory=device.type == "cuda",
        rank=dist.rank(),
        world_size=dist.world_size(),
        collate_fn=task.collate,
    )
    total = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    if dist.is_main():
        if total < len(dataset):
            log.warning(
                "Evaluating the first %d of the %d images of split '%s' (%s=%d on the command "
                "line); drop it to evaluate the whole split",
                total, len(dataset), cfg.split, limit_key, max_samples,
            )  # fmt: skip
        log.info(
            "Evaluating %s (iteration %d) on split '%s' (%d images, %d process(es)): %s, %s, %s",
            checkpoint_path, checkpoint["iteration"], cfg.split, total, dist.world_size(),
            predict.describe(), device, predict.precision,
        )  # fmt: skip
    # One progress display, of the whole split, fed by rank 0's share.
    share = len(data_loader.dataset)
    bar = progress("evaluate", total, share=share) if dist.is_main() else nullcontext()
    evaluator = task.evaluator(device, num_pictures=0, num_worst=cfg.num_worst, dataset=dataset)
    with bar:
        result = evaluate(predict.model, predict, data_loader, evaluator, device,
                          progress=bar.update if dist.is_main() else None)  # fmt: skip
    dataset.report_skipped()
    summary = task.summary(result, cfg.bootstrap)
    if not dist.is_main():
        return summary  # the same metrics: rank 0 reports them
    settings = report_name(predict, max_samples if total < len(dataset) else None)
    report_dir = (
        Path(cfg.report_dir)
        if cfg.report_dir
        else default_report_dir(checkpoint_path, cfg.split, settings)
    )
    report = task.report(result, report_dir.name)
    log.info("\n%s", report.table)
    write_report(task, result, report, report_dir, checkpoint, trackers)
    if cfg.out is not None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        source = (
            {"checkpoints": checkpoint["sources"]}
            if "sources" in checkpoint
            else {"checkpoint": str(checkpoint_path)}
        )
        record = {**source, "split": cfg.split, **summary}
        out.write_text(json.dumps(record, indent=2) + "\n")
        log.info("Metrics written to %s", out)
    return summary


def write_report(
    task, result, report: Report, report_dir: Path, checkpoint: dict, trackers: list[Tracker]
) -> None:
    """The task's files in ``report_dir`` (per-image CSV, figures); in a run directory, the
    metrics and figures also go to the run's ``trackers``, tagged ``<report_dir name>/...``
    (one name per report: settings never mix) at the checkpoint's iteration."""
    if report_dir.is_dir() and any(report_dir.iterdir()):
        log.info(
            "Replacing the earlier report in %s (report_dir=<dir> writes elsewhere)", report_dir
        )
    report_dir.mkdir(parents=True, exist_ok=True)
    task.write_report(result, report_dir, report)
    if report_dir.parent.joinpath("checkpoints").is_dir():  # a run directory
        run_dir, name, iteration = report_dir.parent, report_dir.name, checkpoint["iteration"]
        tagged = {f"{name}/{picture}": array for picture, array in report.pictures.items()}
        with ExitStack() as sessions:
            for tracker in trackers:
                sessions.enter_context(tracker.session(run_dir, iteration, {}, report=name))
            for tracker in trackers:
                tracker.scalars(report.scalars, iteration)
                tracker.images(tagged, iteration)
    log.info("Per-image metrics and figures in %s", report_dir)
