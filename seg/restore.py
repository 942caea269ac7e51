"""A checkpoint put back to work, for the entry points that start from one (evaluate, predict,
export): its training config with the command line's changes, its model with the weights, the
Predictor, and the dataset of a split."""

import logging
from importlib import resources
from pathlib import Path

import torch
from hydra import compose
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from seg.checkpoint import check_compatible, load_checkpoint, validated_weights
from seg.config import ABSENT, apply_overrides, build, linked_keys, override_keys
from seg.device import resolve_channels_last, resolve_precision

log = logging.getLogger(__name__)

# The keys that may limit the images of a split, when given on this command line.
LIMIT_KEYS = ("max_samples", "data.max_val_samples")


def own_keys(config_name: str) -> tuple[str, ...]:
    """The keys that ``configs/<config_name>.yaml`` adds to the training config it extends
    (``checkpoint``, ``split``, ...): every other key on its command line edits the
    checkpoint's training config."""
    text = resources.files("seg.configs").joinpath(f"{config_name}.yaml").read_text()
    return tuple(key for key in OmegaConf.create(text) if key not in ("defaults", "hydra"))


def load(cfg: DictConfig, overrides: list[str], own: tuple[str, ...]) -> tuple[dict, DictConfig]:
    """``cfg.checkpoint`` (loaded safely, onto the CPU) and its training config with this
    command line's keys applied, all but the entry point's ``own`` keys (``own_keys``).

    A task merged from other tasks' checkpoints (``task.parts``: panoptic's semantic and
    instance) has its own config instead, ``cfg`` itself, and ``load_parts``' checkpoint."""
    if OmegaConf.select(cfg, "task.parts", default=None):
        return load_parts(cfg), cfg
    checkpoint = load_checkpoint(cfg.checkpoint)
    train_cfg = apply_overrides(OmegaConf.create(checkpoint["config"]), cfg, overrides, own)
    changed = [key for key in override_keys(overrides) if key not in own]
    follow_links(train_cfg, checkpoint["overrides"], changed)
    check_compatible(checkpoint, train_cfg, cfg.checkpoint)
    return checkpoint, train_cfg


def load_parts(cfg: DictConfig) -> dict:
    """The checkpoints that ``cfg.task.parts`` names, by the keys of the same names
    (``semantic=<path> instance=<path>``), each with its training config, as ``{"parts": {name:
    (checkpoint, config)}, "path": ..., "iteration": ...}``: ``path`` names the evaluation (its
    first part's path with the task's name), ``iteration`` is the first part's. This command
    line's ``trainer.precision`` and ``trainer.channels_last`` apply to every part."""
    parts, paths, task = {}, [], task_from(cfg).name
    for name in cfg.task.parts:
        path = OmegaConf.select(cfg, name, default=None)
        if not path:
            given = " ".join(f"{part}=<checkpoint>" for part in cfg.task.parts)
            raise ValueError(f"task={task} needs {given}: {name} is not given")
        checkpoint = load_checkpoint(path)
        part_cfg = OmegaConf.create(checkpoint["config"])
        for key in ("precision", "channels_last"):
            part_cfg.trainer[key] = cfg.trainer[key]
        check_compatible(checkpoint, part_cfg, path)
        parts[name] = (checkpoint, part_cfg)
        paths.append(Path(path))
    first = paths[0]
    return {
        "parts": parts,
        "path": first.with_name(f"{first.stem}_{task}{first.suffix}"),
        "iteration": parts[cfg.task.parts[0]][0]["iteration"],
        "sources": [str(path) for path in paths],
    }


def checkpoint_path(cfg: DictConfig, checkpoint: dict) -> Path:
    """The checkpoint an evaluation is named after: ``cfg.checkpoint``, or ``load_parts``'."""
    return Path(checkpoint["path"] if "parts" in checkpoint else cfg.checkpoint)


