"""Every option of every config group composes, and its object can be built."""

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seg.models import Segmenter
from seg.optim import build_optimizer
from seg.restore import follow_links
from tests.conftest import CONFIG_GROUPS, compose_config, group_options, hydra_context
from tests.unit.test_instance_data import write_coco
from tests.unit.test_instance_layouts import write_cityscapes_instances, write_instance_folder
from tests.unit.test_nifti import write_nifti
from tests.unit.test_panoptic_data import (
    write_cityscapes_panoptic,
    write_coco_panoptic,
    write_panoptic_folder,
)


def test_every_group_has_its_required_options():
    required = {
        "model": {"unet", "fcn", "deeplabv3", "deeplabv3plus"},
        "data": {"synthetic", "folder", "cityscapes"},
        "loss": {"ce", "dice", "focal", "ce_dice"},
        "optimizer": {"sgd", "adamw"},
        "scheduler": {"poly", "cosine"},
        "tracker": {"tensorboard", "mlflow"},
        "debug": {"tiny"},
        "experiment": {"cityscapes_unet"},
    }
    for group, options in required.items():
        assert options <= set(group_options(group)), group


@pytest.mark.parametrize("option", group_options("loss"))
def test_loss_configs_build(option):
    cfg = compose_config(f"loss={option}")
    loss_fn = instantiate(cfg.loss)
    logits = torch.randn(2, cfg.data.num_classes, 8, 8)
    assert torch.isfinite(loss_fn(logits, torch.randint(0, cfg.data.num_classes, (2, 8, 8))))


@pytest.mark.parametrize("option", group_options("optimizer"))
@pytest.mark.parametrize("scheduler", group_options("scheduler"))
def test_optimizer_and_scheduler_configs_build(option, scheduler):
    cfg = compose_config(f"optimizer={option}", f"scheduler={scheduler}")
    optimizer = build_optimizer(cfg.optimizer, torch.nn.Linear(3, 1))
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer)
    assert scheduler.get_last_lr()[0] == pytest.approx(cfg.optimizer.lr * _first_factor(cfg))


def _first_factor(cfg) -> float:
    return cfg.scheduler.warmup_ratio if cfg.scheduler.warmup_iters > 0 else 1.0


def test_data_configs_build(
    folder_root, cityscapes_root, camvid_root, voc_root, ade20k_root, tmp_path
):
    for split in ("train2017", "train", "val"):  # the classes come from train2017
        write_coco(tmp_path / "coco", split)
    for split in ("train", "val"):
        write_instance_folder(tmp_path / "instance_folder", split, classes=False)
        write_cityscapes_instances(tmp_path / "cityscapes_instances", split)
        write_cityscapes_panoptic(tmp_path / "cityscapes_panoptic", split)
        write_panoptic_folder(tmp_path / "panoptic_folder", split)
    for split in ("train2017", "train", "val"):
        write_coco_panoptic(tmp_path / "coco_panoptic", split)
    roots = {
        "coco_instances": tmp_path / "coco",
        "instance_folder": tmp_path / "instance_folder",
        "cityscapes_instances": tmp_path / "cityscapes_instances",
        "folder": folder_root,
        "cityscapes": cityscapes_root,
        "camvid": camvid_root,
        "voc": voc_root,
        "ade20k": ade20k_root,
        "nifti": write_nifti(tmp_path / "nifti"),
        "synthetic": None,
        "synthetic_instances": None,
        "coco_panoptic": tmp_path / "coco_panoptic",
        "coco_panoptic_semantic": tmp_path / "coco_panoptic",
        "coco_panoptic_instances": tmp_path / "coco_panoptic",
        "cityscapes_panoptic": tmp_path / "cityscapes_panoptic",
        "panoptic_folder": tmp_path / "panoptic_folder",
        "synthetic_panoptic": None,
        "synthetic_panoptic_semantic": None,
        "synthetic_panoptic_instances": None,
    }
    assert set(roots) == set(group_options("data"))
    for option, root in roots.items():
        cfg = compose_config(f"data={option}", *([f"data.root={root}"] if root else []))
        for split, transform in (("train", "train_transform"), ("val", "val_transform")):
            dataset = instantiate(
                cfg.data.dataset, split=split, transform=instantiate(cfg.data[transform])
            )
            # (image, mask), or (image, instance-ID map, instance table) for instance data
            image, mask = dataset[0][:2]
            # stored pixels in transit (uint8 photos): normalized and widened on the device
            assert image.dtype in (torch.uint8, torch.uint16)
            assert image.shape[0] == getattr(dataset, "in_channels", 3)
            assert mask.dtype in (torch.uint8, torch.int16) and mask.shape == image.shape[1:]
        assert len(cfg.data.class_names) == len(cfg.data.palette) == cfg.data.num_classes


