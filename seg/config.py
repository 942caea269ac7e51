"""Config plumbing shared by the entry points: command-line overrides and sanity checks."""

import difflib
import logging
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seg.data.coco import categories
from seg.data.panoptic import panoptic_categories
from seg.device import usable_cpus

log = logging.getLogger(__name__)

# ${coco:<root>,<split>,names|ids|count|palette}: data=coco_instances takes its classes from the
# annotation file, so the resolved config (and the checkpoint) carries them, ids included.
# Lists come back as ListConfig, as a list written in YAML would be.
OmegaConf.register_new_resolver(
    "coco", lambda *args: OmegaConf.create(value) if isinstance(value := categories(*args), list)
    else value, replace=True)  # fmt: skip
# ${coco_panoptic:<json>,names|ids|things|count|palette|instance_...}: the same for a COCO
# panoptic JSON (data=coco_panoptic, cityscapes_panoptic): stuff and things, isthing kept.
OmegaConf.register_new_resolver(
    "coco_panoptic", lambda *args: OmegaConf.create(value)
    if isinstance(value := panoptic_categories(*args), list) else value, replace=True)  # fmt: skip

# ${cpus:<n>}: n, or the CPUs this process may use where fewer (data.num_workers: 4 DataLoader
# workers on 2 cores would only compete with the training process for them).
OmegaConf.register_new_resolver("cpus", lambda most: min(int(most), usable_cpus()), replace=True)

# What a user can fix (a bad value, a missing or unreadable file, a missing optional package,
# out of memory with advice): these end a command with their own one-line message. DataError is
# a ValueError; OSError covers FileNotFoundError and PermissionError. Anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, MemoryError)
EXIT_USER_ERROR = 1


def override_keys(overrides: Iterable[str]) -> list[str]:
    """The config keys or groups that command-line ``overrides`` set (``data.root``, ``model``)."""
    parser = OverridesParser.create()
    return [override.key_or_group for override in parser.parse_overrides(list(overrides))]


def apply_overrides(
    base: DictConfig, current: DictConfig, overrides: Iterable[str], skip: Iterable[str] = ()
) -> DictConfig:
    """Copy into ``base`` every key or group the command line set, with its value in ``current``.

    Used to run a checkpoint's stored config with the user's changes (``data.root=...``,
    ``trainer.device=cpu``): ``current`` is the composed config of this invocation.
    """
    merged = base.copy()
    for key in override_keys(overrides):
        if key in skip or key.startswith("hydra"):
            continue
        value = OmegaConf.select(current, key, throw_on_missing=False)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        OmegaConf.update(merged, key, value, merge=False, force_add=True)
    return merged


def linked_keys(config: DictConfig, keys: Iterable[str]) -> dict[str, str]:
    """Leaves of the unresolved ``config`` whose value is exactly ``${key}`` for one of ``keys``
    (``data.dataset.root: ${data.root}``), as {leaf: key}. A checkpoint stores its config
    resolved: an override of ``data.root`` must also reach the leaves that copied it."""
    keys = set(keys)

    def leaves(tree: dict, prefix: str):
        for name, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{name}.")
            elif isinstance(value, str):
                match = re.fullmatch(r"\$\{([\w.]+)\}", value)
                if match and match.group(1) in keys:
                    yield f"{prefix}{name}", match.group(1)

    return dict(leaves(OmegaConf.to_container(config, resolve=False), ""))


def check_data_config(data: DictConfig) -> None:
    """The data config owns the class list: its lengths must agree with ``num_classes``."""
    for key in ("class_names", "palette"):
        if len(data[key]) != data.num_classes:
            raise ValueError(
                f"data.{key} has {len(data[key])} entries but data.num_classes={data.num_classes}; "
                "give one per class"
            )


