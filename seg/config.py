"""Config plumbing shared by the entry points: command-line overrides and sanity checks."""

from collections.abc import Iterable

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf


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


def check_data_config(data: DictConfig) -> None:
    """The data config owns the class list: its lengths must agree with ``num_classes``."""
    for key in ("class_names", "palette"):
        if len(data[key]) != data.num_classes:
            raise ValueError(
                f"data.{key} has {len(data[key])} entries but data.num_classes={data.num_classes}; "
                "give one per class"
            )
