import errno
import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from seg.engine import checkpoint as checkpoint_module
from seg.engine.checkpoint import (
    check_compatible,
    load_checkpoint,
    newest_loadable_checkpoint,
    save_checkpoint,
    unwrapped_state_dict,
)


def test_round_trip_with_weights_only(tmp_path):
    model = torch.nn.Linear(2, 3)
    state = {"model": unwrapped_state_dict(model), "iteration": 5, "config": "a: 1\n"}
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["iteration"] == 5 and torch.equal(loaded["model"]["weight"], model.weight)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_wrapper_prefixes_are_removed(tmp_path):
    wrapped = torch.nn.Sequential()
    wrapped.add_module("module", torch.nn.Sequential())
    wrapped.module.add_module("_orig_mod", torch.nn.Linear(2, 2))
    state = unwrapped_state_dict(wrapped)
    assert set(state) == {"weight", "bias"}
    save_checkpoint({"model": wrapped.state_dict()}, tmp_path / "x.pt")
    assert set(load_checkpoint(tmp_path / "x.pt")["model"]) == {"weight", "bias"}


class Exploit:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as file:
        pickle.dump({"model": {}, "payload": Exploit()}, file)
    with pytest.raises(ValueError, match=r"refused"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"corrupted or truncated"):
        load_checkpoint(path)


def test_newest_loadable_checkpoint_skips_unreadable_ones(tmp_path, caplog):
    assert newest_loadable_checkpoint(tmp_path) is None
    for i, run in enumerate(["a", "b", "c"]):
        path = tmp_path / run / "checkpoints" / "last.pt"
        save_checkpoint({"model": {}, "run": run}, path)
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "c" / "checkpoints" / "last.pt").write_bytes(b"garbage")
    path, state = newest_loadable_checkpoint(tmp_path)
    assert path == tmp_path / "b" / "checkpoints" / "last.pt" and state["run"] == "b"
    assert "c/checkpoints/last.pt" in caplog.text


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "iteration": 1}, path)

    def disk_full(state, file):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"No space left on device.*previous last.pt is intact"):
        save_checkpoint({"model": {}, "iteration": 2}, path)
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_incompatible_config_names_both_values():
    state = {"config": "data:\n  num_classes: 19\nmodel:\n  arch: Unet\n"}
    check_compatible(state, OmegaConf.create(state["config"]), "ck.pt")
    other = OmegaConf.create({"data": {"num_classes": 6}, "model": {"arch": "Unet"}})
    with pytest.raises(
        ValueError, match=r"data.num_classes=19 in the checkpoint but data.num_classes=6"
    ):
        check_compatible(state, other, "ck.pt")
