"""``python train.py``: build everything from the config, then hand it to the Trainer."""

import logging
import os
import random
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from seg.checkpoint import PIXEL_KEYS, check_compatible, load_checkpoint, refuse_weights_only
from seg.config import (
    build,
    check_data_config,
    check_values,
    check_writable,
    flat_values,
    report_user_errors,
    run_command,
)
from seg.data import loader
from seg.data.base import DataError
from seg.device import CUBLAS_DETERMINISTIC, compile_cache, resolve_device
from seg.doctor import quick_check
from seg.engine import dist
from seg.engine.guard import StopTraining
from seg.engine.recorder import Recorder
from seg.inference import pixel_scale
from seg.models import init_from, load_checkpoint_weights
from seg.optim import build_optimizer
from seg.run_dir import (
    RunLog,
    RunResult,
    claim,
    find_resumable,
    refuse_taken,
    remove_if_empty,
    run_identity,
)

log = logging.getLogger(__name__)


def main() -> None:
    """``python train.py`` and ``seg-train``: check the command line, then run the Hydra job."""
    run_command("train", hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="train")
def hydra_main(cfg: DictConfig) -> RunResult:
    """One run, or one job of a sweep (``-m``); returns its best validation score (the task's
    primary metric: mIoU, mask_AP), which an Optuna sweep (``hparams_search=optuna``)
    maximizes."""
    hydra_config = HydraConfig.get()
    sweep_job = hydra_config.mode == RunMode.MULTIRUN
    # A sweep's job directories are numbered by Hydra: only a single run's is named by the user.
    explicit_run_dir = not sweep_job and any(
        o.startswith("hydra.run.dir=") for o in hydra_config.overrides.hydra
    )

    def job() -> RunResult:
        output_dir = Path(hydra_config.runtime.output_dir)
        return run(cfg, output_dir, list(hydra_config.overrides.task), explicit_run_dir)

    try:
        # In a sweep, an error fails this job alone: Hydra records it, the sweep's summary
        # lists it (seg/sweep.py) and the sweeper decides whether the other jobs go on.
        return job() if sweep_job else report_user_errors(job)
    except StopTraining as stop:
        signal = stop.exit_code > 128
        if sweep_job and not signal:
            raise  # diverged: a failed job, like an error
        # A signal is the user's own decision (it ends a whole sweep): a warning, not an error.
        log.log(logging.WARNING if signal else logging.ERROR, "%s", stop)
        sys.exit(stop.exit_code)
    except RuntimeError as error:
        if not dist.lost_peer(error):
            raise
        # One line, not a collective's and Hydra's tracebacks around the failing rank's message.
        log.error("Rank %s stops: another process of this torchrun job failed; its error above "
                  "says why", os.environ.get("RANK", "?"))  # fmt: skip
        sys.exit(1)


def find_resume_checkpoint(
    resume: str | None, output_root: Path, identity: str, run_dir: Path
) -> tuple[Path, dict] | None:
    """``resume``: null (new run), ``auto`` (the newest loadable checkpoint of ``run_dir`` or
    else of this command's run under ``output_root``) or a path. Returns the checkpoint's path
    and its loaded state."""
    if resume is None:
        return None
    if resume == "auto":
        found = find_resumable(output_root, identity, run_dir)
        if found is None:
            log.warning("resume=auto: no checkpoint of this run under %s; starting a new run",
                        output_root)  # fmt: skip
        return found
    if not Path(resume).is_file():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint file (or use resume=auto)")
    checkpoint = load_checkpoint(resume)
    refuse_weights_only(checkpoint, resume)
    return Path(resume), checkpoint


def run(
    cfg: DictConfig, run_dir: Path, overrides: list[str], explicit_run_dir: bool = True
) -> RunResult:
    """Train with ``cfg``, or resume per ``cfg.resume``; returns the best validation score, with the
    directory the run wrote to.

    ``run_dir`` is Hydra's run directory; a new run claims it (docs/training.md, "Outputs"), a resumed run
    continues in its checkpoint's. ``overrides`` are the command line's: a checkpoint keeps them
    so that a resumed run is recomposed from the same command line (plus the new one's
    overrides, which win). Nothing is written until the config, data and weights passed their
    checks; a start that fails leaves no directory behind.
    """
    # Under torchrun: join the process group first; rank 0 decides and writes, the other ranks
    # report warnings and errors only.
    device = dist.init(resolve_device(cfg.trainer.device))
    if not dist.is_main():
        logging.getLogger().setLevel(logging.WARNING)
    run_log = RunLog()
    try:
        with compile_cache(Path(cfg.output_root) / "compile_cache"):  # kept across restarts
            return start(cfg, run_dir, overrides, explicit_run_dir, run_log, device)
    finally:
        run_log.close()
        # Hydra creates its run directory up front (on every rank): gone again if unused.
        remove_if_empty(run_dir, Path(cfg.output_root))
        dist.shutdown()


