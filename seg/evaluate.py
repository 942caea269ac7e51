"""``python evaluate.py checkpoint=<path>``: metrics of a checkpoint on a dataset split."""

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seg.config import apply_overrides, check_command_line
from seg.data import loader
from seg.engine.checkpoint import check_compatible, load_checkpoint
from seg.engine.trainer import evaluate, resolve_channels_last, resolve_device, resolve_precision
from seg.metrics import format_table, named

log = logging.getLogger(__name__)

# evaluate.yaml's own keys: everything else on the command line edits the checkpoint's config.
OWN_KEYS = ("checkpoint", "split", "out")


def main() -> None:
    """``python evaluate.py`` and ``seg-evaluate``: check the command line, then evaluate."""
    error = check_command_line("evaluate", sys.argv[1:])
    if error:
        sys.exit(error)
    hydra_main()


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    run(cfg, list(HydraConfig.get().overrides.task))


def run(cfg: DictConfig, overrides: list[str]) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.split``; returns metrics keyed by class name."""
    checkpoint = load_checkpoint(cfg.checkpoint)
    train_cfg = apply_overrides(
        OmegaConf.create(checkpoint["config"]), cfg, overrides, skip=OWN_KEYS
    )
    check_compatible(checkpoint, train_cfg, cfg.checkpoint)
    data = train_cfg.data
    dataset = instantiate(data.dataset, split=cfg.split, transform=instantiate(data.val_transform))
    # The weights come from the checkpoint: never download pretrained ones here.
    model = instantiate(train_cfg.model, pretrained=False)
    model.load_state_dict(checkpoint["model"])
    device = resolve_device(train_cfg.trainer.device)
    precision = resolve_precision(train_cfg.trainer.precision, device)
    channels_last = resolve_channels_last(train_cfg.trainer.channels_last, device)
    model.to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    data_loader = loader.val_loader(
        dataset,
        batch_size=data.val_batch_size,
        num_workers=data.num_workers,
        max_samples=data.max_val_samples,
        pin_memory=device.type == "cuda",
    )
    log.info(
        "Evaluating %s (iteration %d) on %s split '%s' (%d images), %s, %s",
        cfg.checkpoint, checkpoint["iteration"], data.dataset._target_.rsplit(".", 1)[-1],
        cfg.split, len(data_loader.dataset), device, precision,
    )  # fmt: skip
    metrics, _ = evaluate(
        model, data_loader, data.num_classes, data.ignore_index, device, precision, channels_last
    )
    dataset.report_skipped()
    class_names = list(checkpoint["class_names"])
    log.info("\n%s", format_table(metrics, class_names))
    result = named(metrics, class_names)
    if cfg.out is not None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": str(cfg.checkpoint), "split": cfg.split, **result}
        out.write_text(json.dumps(record, indent=2) + "\n")
        log.info("Metrics written to %s", out)
    return result
