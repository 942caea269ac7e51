"""evaluate (slide, TTA, report), predict (formats, bad inputs) and export (verified) end to end."""

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from seg import export, predict, prediction
from seg.checkpoint import load_checkpoint
from seg.data.synthetic import PALETTE, SyntheticScenes
from seg.inference import Predictor
from seg.models import Segmenter
from tests.conftest import REPO, hydra_context, run_evaluation, run_training

VAL_IMAGES = 8  # the val split of the checkpoint's data; its training validated on 4 (debug=tiny)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("outputs") / "run"
    run_training(
        run_dir, "model.encoder_name=resnet18", f"data.dataset.num_samples.val={VAL_IMAGES}"
    )
    return run_dir / "checkpoints" / "best.pt"


@pytest.fixture
def own_run(checkpoint, tmp_path):
    """A copy of the checkpoint in a run directory of its own, for tests that write beside it."""
    copy = tmp_path / "run" / "checkpoints" / "best.pt"
    copy.parent.mkdir(parents=True)
    shutil.copy(checkpoint, copy)
    return copy


def run_entry(module, config_name, *overrides):
    with hydra_context():
        return module.run(compose(config_name, overrides=list(overrides)), list(overrides))


def test_evaluate_writes_the_report_and_figures(checkpoint, tmp_path):
    out = tmp_path / "metrics.json"
    result = run_evaluation(f"checkpoint={checkpoint}", f"out={out}", "num_worst=2")
    low, high = json.loads(out.read_text())["mIoU_ci95"]
    assert low <= result["mIoU"] <= high
    report = checkpoint.parent.parent / "eval_val_best"
    with open(report / "per_image.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == result["images"] == VAL_IMAGES  # the whole split
    assert set(rows[0]) >= {"image", "mIoU", "aAcc", "IoU/disc"}
    for name in ("confusion", "iou", "worst"):
        with Image.open(report / f"{name}.png") as picture:
            picture.verify()  # a valid PNG
    # training validation wrote the same figures
    for name in ("confusion", "iou", "worst"):
        assert (checkpoint.parent.parent / "figures" / f"val_{name}.png").is_file()


def test_evaluate_slide_and_tta(checkpoint, tmp_path):
    whole = run_evaluation(f"checkpoint={checkpoint}", f"report_dir={tmp_path / 'a'}")
    # windows as large as the (96x96) val images: the same as whole-image inference
    slide = run_evaluation(
        f"checkpoint={checkpoint}", "mode=slide", "crop=[96,96]", f"report_dir={tmp_path / 'b'}"
    )
    assert slide["mIoU"] == pytest.approx(whole["mIoU"], abs=1e-9)
    tta = run_evaluation(
        f"checkpoint={checkpoint}", "mode=slide", "crop=[64,64]", "scales=[0.75,1.0]", "flip=true",
        f"report_dir={tmp_path / 'c'}",
    )  # fmt: skip
    assert 0 <= tta["mIoU"] <= 1


def test_predict_writes_three_formats_and_skips_unreadable_files(checkpoint, tmp_path):
    images = tmp_path / "in"
    (images / "nested").mkdir(parents=True)
    for i, size in enumerate((96, 96, 72)):
        image, _ = SyntheticScenes("test", image_size=size).load(i)
        folder = images / "nested" if i == 2 else images
        Image.fromarray(image).save(folder / f"scene{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    counts = run_entry(
        predict, "predict", f"checkpoint={checkpoint}", f"input={images}", f"output={out}"
    )
    assert counts == {"written": 3, "skipped": 1}
    index = np.asarray(Image.open(out / "index" / "nested" / "scene2.png"))
    assert index.shape == (72, 72) and index.max() < 6
    color = np.asarray(Image.open(out / "color" / "nested" / "scene2.png"))
    assert color.shape == (72, 72, 3)
    assert np.array_equal(color, np.array(PALETTE, np.uint8)[index])
    overlay = np.asarray(Image.open(out / "overlay" / "scene0.png"))
    assert overlay.shape == (96, 96, 3)


def test_predict_refuses_unknown_formats_and_empty_inputs(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="options"):
        run_entry(
            predict, "predict", f"checkpoint={checkpoint}", f"input={tmp_path}", "format=[heatmap]"
        )
    with pytest.raises(FileNotFoundError, match="no image files"):
        run_entry(predict, "predict", f"checkpoint={checkpoint}", f"input={tmp_path}/*.png")


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_export_matches_pytorch(checkpoint, tmp_path, format, caplog, capfd):
    output = tmp_path / f"model.{format}"
    with caplog.at_level(logging.INFO, logger="seg.export"):
        report = run_entry(
            export, "export", f"checkpoint={checkpoint}", f"format={format}", f"output={output}",
            "verify_split=val",
        )  # fmt: skip
    verification = report["verification"]
    assert verification["passed"] and verification["max_abs_diff"] < 1e-3
    assert len(verification["inputs"]) == 3  # traced size, off-stride size, another batch size
    assert verification["mIoU_exported"] == pytest.approx(verification["mIoU_pytorch"], abs=1e-3)
    # says why it may differ from evaluate.py's mIoU
    assert "val mIoU in fp32 on the CPU" in caplog.text and "precision, e.g. bf16" in caplog.text
    assert "[torch.onnx]" not in capfd.readouterr().out  # no exporter internals
    sidecar = json.loads(output.with_suffix(".json").read_text())
    # the JSON names every file the export wrote (ONNX: one file, weights embedded)
    assert sorted(sidecar["files"]) == sorted(path.name for path in tmp_path.iterdir())
    assert sidecar["files"][0] == output.name
    assert sidecar["class_names"][1] == "disc" and sidecar["input"]["mean"] == [0.485, 0.456, 0.406]
    exported = export.ExportedModel(output, format)
    assert exported(torch.randn(1, 3, 50, 40)).shape == (1, 6, 50, 40)


def test_export_never_writes_over_the_checkpoint(own_run):
    original, iteration = own_run.read_bytes(), load_checkpoint(own_run)["iteration"]
    for _ in range(2):  # the second export replaces the first one's file: that is allowed
        report = run_entry(export, "export", f"checkpoint={own_run}", "format=torchscript")
        assert report["verification"]["passed"]
    assert own_run.read_bytes() == original and load_checkpoint(own_run)["iteration"] == iteration
    exported = own_run.with_name("best.torchscript.pt")
    assert report["files"] == ["best.torchscript.pt", "best.torchscript.json"]
    assert export.ExportedModel(exported, "torchscript")(torch.randn(1, 3, 64, 64)).shape == (
        1, 6, 64, 64,
    )  # fmt: skip
    other = own_run.with_name("last.pt")
    shutil.copy(own_run, other)
    for output, message in (
        (own_run, r"output=.*best.pt is the checkpoint being exported.*best.torchscript.pt"),
        (own_run.parent / ".." / "checkpoints" / "best.pt", "is the checkpoint being exported"),
        (other, r"output=.*last.pt is a seg checkpoint"),
    ):
        with pytest.raises(ValueError, match=message):
            run_entry(
                export, "export", f"checkpoint={own_run}", "format=torchscript", f"output={output}"
            )
    assert own_run.read_bytes() == original and other.read_bytes() == original


def test_onnx_weights_go_to_a_sidecar_file_only_past_the_size_limit(tmp_path, monkeypatch):
    model = Segmenter(nn.Conv2d(3, 2, 1), stride=1).eval()
    sample = torch.randn(1, 3, 8, 8)
    path = tmp_path / "model.onnx"
    monkeypatch.setattr(export, "ONNX_EMBED_LIMIT", 0)  # as if the weights were over 2 GB
    assert export.export_model(model, sample, path, "onnx", False) == [
        path, tmp_path / "model.onnx.data",
    ]  # fmt: skip
    external = export.ExportedModel(path, "onnx")(sample)
    monkeypatch.undo()
    assert export.export_model(model, sample, path, "onnx", False) == [path]
    assert sorted(tmp_path.iterdir()) == [path]  # the stale weights file went with the old export
    assert torch.allclose(export.ExportedModel(path, "onnx")(sample), external)


def test_evaluate_covers_the_whole_split_unless_its_command_line_limits_it(checkpoint, caplog):
    common = (f"checkpoint={checkpoint}", "bootstrap=0", "num_worst=0")
    # the training config's data.max_val_samples=4 (debug=tiny) is not inherited
    assert run_evaluation(*common)["images"] == VAL_IMAGES
    assert "Evaluating the first" not in caplog.text
    for key in ("max_samples", "data.max_val_samples"):
        caplog.clear()
        assert run_evaluation(*common, f"{key}=3")["images"] == 3
        assert f"first 3 of the {VAL_IMAGES} images of split 'val' ({key}=3" in caplog.text
        assert (checkpoint.parent.parent / "eval_val_best_first3" / "per_image.csv").is_file()
        with pytest.raises(ValueError, match=rf"{key}=0: .*\(>= 1\), or null for the whole split"):
            run_evaluation(*common, f"{key}=0")
    assert run_evaluation(*common, "data.max_val_samples=null")["images"] == VAL_IMAGES
    with pytest.raises(ValueError, match=r"max_samples and data\.max_val_samples both"):
        run_evaluation(*common, "max_samples=2", "data.max_val_samples=3")


def test_reports_with_different_settings_get_folders_of_their_own(own_run, caplog):
    caplog.set_level(logging.INFO)
    run_dir = own_run.parent.parent
    common = (f"checkpoint={own_run}", "bootstrap=0", "num_worst=0", "max_samples=2")
    run_evaluation(*common)
    run_evaluation(*common, "mode=slide", "crop=[64,64]")
    run_evaluation(*common, "scales=[0.75,1.0]", "flip=true")
    reports = sorted(p.name for p in run_dir.glob("eval_*"))
    assert reports == [
        "eval_val_best_first2",
        "eval_val_best_scales0.75-1_flip_first2",
        "eval_val_best_slide-crop64x64-stride42x42_first2",
    ]
    for name in reports:
        assert (run_dir / name / "per_image.csv").is_file()
    # the same settings again replace their report, and their TensorBoard images
    assert "Replacing" not in caplog.text
    summary = run_evaluation(*common)
    assert f"Replacing the earlier report in {run_dir / reports[0]}" in caplog.text
    # the run's TensorBoard: the metrics and pictures, at the checkpoint's iteration, once
    events = EventAccumulator(str(run_dir / "tb" / reports[0]))
    events.Reload()
    iteration = load_checkpoint(own_run)["iteration"]
    assert [event.step for event in events.Images(f"{reports[0]}/confusion")] == [iteration]
    (mIoU,) = events.Scalars(f"{reports[0]}/mIoU")
    assert (mIoU.step, mIoU.value) == (iteration, pytest.approx(summary["mIoU"]))
    assert f"{reports[0]}_class/IoU/disc" in events.Tags()["scalars"]


def cpu_out_of_memory(self, images):
    raise RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 26214400000 bytes"
    )


