"""``python train.py``: build everything from the config, then hand it to the Trainer."""

import logging
import random
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seg.config import check_data_config
from seg.data import loader
from seg.engine.checkpoint import find_latest_checkpoint, load_checkpoint

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_config = HydraConfig.get()
    return run(cfg, Path(hydra_config.runtime.output_dir), list(hydra_config.overrides.task))


def resume_path(resume: str | None, output_root: Path) -> Path | None:
    """``resume``: null (fresh run), ``auto`` (the newest last.pt under output_root) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        path = find_latest_checkpoint(output_root)
        if path is None:
            log.warning(
                "resume=auto: no checkpoints/last.pt under %s; starting a new run", output_root
            )
        return path
    if not Path(resume).is_file():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint file (or use resume=auto)")
    return Path(resume)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float:
    """Train with ``cfg``; returns the final val mIoU. ``overrides`` are the command line's."""
    checkpoint_path = resume_path(cfg.resume, Path(cfg.output_root))
    checkpoint = None
    if checkpoint_path is not None:
        checkpoint = load_checkpoint(checkpoint_path)
        # The run continues with its own command line; this command line's overrides win.
        own = [o for o in overrides if not o.startswith("resume=")]
        overrides = checkpoint["overrides"] + own
        cfg = hydra.compose(config_name="train", overrides=overrides)
        run_dir = checkpoint_path.parent.parent
        log.info("Resuming %s from iteration %d", checkpoint_path, checkpoint["iteration"])
    check_data_config(cfg.data)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(config_yaml)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Data first: a wrong root or an empty split fails before anything slow is built.
    train_set = instantiate(
        cfg.data.dataset,
        split=cfg.data.train_split,
        transform=instantiate(cfg.data.train_transform),
    )
    val_set = instantiate(
        cfg.data.dataset, split=cfg.data.val_split, transform=instantiate(cfg.data.val_transform)
    )
    # A resumed model gets its weights from the checkpoint: nothing to download.
    model = instantiate(cfg.model, **({"pretrained": False} if checkpoint else {}))
    loss_fn = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer)
    trainer = instantiate(
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
    metrics = trainer.fit(train_loader, val_loader)
    return metrics.get("mIoU", float("nan"))
