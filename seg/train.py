"""``python train.py``: build everything from the config, then hand it to the Trainer."""

import logging
import random
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from seg.config import build, check_data_config, check_writable, run_command
from seg.data import loader
from seg.doctor import quick_check
from seg.engine.checkpoint import check_compatible, load_checkpoint, newest_loadable_checkpoint
from seg.engine.trainer import StopTraining

log = logging.getLogger(__name__)


def main() -> None:
    """``python train.py`` and ``seg-train``: check the command line, then run the Hydra job."""
    run_command("train", hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    try:
        run(cfg, Path(hydra_config.runtime.output_dir), list(hydra_config.overrides.task))
    except StopTraining as stop:
        log.error("%s", stop)
        sys.exit(stop.exit_code)


def find_resume_checkpoint(resume: str | None, output_root: Path) -> tuple[Path, dict] | None:
    """``resume``: null (new run), ``auto`` (the newest loadable checkpoint under output_root)
    or a path. Returns the checkpoint's path and its loaded state."""
    if resume is None:
        return None
    if resume == "auto":
        found = newest_loadable_checkpoint(output_root)
        if found is None:
            log.warning("resume=auto: no checkpoint under %s; starting a new run", output_root)
        return found
    if not Path(resume).is_file():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint file (or use resume=auto)")
    return Path(resume), load_checkpoint(resume)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float:
    """Train with ``cfg``, or resume per ``cfg.resume``; returns the final val mIoU.

    ``overrides`` are the command line's: a checkpoint keeps them so that a resumed run is
    recomposed from the same command line (plus the new one's overrides, which win).
    """
    found = find_resume_checkpoint(cfg.resume, Path(cfg.output_root))
    if found is None:
        return build_and_train(cfg, run_dir, overrides)
    checkpoint_path, checkpoint = found
    overrides = checkpoint["overrides"] + [o for o in overrides if not o.startswith("resume=")]
    cfg = hydra.compose(config_name="train", overrides=overrides)
    check_compatible(checkpoint, cfg, checkpoint_path)
    run_dir = checkpoint_path.parent.parent
    # The resumed run writes into its own run dir, its log included.
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        log.info("Resuming %s from iteration %d", checkpoint_path, checkpoint["iteration"])
        if checkpoint["iteration"] >= cfg.trainer.max_iters:
            log.warning(
                "The checkpoint is at iteration %d of trainer.max_iters=%d: nothing to train. "
                "Set a larger trainer.max_iters to continue.",
                checkpoint["iteration"], cfg.trainer.max_iters,
            )  # fmt: skip
        return build_and_train(cfg, run_dir, overrides, checkpoint)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def build_and_train(
    cfg: DictConfig, run_dir: Path, overrides: list[str], checkpoint: dict | None = None
):
    """Build data, model, loss, optimizer, schedule and Trainer from ``cfg`` and train."""
    check_data_config(cfg.data)
    check_writable(run_dir)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(config_yaml)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Data first: a wrong root or an empty split fails before anything slow is built.
    train_set = build(
        cfg.data.dataset,
        split=cfg.data.train_split,
        transform=build(cfg.data.train_transform),
    )
    val_set = build(
        cfg.data.dataset, split=cfg.data.val_split, transform=build(cfg.data.val_transform)
    )
    for dataset in (train_set, val_set):  # the doctor's checks on a few files, before any work
        quick_check(dataset)
    # A resumed model gets its weights from the checkpoint: nothing to download.
    model = build(cfg.model, **({"pretrained": False} if checkpoint else {}))
    loss_fn = build(cfg.loss)
    optimizer = build(cfg.optimizer)(params=model.parameters())
    scheduler = build(cfg.scheduler)(optimizer=optimizer)
    trainer = build(
        cfg.trainer,
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        run_dir=run_dir,
        class_names=list(cfg.data.class_names),
        palette=OmegaConf.to_container(cfg.data.palette),
        ignore_index=cfg.data.ignore_index,
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
        config_yaml=config_yaml,
        overrides=overrides,
    )
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)

    pin_memory = trainer.device.type == "cuda"
    samples_per_iteration = cfg.data.batch_size * cfg.trainer.grad_accum_steps
    train_loader = loader.train_loader(
        train_set,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        start_sample=trainer.iteration * samples_per_iteration,
        pin_memory=pin_memory,
    )
    val_loader = loader.val_loader(
        val_set,
        batch_size=cfg.data.val_batch_size,
        num_workers=cfg.data.num_workers,
        max_samples=cfg.data.max_val_samples,
        pin_memory=pin_memory,
    )
    try:
        metrics = trainer.fit(train_loader, val_loader)
    finally:
        for dataset in (train_set, val_set):
            dataset.report_skipped()
    return metrics.get("mIoU", float("nan"))
