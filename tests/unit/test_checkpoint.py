import pickle

import pytest
import torch

from seg.engine.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
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


def test_latest_checkpoint_is_the_newest(tmp_path):
    import os

    assert find_latest_checkpoint(tmp_path) is None
    for i, run in enumerate(["a", "b", "c"]):
        save_checkpoint({"model": {}}, tmp_path / run / "checkpoints" / "last.pt")
        os.utime(
            tmp_path / run / "checkpoints" / "last.pt", (1000 + i * (-1 if run == "c" else 1),) * 2
        )
    assert find_latest_checkpoint(tmp_path) == tmp_path / "b" / "checkpoints" / "last.pt"