@pytest.mark.parametrize("option", group_options("experiment") + group_options("debug"))
def test_experiment_and_debug_configs_compose_and_build(option):
    group = "experiment" if option in group_options("experiment") else "debug"
    cfg = compose_config(f"{group}={option}")
    # No download in tests: the experiment's pretrained encoder is switched off here.
    model = instantiate(cfg.model, pretrained=False)
    assert isinstance(model, Segmenter)
    instantiate(cfg.trainer, _partial_=True)  # every trainer key is a Trainer argument
    instantiate(cfg.data.train_transform)


def test_cityscapes_experiment_is_a_real_recipe():
    cfg = compose_config("experiment=cityscapes_unet")
    assert cfg.data.dataset._target_.endswith("Cityscapes")
    assert list(cfg.data.train_transform.crop_size) == [512, 1024]
    assert list(cfg.data.train_transform.scale_range) == [0.5, 2.0]
    assert cfg.scheduler._target_.endswith("poly")
    assert 40_000 <= cfg.trainer.max_iters <= 80_000


def test_unknown_group_option_lists_the_options():
    with pytest.raises(MissingConfigException, match=r"Available options") as error:
        compose_config("model=unet3000")
    assert "deeplabv3plus" in str(error.value)


def test_unknown_key_fails_before_any_work():
    with pytest.raises(ConfigCompositionException, match=r"trainer.max_iter"):
        compose_config("trainer.max_iter=5")


def test_groups_are_all_in_the_train_defaults():
    cfg = compose_config()
    for group in CONFIG_GROUPS[:7]:  # debug and experiment default to null
        assert group in cfg


def test_misspelt_key_gets_close_matches():
    from seg.config import check_command_line

    message = check_command_line("train", ["model=fcn", "trainer.max_iter=5"])
    assert "Unknown config key 'trainer.max_iter'" in message and "trainer.max_iters" in message
    assert "data.batch_size" in check_command_line("train", ["data.batchsize=2"])
    assert check_command_line("train", ["trainer.max_iters=5", "model=fcn"]) is None
    assert check_command_line("evaluate", ["checkpoint=x.pt", "split=test"]) is None


def test_non_writable_run_directory(tmp_path):
    from seg.config import check_writable

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match=r"cannot write to the run directory .*output_root"):
        check_writable(blocker / "run")


def test_a_training_command_that_no_longer_composes_is_named_when_keys_change(caplog):
    stored = OmegaConf.create({"data": {"root": "/old", "dataset": {"root": "/old"}}})
    with hydra_context():
        follow_links(stored, ["model=renamed_since"], [])
        assert "no longer composes" not in caplog.text  # nothing changed: nothing to say
        follow_links(stored, ["model=renamed_since"], ["data.root"])
    assert "no longer composes" in caplog.text and ": data.root reach only" in caplog.text
    assert stored.data.dataset.root == "/old"  # no link known: left as stored


@pytest.mark.parametrize(("cpus", "workers"), [(2, 2), (16, 4)])
def test_data_workers_default_to_4_or_the_cpus_there_are(monkeypatch, cpus, workers):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    # 4 workers on a 2-core machine only competed with the training process for its cores
    for data in ("folder", "cityscapes", "voc", "coco_instances"):
        assert compose_config(f"data={data}", "data.root=x").data.num_workers == workers, data
    assert compose_config("data=folder", "data.num_workers=3").data.num_workers == 3
