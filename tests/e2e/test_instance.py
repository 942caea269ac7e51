"""task=instance end to end on the CPU: Mask R-CNN (debug=tiny's MobileNetV3 one) trains on the
synthetic instances through the same Trainer, resumes bit for bit (1 and 2 processes),
evaluates with COCOeval, and 2 processes score exactly what one does."""

import json

import pytest
from PIL import Image

from seg import export, predict
from seg.checkpoint import load_checkpoint
from seg.data.synthetic import SyntheticScenes
from tests.conftest import run_evaluation, run_training
from tests.e2e.test_distributed import assert_same_weights, torchrun
from tests.e2e.test_distributed_eval import torchrun as torchrun_script
from tests.e2e.test_evaluate_predict_export import run_entry

INSTANCE = ("task=instance",)
# Fewer anchors and proposals sampled than a 64-pixel crop has: which ones the samplers draw
# depends on the random state (with all of them taken, any state would do).
FEW_SAMPLES = ("model.rpn_batch_size=16", "model.roi_batch_size=16")
KEYS = ("mask_AP", "mask_AP50", "mask_AP75", "box_AP", "mask_AP_class", "box_AP_class")


@pytest.fixture(scope="module")
def instance_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("instance") / "run"
    run_training(run_dir, *INSTANCE, "data.dataset.num_samples.val=5", "data.max_val_samples=null")
    return run_dir


def test_a_tiny_instance_run_trains_and_validates_with_coco_ap(instance_run):
    lines = [json.loads(line) for line in (instance_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4]
    assert list(lines[0])[:2] == ["iteration", "mask_AP"]  # the primary metric first
    assert set(KEYS) <= set(lines[0]) and lines[0]["images"] == 5
    state = load_checkpoint(instance_run / "checkpoints/last.pt")
    assert state["metric"] == "mask_AP" and state["iteration"] == 4


def test_evaluate_reports_the_validation_coco_ap(instance_run, tmp_path):
    lines = (instance_run / "metrics.jsonl").read_text().splitlines()
    validated = json.loads(lines[-1])
    out = tmp_path / "ap.json"
    result = run_evaluation(f"checkpoint={instance_run / 'checkpoints/last.pt'}", f"out={out}")
    for key in KEYS:
        assert result[key] == validated[key], key
    written = json.loads(out.read_text())
    assert written["mask_AP"] == result["mask_AP"] and written["images"] == 5
    report = instance_run / "eval_val_last"
    assert (report / "per_image.csv").read_text().count("\n") == 6  # header + 5 images


def test_an_instance_run_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path):
    # Mask R-CNN's samplers draw randperm on data-dependent counts: the checkpoint's RNG state
    # must be the one the run had, or the resumed run samples other proposals.
    # Both validate at iteration 2 (debug=tiny): a validation's DataLoader draws a seed from
    # the global RNG, as it does in an uninterrupted run.
    common = (*INSTANCE, "scheduler.max_iters=4", *FEW_SAMPLES)
    run_training(tmp_path / "straight", *common)
    stopped = tmp_path / "stopped"
    run_training(stopped, *common, "trainer.max_iters=2")
    run_training(stopped, *common, f"resume={stopped / 'checkpoints/last.pt'}",
                 "trainer.max_iters=4")  # fmt: skip
    assert_same_weights(tmp_path / "straight", stopped)


def test_two_processes_resume_exactly_with_each_ranks_own_random_state(tmp_path):
    common = (*INSTANCE, "scheduler.max_iters=4", *FEW_SAMPLES)
    torchrun(tmp_path / "out", f"hydra.run.dir={tmp_path / 'straight'}", *common)
    stopped = tmp_path / "stopped"
    torchrun(tmp_path / "out", f"hydra.run.dir={stopped}", *common, "trainer.max_iters=2")
    state = load_checkpoint(stopped / "checkpoints/last.pt")
    assert len(state["rng"]) == 2  # one per rank
    torchrun(tmp_path / "out", f"resume={stopped / 'checkpoints/last.pt'}", *common,
             "trainer.max_iters=4")  # fmt: skip
    assert_same_weights(tmp_path / "straight", stopped)


def test_two_processes_score_exactly_what_one_does(instance_run, tmp_path):
    checkpoint = instance_run / "checkpoints/last.pt"
    single = run_evaluation(f"checkpoint={checkpoint}", f"report_dir={tmp_path / 'one'}",
                            "data.val_batch_size=2")  # fmt: skip
    out = tmp_path / "two.json"
    # 5 images, batches of 2: the ranks' batches (0, 2 | 4 and 1, 3) are not one process's
    torchrun_script("evaluate.py", f"checkpoint={checkpoint}", f"out={out}",
                    f"report_dir={tmp_path / 'two'}", "data.val_batch_size=2")  # fmt: skip
    two = json.loads(out.read_text())
    for key in KEYS:
        assert two[key] == single[key], key


def test_predict_and_export_say_what_they_do_for_instance_checkpoints(instance_run, tmp_path):
    checkpoint = instance_run / "checkpoints/last.pt"
    image = tmp_path / "scene.png"
    Image.fromarray(SyntheticScenes("test", image_size=32).load(0)[0]).save(image)
    with pytest.raises(ValueError, match=r"predict.py writes nothing yet .* instance task"):
        run_entry(predict, "predict", f"checkpoint={checkpoint}", f"input={image}")
    with pytest.raises(ValueError, match=r"export.py does not yet export models of the instance"):
        run_entry(export, "export", f"checkpoint={checkpoint}")