def check_command_line(config_name: str, arguments: list[str]) -> str | None:
    """An error message naming a misspelt config key and its closest existing keys, or None.

    Hydra already answers an unknown group option with the list of options, and an unknown
    key with "not in struct"; this adds the keys the user probably meant.
    """
    if any(argument.startswith("-") for argument in arguments):
        return None  # --help, --cfg, -m ...: Hydra's own flags, left to Hydra
    overrides = [a for a in arguments if not a.startswith(("hydra.", "hydra/", "+", "~"))]
    with initialize_config_module(config_module="seg.configs", version_base="1.3"):
        try:
            compose(config_name=config_name, overrides=overrides)
            return None
        except ConfigCompositionException as error:
            match = re.search(r"Could not override '([^']+)'", str(error))
            if match is None:
                return None  # not an unknown key: Hydra's own message says it best
            key = match.group(1)
            others = [o for o in overrides if not o.startswith(f"{key}=")]
            try:
                known = flat_keys(compose(config_name=config_name, overrides=others))
            except ConfigCompositionException:
                return None
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return (
        f"Unknown config key '{key}' (from the command line).{hint} "
        f"`python {config_name}.py --cfg job` prints every key; +{key}=... adds a new one."
    )


def flat_keys(config: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key path in ``config`` (``trainer.max_iters``, ``data.dataset.seed``, ...)."""
    keys = []
    for key, value in config.items_ex(resolve=False):
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, DictConfig):
            keys += flat_keys(value, f"{path}.")
    return keys


def flat_values(config: DictConfig) -> dict[str, Any]:
    """Every leaf of ``config`` by dotted key, interpolations resolved."""

    def leaves(tree: dict, prefix: str):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(leaves(OmegaConf.to_container(config, resolve=True), ""))


def check_writable(directory: Path) -> None:
    """Fail before training when the run directory cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise PermissionError(
            f"cannot write to the run directory {directory} ({error.strerror or error}); "
            "choose a writable place with output_root=<dir> or hydra.run.dir=<dir>"
        ) from error


def build(config: DictConfig, **kwargs):
    """``instantiate`` for the entry points, re-raising a constructor's own error (a DataError
    naming a missing file, a ValueError listing options) instead of Hydra's wrapper around it."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as error:
        # DataError is a ValueError; ImportError: a tracker's optional package is missing
        if isinstance(error.__cause__, ValueError | OSError | ImportError):
            raise error.__cause__ from None
        raise


def run_command(
    config_name: str, hydra_main: Callable[[], None], arguments: list[str] | None = None
):
    """A console command: check the command line (close matches for misspelt keys), then hand
    it to the ``@hydra.main`` function."""
    arguments = sys.argv[1:] if arguments is None else arguments
    error = check_command_line(config_name, arguments)
    if error:
        sys.exit(error)
    sys.argv[1:] = arguments
    hydra_main()


def report_user_errors(job: Callable[[], Any], cfg: DictConfig | None = None) -> Any:
    """Run an entry point's job; a user error ends the command with its message alone (exit 1)
    instead of Hydra's "Error executing job" and a traceback around it. The traceback is logged
    at DEBUG level (``hydra.verbose=true`` shows it). ``cfg``: the job's config, whose required
    keys (``???``) are checked first."""
    try:
        if cfg is not None:
            check_required(cfg)
        return job()
    except USER_ERRORS as error:
        log.debug("Traceback of the error below", exc_info=True)
        log.error("%s", error)
        sys.exit(EXIT_USER_ERROR)


def check_required(cfg: DictConfig) -> None:
    """Refuse a config whose required keys (``???``: ``data.root`` of ``data=folder``,
    ``checkpoint`` of evaluate.py) are not set, naming them, instead of OmegaConf's error deep in
    the job (through an interpolation it names another key)."""
    # Not OmegaConf.missing_keys: it resolves interpolations, and fails at one to a missing key.
    missing = sorted(_missing_keys(OmegaConf.to_container(cfg, resolve=False)))
    if OmegaConf.select(cfg, "task.parts", default=None):
        # task=panoptic: the keys its parts name give the checkpoints (seg.restore.load_parts)
        missing = [key for key in missing if key != "checkpoint"]
    if missing:
        raise ValueError(
            f"Required but not set: {', '.join(missing)}. Give "
            f"{'each' if len(missing) > 1 else 'it'} on the command line, e.g. {missing[0]}=..."
        )


def _missing_keys(node: Any, prefix: str = "") -> Iterable[str]:
    """The dotted keys whose value is ``???`` in a container from ``OmegaConf.to_container``."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        if value == "???":
            yield f"{prefix}{key}"
        elif isinstance(value, dict | list):
            yield from _missing_keys(value, f"{prefix}{key}.")


# Values checked before any work, so that a wrong one fails naming its key instead of deep in
# training: key -> (type, minimum, whether the minimum itself is allowed, whether null is[, an
# exclusive maximum]).
# Keys that a config does not have are skipped.
VALUE_RULES = {
    "seed": (int, 0, True, False),
    "trainer.max_iters": (int, 1, True, False),
    "trainer.grad_accum_steps": (int, 1, True, False),
    "trainer.val_every": (int, 1, True, False),
    "trainer.ckpt_every": (int, 1, True, False),
    "trainer.log_every": (int, 1, True, False),
    "trainer.nonfinite_patience": (int, 1, True, False),
    "trainer.num_val_images": (int, 0, True, False),
    "trainer.clip_grad_norm": (float, 0, False, True),
    "trainer.ema_decay": (float, 0, False, True, 1),
    "trainer.early_stop_patience": (int, 1, True, True),
    "trainer.keep_checkpoints": (int, 0, True, False),
    "data.batch_size": (int, 1, True, False),
    "data.val_batch_size": (int, 1, True, False),
    "data.num_workers": (int, 0, True, False),
    "data.max_val_samples": (int, 1, True, True),
    # Exclusive maxima far beyond any useful value: an infinite or absurd rate makes the weights
    # non-finite at the first update while the loss still looked finite.
    "optimizer.lr": (float, 0, False, False, 100),
    "optimizer.weight_decay": (float, 0, True, False, 100),
    "optimizer.encoder_lr_mult": (float, 0, True, False, 1000),
}
# Keys with a fixed set of values (YAML's true/false are Python's True/False), checked with
# the rules above: ``trainer.precision=fp64`` fails naming the options before data or model
# are built.
CHOICES = {
    "trainer.precision": ("auto", "fp32", "fp16", "bf16"),
    "trainer.channels_last": ("auto", True, False),
    "trainer.compile": ("auto", True, False),
    "trainer.sync_bn": ("auto", True, False),
    "trainer.deterministic": (True, False),
    "trainer.best_checkpoint": ("full", "weights", "none"),
    "model.pretrained": (True, False),
    "optimizer.norm_bias_decay": (True, False),
}
ABSENT = object()  # OmegaConf.select's default: tells a missing key from a null one


def check_values(cfg: DictConfig, rules: dict = VALUE_RULES, choices: dict = CHOICES) -> None:
    """Refuse a wrong type, range or option before any work, naming the key, the value and
    what is allowed (``trainer.max_iters=abc``, ``data.batch_size=0``, ``optimizer.lr=-1``,
    ``trainer.precision=fp64``) and an unset required key."""
    check_required(cfg)
    for key, options in choices.items():
        value = OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=False)
        # ``1 in (True,)`` holds in Python: compare types too, so 1 is not taken for true.
        if value is ABSENT or any(value == o and type(value) is type(o) for o in options):
            continue
        shown = ", ".join(str(option).lower() for option in options)
        raise ValueError(f"{key}={value!r} is not allowed: options are {shown}")
    for key, (kind, minimum, inclusive, nullable, *maximum) in rules.items():
        value = OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=False)
        if value is ABSENT or (value is None and nullable):
            continue
        types = (int,) if kind is int else (int, float)
        # bool is an int to Python, but never a count or a rate
        valid = isinstance(value, types) and not isinstance(value, bool)
        above_minimum = valid and (value >= minimum if inclusive else value > minimum)
        if above_minimum and (not maximum or value < maximum[0]):
            continue
        expected = f"{'an integer' if kind is int else 'a number'} {'>=' if inclusive else '>'} "
        below = f" and < {maximum[0]}" if maximum else ""
        raise ValueError(
            f"{key}={value!r} is not allowed: give {expected}{minimum}{below}"
            f"{' or null' if nullable else ''}"
        )