def start(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    explicit_run_dir: bool,
    run_log: RunLog,
    device: torch.device,
) -> RunResult:
    """Check, build, place the run, train: in that order, so that a failed check writes nothing.
    ``device`` is the one this process joined torchrun's group for (or the command line's)."""
    check_values(cfg)
    if OmegaConf.select(cfg, "task.parts", default=None):  # task=panoptic: before any work
        parts = list(cfg.task.parts)
        raise ValueError(
            f"this task merges the checkpoints of {' and '.join(parts)} runs and does not train: "
            f"train those, then evaluate.py with {' '.join(f'{p}=<checkpoint>' for p in parts)} "
            "(docs/panoptic.md)"
        )
    identity = run_identity(overrides, cfg.run_name)
    found = None

    def locate_checkpoint() -> Path | None:
        nonlocal found
        found = find_resume_checkpoint(cfg.resume, Path(cfg.output_root), identity, run_dir)
        if found is None and explicit_run_dir:
            refuse_taken(run_dir)  # early: before anything slow is built
        return None if found is None else found[0]

    # Rank 0 decides which checkpoint (if any) continues; the other ranks load the same file.
    checkpoint_path = dist.decided_by_main(locate_checkpoint)
    checkpoint = None
    if checkpoint_path is not None:
        checkpoint = found[1] if found is not None else load_checkpoint(checkpoint_path)
        overrides = checkpoint["overrides"] + [o for o in overrides if not o.startswith("resume=")]
        cfg = hydra.compose(config_name="train", overrides=overrides)
        check_values(cfg)
        device = same_device(cfg, device)
        check_compatible(checkpoint, cfg, checkpoint_path)
        check_same_groups(OmegaConf.create(checkpoint["config"]), cfg)
        log.info("Resuming %s from iteration %d", checkpoint_path, checkpoint["iteration"])
        if checkpoint["iteration"] >= cfg.trainer.max_iters:
            log.warning(
                "The checkpoint is at iteration %d of trainer.max_iters=%d: nothing to train. "
                "Set a larger trainer.max_iters to continue.",
                checkpoint["iteration"], cfg.trainer.max_iters,
            )  # fmt: skip
    check_data_config(cfg.data)
    warn_slow_average(cfg.trainer.ema_decay, cfg.trainer.max_iters)
    if cfg.trainer.deterministic:  # before the first cuBLAS handle exists: read when created
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
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
    settle_pixels(cfg, train_set, val_set)
    if checkpoint is not None:  # settled, as the checkpoint's were: bands and scale must agree
        check_compatible(checkpoint, cfg, checkpoint_path, PIXEL_KEYS)
        log_changed_settings(OmegaConf.create(checkpoint["config"]), cfg)
    # A resumed model gets its weights from the checkpoint: nothing to download.
    model = build(cfg.model, **({"pretrained": False} if checkpoint and "pretrained" in cfg.model
                                else {}))  # fmt: skip
    if checkpoint is not None:  # the complete compatibility check, before anything is written
        load_checkpoint_weights(model, checkpoint["model"], f"checkpoint {checkpoint_path}")
        if cfg.init_from is not None:
            log.info("init_from=%s is ignored: the run resumes with its checkpoint's weights",
                     cfg.init_from)  # fmt: skip
    elif cfg.init_from is not None:  # a new run from other weights, with its own schedule
        init_from(model, cfg.init_from, cfg.model.get("rgb_bands"))
    # Rank 0 alone reports, like every file of the run; a tracker's missing package fails here.
    trackers = [build(tracker) for tracker in cfg.tracker.values()] if dist.is_main() else []

    # Every check passed: now the run takes its directory (decided once, by rank 0) and
    # starts writing.
    run_dir = dist.decided_by_main(
        lambda: (
            checkpoint_path.parent.parent
            if checkpoint
            else claim(run_dir, identity, explicit_run_dir)
        )
    )
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if dist.is_main():
        check_writable(run_dir)
        run_log.write_to(run_dir)
        (run_dir / "config.yaml").write_text(config_yaml)
    recorder = Recorder(
        run_dir,
        class_names=list(cfg.data.class_names),
        palette=OmegaConf.to_container(cfg.data.palette),
        config_yaml=config_yaml,
        overrides=overrides,
        write=dist.is_main(),
        trackers=trackers,
        params=flat_values(cfg),
    )
    return RunResult(train(cfg, recorder, checkpoint, model, train_set, val_set, device), run_dir)


