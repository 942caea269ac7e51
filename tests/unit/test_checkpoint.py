import errno
import io
import os
import pickle
import warnings

import onnx
import pytest
import torch
from omegaconf import OmegaConf

from seg import checkpoint as checkpoint_module
from seg.checkpoint import (
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


class FillingDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: later writes fail with ENOSPC."""

    room = 0

    def write(self, data):
        left = self.room - self.tell()
        if left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(bytes(data[:left]))


@pytest.mark.parametrize("room", [1_000, 50_000])
def test_disk_filling_up_inside_torch_save_says_so_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, room
):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "iteration": 1}, path)
    FillingDisk.room = room  # torch.save reports the failed write as "unexpected pos"

    def filling_open(file, mode="r"):
        return io.BufferedWriter(FillingDisk(file, mode.replace("b", "")))  # as open() does

    monkeypatch.setattr(checkpoint_module, "open", filling_open, raising=False)
    state = {"model": {"weight": torch.zeros(100_000)}, "iteration": 2}
    with pytest.raises(OSError, match=r"cannot write checkpoint .*last.pt") as error:
        save_checkpoint(state, path)
    assert error.value.errno == errno.ENOSPC
    message = str(error.value)
    assert "No space left on device" in message and "unexpected pos" not in message
    assert "previous last.pt is intact" in message and "Free disk space" in message
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no partial temp file left


def test_a_torchscript_export_is_named_as_such(tmp_path):
    path = tmp_path / "model.pt"  # what scripts/export.py format=torchscript writes
    with pytest.warns(FutureWarning):  # torch.jit.trace is deprecated upstream
        traced = torch.jit.trace(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 4, 4))
    traced.save(str(path))
    with (
        warnings.catch_warnings(),  # and no warning from torch.load about TorchScript first
        pytest.raises(ValueError, match=r"TorchScript model.*torch.jit.load") as error,
    ):
        warnings.simplefilter("error")
        load_checkpoint(path)
    assert "expect a checkpoint written by train.py, e.g. <run>/checkpoints/best.pt" in str(
        error.value
    )
    assert "corrupted" not in str(error.value) and "run code" not in str(error.value)


def test_an_onnx_export_is_named_as_such(tmp_path):
    path = tmp_path / "model.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["logits"])],
        "seg",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    onnx.save(onnx.helper.make_model(graph, producer_name="pytorch"), path)
    with pytest.raises(ValueError, match=r"exported ONNX model: run it with onnxruntime") as error:
        load_checkpoint(path)
    assert "<run>/checkpoints/best.pt" in str(error.value)
    assert "corrupted" not in str(error.value) and "run code" not in str(error.value)


def test_incompatible_config_names_both_values():
    state = {"config": "data:\n  num_classes: 19\nmodel:\n  arch: Unet\n"}
    check_compatible(state, OmegaConf.create(state["config"]), "ck.pt")
    other = OmegaConf.create({"data": {"num_classes": 6}, "model": {"arch": "Unet"}})
    with pytest.raises(
        ValueError, match=r"data.num_classes=19 in the checkpoint but data.num_classes=6"
    ):
        check_compatible(state, other, "ck.pt")


def cuda_generators(count: int) -> list[torch.Tensor]:
    """Stand-ins for ``torch.cuda.get_rng_state_all()`` of ``count`` GPUs (distinct tensors)."""
    return [torch.full((16,), index, dtype=torch.uint8) for index in range(count)]


@pytest.mark.parametrize(
    ("world_size", "device", "expected"),
    [(8, "cuda", 0), (1, "cuda:3", 3), (1, "auto", 0)],
)
def test_a_checkpoint_with_every_gpus_generator_keeps_the_one_rank_0_trained_on(
    tmp_path, world_size, device, expected
):
    # Format 1 saved every visible GPU's generator: resumed where fewer GPUs are visible,
    # torch.cuda.set_rng_state_all raised IndexError.
    rng = {"torch": torch.get_rng_state(), "cuda": cuda_generators(8)}
    state = {"model": {}, "rng": rng, "world_size": world_size,
             "config": f"trainer:\n  device: {device}\n"}  # fmt: skip
    save_checkpoint(state, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["format_version"] == checkpoint_module.FORMAT_VERSION
    assert torch.equal(loaded["rng"][0]["cuda"], cuda_generators(8)[expected])


def test_a_cpu_checkpoint_of_format_1_has_no_cuda_generator(tmp_path):
    save_checkpoint({"model": {}, "rng": {"cuda": []}}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["rng"][0]["cuda"] is None


def test_rng_state_holds_only_this_process_generators():
    from seg.checkpoint import rng_state, set_rng_state

    state = rng_state(torch.device("cpu"))
    assert state["cuda"] is None
    expected = torch.rand(3)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_resume_takes_the_latest_iteration_whatever_the_file_times(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint({"model": {}, "iteration": 4}, checkpoints / "last.pt")
    save_checkpoint({"model": {}, "iteration": 2}, checkpoints / "best.pt")
    os.utime(checkpoints / "last.pt", (1000, 1000))  # as after `cp -r` or `touch best.pt`
    path, state = newest_loadable_checkpoint(tmp_path)
    assert path.name == "last.pt" and state["iteration"] == 4
    assert "over best.pt" in caplog.text