def test_evaluate_logs_progress_and_explains_running_out_of_memory(
    checkpoint, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no terminal: progress as log lines
    caplog.set_level(logging.INFO)
    common = (f"checkpoint={checkpoint}", "bootstrap=0", "num_worst=0", f"report_dir={tmp_path}")
    run_evaluation(*common)
    assert f"evaluate: {VAL_IMAGES}/{VAL_IMAGES} images (100%)" in caplog.text
    monkeypatch.setattr(Predictor, "forward", cpu_out_of_memory)
    with pytest.raises(
        MemoryError,
        match=r"out of memory on synthetic/val/0, synthetic/val/1 \(96x96 pixels, batch of 2\): "
        r"use mode=slide.*or a smaller data.val_batch_size",
    ):
        run_evaluation(*common)


def scene(index: int) -> np.ndarray:
    return SyntheticScenes("test", image_size=96).load(index)[0]


def test_predict_keeps_the_suffix_where_outputs_would_clash(checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(scene(0)).save(images / "img.jpg")
    Image.fromarray(scene(1)).save(images / "img.png")
    Image.fromarray(scene(2)).save(images / "other.png")
    out = tmp_path / "out"
    counts = run_entry(
        predict, "predict", f"checkpoint={checkpoint}", f"input={images}", f"output={out}",
        "format=[index]",
    )  # fmt: skip
    written = sorted(path.name for path in (out / "index").iterdir())
    assert written == ["img.jpg.png", "img.png.png", "other.png"]
    assert counts == {"written": len(written), "skipped": 0}
    assert "2 inputs differ only in their suffix" in caplog.text


def test_output_names_that_would_still_clash_are_refused(tmp_path):
    base = tmp_path / "in"
    files = [base / "a" / "x.png", base / "b" / "x.jpg", base / "b" / "x.png"]
    paths, renamed = prediction.output_paths(files, base)
    assert [str(path) for path in paths] == ["a/x.png", "b/x.jpg.png", "b/x.png.png"]
    assert renamed == files[1:]
    # format=cityscapes writes one flat folder: a/x.png and b/x.png meet there
    with pytest.raises(ValueError, match=r"a/x.png and .*b/x.png -> x.png"):
        prediction.refuse_clashes([files[0], files[2]], [files[0].relative_to(base / "a")] * 2, "")


def test_predict_skips_a_zero_byte_image_and_lists_it_at_the_end(checkpoint, tmp_path, caplog):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(scene(0)).save(images / "scene.png")
    (images / "empty.png").write_bytes(b"")
    counts = run_entry(
        predict, "predict", f"checkpoint={checkpoint}", f"input={images}",
        f"output={tmp_path / 'out'}", "format=[index]",
    )  # fmt: skip
    assert counts == {"written": 1, "skipped": 1}
    report = caplog.records[-1].getMessage()
    assert report.startswith("Skipped 1 unreadable files:") and str(images / "empty.png") in report
    assert caplog.text.count("empty.png") == 1  # there only (it was also told when met)


def test_predict_explains_running_out_of_memory_and_slide_avoids_it(
    checkpoint, tmp_path, monkeypatch
):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(scene(0)).save(images / "small.png")
    Image.fromarray(scene(1)).resize((200, 120)).save(images / "huge.png")
    forward = Predictor.forward

    def limited(self, batch):  # a device that holds 96x96 inputs only
        if batch.shape[-2] * batch.shape[-1] > 96 * 96:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(self, batch)

    monkeypatch.setattr(Predictor, "forward", limited)
    common = (f"checkpoint={checkpoint}", f"input={images}", f"output={tmp_path / 'out'}",
              "format=[index]")  # fmt: skip
    with pytest.raises(
        MemoryError,
        match=r"huge.png \(200x120 pixels, batch of 1\): use mode=slide.*or a smaller batch_size",
    ):
        run_entry(predict, "predict", *common)
    counts = run_entry(predict, "predict", *common, "mode=slide", "crop=[96,96]")
    assert counts == {"written": 2, "skipped": 0}


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        ("evaluate.py", ["mode=slide", "crop=[64,64]", "stride=[0,0]"], "stride=[0, 0]"),
        ("predict.py", ["input=nowhere/*.png"], "input=nowhere/*.png: no image files"),
        ("scripts/export.py", ["format=torchscript", "output={checkpoint}"],
         "is the checkpoint being exported"),
    ],
)  # fmt: skip
def test_a_user_error_ends_the_command_with_one_line(own_run, script, arguments, message):
    arguments = [argument.format(checkpoint=own_run) for argument in arguments]
    result = subprocess.run(
        [sys.executable, script, f"checkpoint={own_run}", *arguments],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert message in output
    assert "Traceback" not in output and "Error executing job" not in output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["train.py", "data=folder", "output_root={tmp}/outputs"], "Required but not set: data.root."),
        (["evaluate.py"], "Required but not set: checkpoint."),
        (["predict.py", "checkpoint=x.pt"], "Required but not set: input."),
        (["scripts/export.py"], "Required but not set: checkpoint."),
    ],
)  # fmt: skip
def test_an_unset_required_key_is_named_in_one_line(tmp_path, arguments, message):
    # (was OmegaConf's MissingMandatoryValue in a 30-line traceback, for data=folder naming
    # data.dataset.root, the key that copies data.root)
    result = subprocess.run(
        [sys.executable, *(argument.format(tmp=tmp_path) for argument in arguments)],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert message in output
    assert "Traceback" not in output and "Error executing job" not in output
    assert not (tmp_path / "outputs").exists()  # train.py's run directory is gone again


def test_data_overrides_reach_the_keys_that_copied_them(folder_root, tmp_path):
    # The checkpoint stores its config resolved (data.dataset.root is a path, not ${data.root}):
    # evaluate's data.root=... must still move the dataset, and data.cache_dir=... turn on the
    # dataset's cache.
    run_dir = tmp_path / "outputs" / "run"
    run_training(run_dir, "data=folder", f"data.root={folder_root}", "model.encoder_name=resnet18")
    moved = tmp_path / "moved"  # the dataset in another place (folder_root is tmp_path)
    for folder in ("images", "masks"):
        shutil.move(folder_root / folder, moved / folder)
    cache = tmp_path / "cache"
    result = run_evaluation(
        f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"data.root={moved}",
        f"data.cache_dir={cache}", "bootstrap=0", "num_worst=0",
    )  # fmt: skip
    assert result["images"] == 2
    assert any(cache.rglob("*.npy"))