def settle_pixels(cfg: DictConfig, train_set, val_set) -> None:
    """Write the model's input bands into ``cfg.data.in_channels`` (the training images' count
    where it is null) and ``data.scale=auto``'s number for their dtype into ``cfg.data.scale``:
    the model, the checkpoint's config and its exports follow them. Then check what depends on
    them: the validation images, ``data.mean``/``std``, ``data.rgb_bands`` and a model that
    takes that many bands."""
    channels = train_set.in_channels
    with open_dict(cfg):
        if "in_channels" in cfg.data:
            cfg.data.in_channels = channels
        if OmegaConf.select(cfg, "data.scale") == "auto":
            cfg.data.scale = pixel_scale("auto", getattr(torch, train_set.dtype))
    if val_set.in_channels != channels or val_set.dtype != train_set.dtype:
        raise DataError(
            f"{val_set.describe(0)}: the {cfg.data.val_split} split's images have "
            f"{val_set.in_channels} bands of {val_set.dtype} but the {cfg.data.train_split} "
            f"split's {channels} of {train_set.dtype}: every split needs the same bands"
        )
    for key in ("mean", "std"):
        if len(cfg.data[key]) != channels:
            raise ValueError(
                f"data.{key} has {len(cfg.data[key])} values but the images have {channels} "
                f"bands: give one per band (scripts/check_data.py prints them for your data)"
            )
    rgb_bands = OmegaConf.select(cfg, "data.rgb_bands")
    if rgb_bands is not None and (
        len(rgb_bands) != 3 or not all(1 <= b <= channels for b in rgb_bands)
    ):
        raise ValueError(
            f"data.rgb_bands={list(rgb_bands)}: give three input bands in 1-{channels} "
            "(counted from 1, after data.bands), shown as red, green, blue"
        )
    if channels != 3 and "in_channels" not in cfg.model:
        raise ValueError(
            f"model={cfg.model._target_} takes RGB (3 bands) only, but the images have "
            f"{channels}: choose an smp model (model=unet, fpn, deeplabv3plus, ...)"
        )


def warn_slow_average(ema_decay: float | None, max_iters: int) -> None:
    """Warn when ``trainer.ema_decay`` averages over more iterations than the run has: every
    validation, ``best.pt`` and export would use weights that barely moved from the start."""
    if ema_decay is None or max_iters >= 1 / (1 - ema_decay):
        return
    log.warning(
        "trainer.ema_decay=%s averages over about %d iterations, more than trainer.max_iters=%d: "
        "the averaged weights that validation, best.pt and exports use would still be %.0f%% "
        "those of the first step. Lower trainer.ema_decay well below %.3g (1 - 1/max_iters), or "
        "set it to null",
        ema_decay, round(1 / (1 - ema_decay)), max_iters, 100 * ema_decay**max_iters,
        1 - 1 / max_iters,
    )  # fmt: skip


def same_device(cfg: DictConfig, device: torch.device) -> torch.device:
    """The device of a resumed run, whose config (the checkpoint's overrides, then this command
    line's) may name another ``trainer.device`` than the command line did. Under torchrun the
    process group was formed for the command line's (NCCL or gloo): another kind is refused."""
    resumed = resolve_device(cfg.trainer.device)
    if not dist.launched_by_torchrun():
        return dist.init(resumed)
    if resumed.type != device.type:
        raise ValueError(
            f"trainer.device={cfg.trainer.device} (the checkpoint's run) differs from this "
            f"command's {device.type}, for which the processes have joined their group: add "
            f"trainer.device=... to the command line to choose"
        )
    return device