def follow_links(train_cfg: DictConfig, training_overrides: list[str], changed: list[str]):
    """Pass each ``changed`` key's new value on to the keys of ``train_cfg`` that took theirs
    from it by interpolation when the run was composed (``data.dataset.root: ${data.root}``):
    the checkpoint stored them resolved. The links come from composing the training command
    again; if the configs changed so much that it no longer composes, there are none."""
    try:
        training = compose(config_name="train", overrides=training_overrides)
    except Exception as error:  # any composition failure: this is a best effort on old runs
        if changed:
            log.warning(
                "The checkpoint's training command no longer composes (%s): %s reach only "
                "their own keys, not the keys that copied them when the run was composed "
                "(e.g. data.dataset.root from data.root); give those keys too if they differ",
                error, ", ".join(changed),
            )  # fmt: skip
        return
    for leaf, key in linked_keys(training, changed).items():
        present = OmegaConf.select(train_cfg, leaf, default=ABSENT) is not ABSENT
        if present and leaf not in changed:
            OmegaConf.update(train_cfg, leaf, OmegaConf.select(train_cfg, key), merge=False)


def model_from(checkpoint: dict, train_cfg: DictConfig) -> nn.Module:
    """The checkpoint's model with its weights: fp32, on the CPU, in eval mode. A run with
    ``trainer.ema_decay`` validated its averaged weights: those are the ones used here too."""
    # The weights come from the checkpoint: never download pretrained ones here.
    model = build(train_cfg.model, **({"pretrained": False} if "pretrained" in train_cfg.model
                                      else {}))  # fmt: skip
    model.load_state_dict(validated_weights(checkpoint))
    return model.eval()


def task_from(train_cfg: DictConfig):
    """The checkpoint's task (``seg.tasks``), without its loss: nothing here trains."""
    return build(train_cfg.task, **({"loss": None} if "loss" in train_cfg.task else {}))


INFERENCE_KEYS = ("mode", "crop", "stride", "scales", "flip", "window_batch")


def predictor_from(cfg: DictConfig, train_cfg: DictConfig, checkpoint: dict, device: torch.device):
    """The task's predictor over the checkpoint's model on ``device`` (for ``load_parts``'
    checkpoint: over its parts' predictors, each built so), with the configured
    precision and memory layout (``trainer.precision``, ``trainer.channels_last``) and the
    inference settings of evaluate.yaml/predict.yaml (``mode``, ``crop``, ``stride``,
    ``scales``, ``flip``, ``window_batch``: the semantic task's)."""
    precision = resolve_precision(train_cfg.trainer.precision, device, inference=True)
    if "parts" in checkpoint:  # a task merged from its parts' predictions (task=panoptic)
        parts = {name: (predictor_from(cfg, part_cfg, part, device),
                        list(part_cfg.data.class_names))
                 for name, (part, part_cfg) in checkpoint["parts"].items()}  # fmt: skip
        return task_from(train_cfg).predictor(parts, device, precision, False)
    channels_last = resolve_channels_last(train_cfg.trainer.channels_last, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model_from(checkpoint, train_cfg).to(device, memory_format=memory_format)
    inference = {key: OmegaConf.select(cfg, key) for key in INFERENCE_KEYS}
    if inference["mode"] == "slide" and inference["crop"] is None:
        inference["crop"] = train_cfg.data.train_transform.crop_size  # the training crop
    elif inference["mode"] != "slide":
        inference["crop"] = None
    inference = {key: list(value) if OmegaConf.is_list(value) else value
                 for key, value in inference.items()}  # fmt: skip
    return task_from(train_cfg).predictor(model, device, precision, channels_last, inference)


def split_dataset(train_cfg: DictConfig, split: str) -> Dataset:
    """The dataset of ``split``, through the validation transform."""
    data = train_cfg.data
    return build(data.dataset, split=split, transform=build(data.val_transform))


def sample_limit(cfg: DictConfig, overrides: list[str]) -> tuple[int | None, str | None]:
    """The number of images of the split to use and the key that set it; (None, None): the
    whole split.

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