def train(cfg, recorder, checkpoint, model, train_set, val_set, device) -> float:
    """Build the task (with its loss), optimizer, schedule and Trainer around ``model``,
    restore ``checkpoint`` if any, and train; returns the best validation score of the task's
    primary metric (NaN if it never validated)."""
    task = build(cfg.task)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build(cfg.scheduler)(optimizer=optimizer)
    trainer = build(
        cfg.trainer,
        model=model,
        task=task,
        optimizer=optimizer,
        scheduler=scheduler,
        recorder=recorder,
        device=device,
    )
    samples_per_iteration = cfg.data.batch_size * cfg.trainer.grad_accum_steps * dist.world_size()
    log.info(
        "%d process(es) x data.batch_size %d x trainer.grad_accum_steps %d = global batch %d",
        dist.world_size(), cfg.data.batch_size, cfg.trainer.grad_accum_steps,
        samples_per_iteration,
    )  # fmt: skip
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
        trainer.samples_seen = data_position(checkpoint, samples_per_iteration)
        log_schedule_change(checkpoint, cfg, scheduler, trainer.iteration)

    shared = dict(pin_memory=trainer.device.type == "cuda", rank=dist.rank(),
                  world_size=dist.world_size(), collate_fn=task.collate)  # fmt: skip
    train_loader = loader.train_loader(
        train_set,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        start_sample=trainer.samples_seen,
        **shared,
    )
    val_loader = loader.val_loader(
        val_set,
        batch_size=cfg.data.val_batch_size,
        num_workers=cfg.data.num_workers,
        max_samples=cfg.data.max_val_samples,
        **shared,
    )
    try:
        trainer.fit(train_loader, val_loader)
    finally:
        for dataset in (train_set, val_set):
            dataset.report_skipped()
    # Of the whole run, resumed parts included (the checkpoint keeps it): what a sweep compares.
    return trainer.best.finite()


def check_same_groups(stored: DictConfig, cfg: DictConfig) -> None:
    """Refuse a resume that changes the optimizer's parameter groups: torch's own error names no
    key, and a changed multiplier in the same groups would be overridden by the saved LRs."""
    for key, default in (("optimizer.encoder_lr_mult", 1.0), ("optimizer.norm_bias_decay", True)):
        # The defaults: a checkpoint from before the keys existed had one group.
        before = OmegaConf.select(stored, key, default=default)
        now = OmegaConf.select(cfg, key, default=default)
        if before != now:
            raise ValueError(
                f"{key}={now}: the checkpoint was trained with {before}, and a resumed run keeps "
                "its optimizer.encoder_lr_mult and optimizer.norm_bias_decay. Drop the override, "
                "or start a new run from the checkpoint's weights with init_from=<checkpoint>"
            )


def log_changed_settings(stored: DictConfig, cfg: DictConfig) -> None:
    """Name the settings a resumed run changes (``trainer.precision bf16 -> fp32``): the
    command line's overrides win over the checkpoint's, and the user should see which did."""
    before, after = flat_values(stored), flat_values(cfg)
    changed = [
        f"{key} {before.get(key)} -> {after.get(key)}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key) and key not in ("resume", "trainer.max_iters")
    ]
    if changed:
        log.warning("Resuming with settings other than the checkpoint's: %s", ", ".join(changed))


def data_position(checkpoint: dict, samples_per_iteration: int) -> int:
    """Where a resumed run continues in the data order: the samples all ranks consumed.

    With another number of processes the run continues at that same global sample, with a
    warning: the iterations after it see other global batches than an uninterrupted run would.
    """
    iteration = checkpoint["iteration"]
    # Checkpoints from before samples_seen existed: one process, the same batch throughout.
    seen = checkpoint.get("samples_seen", iteration * samples_per_iteration)
    before = checkpoint.get("world_size", 1)
    if before != dist.world_size():
        log.warning(
            "The checkpoint was trained by %d process(es) with a global batch of %d; this run has "
            "%d, global batch %d. It continues at the same global sample (%d), but iteration "
            "%d onwards differs from an uninterrupted run, and trainer.max_iters now counts "
            "batches of the new size. Resume with %d process(es) for an exact continuation.",
            before, seen // max(iteration, 1), dist.world_size(), samples_per_iteration, seen,
            iteration + 1, before,
        )  # fmt: skip
    return seen


def log_schedule_change(checkpoint: dict, cfg: DictConfig, scheduler, iteration: int) -> None:
    """Say so when a resumed run's schedule differs from the checkpoint's (a new
    ``trainer.max_iters`` stretches poly and cosine, so the LR rises again)."""
    before = checkpoint["scheduler"].get("_last_lr", [None])[0]
    lr_lambdas = getattr(scheduler, "lr_lambdas", None)
    if before is None or lr_lambdas is None:
        return
    after = scheduler.base_lrs[0] * lr_lambdas[0](iteration)
    if abs(after - before) <= 1e-3 * max(abs(before), 1e-12):
        return
    old_length = OmegaConf.select(OmegaConf.create(checkpoint["config"]), "scheduler.max_iters")
    log.warning(
        "The learning-rate schedule differs from the checkpoint's (scheduler.max_iters %s -> "
        "%s): at iteration %d the LR goes from %.3g to %.3g and then follows the new schedule. "
        "To stay at the old schedule's end instead, add scheduler.max_iters=%s.",
        old_length, OmegaConf.select(cfg, "scheduler.max_iters"), iteration, before, after, old_length,
    )  # fmt: skip
