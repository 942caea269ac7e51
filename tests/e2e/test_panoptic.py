"""task=panoptic end to end on the CPU: a tiny semantic and a tiny instance model trained on
data=synthetic_panoptic's scenes, merged and scored by evaluate.py; the report's COCO panoptic
files score the same with seg.panoptic; 2 processes (torchrun, gloo) score what one does."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose
from PIL import Image

from seg import panoptic, predict, train
from seg.data.synthetic import SyntheticPanoptic
from seg.tasks.panoptic import PanopticTask
from tests.conftest import REPO, hydra_context, run_evaluation, run_training
from tests.e2e.test_distributed_eval import torchrun
from tests.e2e.test_evaluate_predict_export import run_entry

VAL = "data.dataset.num_samples.val=5"  # odd: the two processes' shares differ


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic")
    run_training(root / "semantic", "data=synthetic_panoptic_semantic", VAL)
    run_training(root / "instance", "task=instance", "data=synthetic_panoptic_instances", VAL)
    return (f"semantic={root / 'semantic/checkpoints/last.pt'}",
            f"instance={root / 'instance/checkpoints/last.pt'}")  # fmt: skip


def test_evaluate_merges_two_checkpoints_and_its_files_score_the_same(
    checkpoints, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "pq.json"
    result = run_evaluation("task=panoptic", *checkpoints, VAL, f"out={out}",
                            f"report_dir={tmp_path / 'report'}")  # fmt: skip
    written = json.loads(out.read_text())
    assert written["images"] == 5 and written["PQ"] == result["PQ"]
    assert list(written)[:2] == ["checkpoints", "split"] and len(written["checkpoints"]) == 2
    assert set(result["PQ_class"]) == {"sky", "grass", "sand", "disc", "box", "triangle"}
    report = tmp_path / "report"
    stats, categories = panoptic.score_folders(
        report / "panoptic_gt.json", report / "panoptic_gt",
        report / "panoptic_pred.json", report / "panoptic_pred",
    )  # fmt: skip
    assert stats[:, :3].sum() > 0  # segments were matched or counted
    scored = panoptic.pq_from_stats(stats, categories)
    for group, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for key in ("pq", "sq", "rq"):
            assert result[f"{key.upper()}{suffix}"] == pytest.approx(
                scored[group][key], nan_ok=True
            )
    for category in categories:
        assert result["PQ_class"][category.name] == pytest.approx(
            scored["per_class"][category.id]["pq"], nan_ok=True
        )
    # and the official code (cityscapesscripts) on seg's own predictions
    pytest.importorskip("cityscapesscripts.evaluation.evalPanopticSemanticLabeling")
    from tests.unit.test_panoptic_quality import assert_equal, official

    files = [report / name for name in ("panoptic_gt.json", "panoptic_gt", "panoptic_pred.json",
                                        "panoptic_pred")]  # fmt: skip
    assert_equal(scored, official(monkeypatch, capsys, tmp_path, *files))
    assert (report / "per_image.csv").read_text().count("\n") == 6
    assert (report / "examples.png").is_file()


def test_predict_writes_the_panoptic_pngs_evaluate_scored_and_their_json(checkpoints, tmp_path):
    report = tmp_path / "report"
    run_evaluation("task=panoptic", *checkpoints, VAL, f"report_dir={report}")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        image, _ = SyntheticPanoptic("val").load(i)
        Image.fromarray(image).save(inputs / f"{i:06d}.png")
    out = tmp_path / "out"
    counts = run_entry(predict, "predict", "task=panoptic", *checkpoints, f"input={inputs}",
                       f"output={out}")  # fmt: skip
    assert counts == {"written": 2, "skipped": 0}
    written = json.loads((out / "panoptic.json").read_text())
    assert [a["image_id"] for a in written["annotations"]] == ["000000", "000001"]
    assert {c["name"]: c["isthing"] for c in written["categories"]}["disc"] == 1
    for annotation in written["annotations"]:
        ids = panoptic.read_ids(out / "panoptic", annotation)
        # the merge evaluate scored, pixel for pixel; every PNG id listed, and only those
        assert np.array_equal(ids, panoptic.read_ids(report / "panoptic_pred", annotation))
        listed = {s["id"] for s in annotation["segments_info"]}
        assert listed == set(np.unique(ids).tolist()) - {0}
        picture = np.asarray(Image.open(out / "overlay" / annotation["file_name"]))
        assert picture.shape == (*ids.shape, 3)


def test_the_default_report_goes_beside_the_semantic_run_under_the_tasks_name(checkpoints):
    run_evaluation("task=panoptic", *checkpoints, VAL)
    report = Path(checkpoints[0].split("=", 1)[1]).parent.parent / "eval_val_last_panoptic"
    assert sorted(path.name for path in report.glob("*.json")) == [
        "panoptic_gt.json",
        "panoptic_pred.json",
    ]
    assert not (report.parent / "eval_val_last").exists()  # the semantic report's name stays free
    # PQ and the per-class values in the semantic run's TensorBoard, under the report's name
    assert len(list((report.parent / "tb" / report.name).glob("events.*"))) == 1


def test_a_missing_part_or_a_training_attempt_is_a_clear_error(checkpoints):
    with pytest.raises(ValueError, match="task=panoptic needs semantic=<checkpoint> instance="):
        run_evaluation("task=panoptic", checkpoints[0], VAL)
    with pytest.raises(ValueError, match="task=panoptic does not train"):
        PanopticTask(["a", "b"], [1], [[0, 0, 0]] * 2).prepare(None, None, None)


def test_training_task_panoptic_stops_before_writing_anything(tmp_path):
    overrides = ["task=panoptic", f"output_root={tmp_path}"]
    with hydra_context(), pytest.raises(ValueError, match="merges the checkpoints of semantic and"):
        train.run(compose("train", overrides=overrides), tmp_path / "run", overrides)
    assert not (tmp_path / "run").exists()


# Each rank matches its share of 5 images (ground truth against a perturbed copy) and the
# evaluator gathers and scores them once.
EVALUATE_ON_RANKS = """
import json, sys
import numpy as np
import torch
from seg.data.loader import val_loader
from seg.data.synthetic import PANOPTIC_CLASS_NAMES, SyntheticPanoptic
from seg.engine import dist
from seg.engine.evaluation import evaluate
from seg.tasks.panoptic import PanopticTask

dist.init(torch.device("cpu"))
task = PanopticTask(PANOPTIC_CLASS_NAMES, [3, 4, 5], [[0, 0, 0]] * 6)
loader = val_loader(SyntheticPanoptic("val", num_samples={"val": 5}), batch_size=2,
                    num_workers=0, rank=dist.rank(), world_size=dist.world_size(),
                    collate_fn=task.collate)


def perturbed(batch, names):
    outputs = []
    for ids, table in zip(batch[1], batch[2]):
        ids = ids.numpy().astype(np.int32)
        ids[: 8 * (1 + len(table) % 3)] = 0  # a strip of varying height left void
        outputs.append((ids, [{"id": k + 1, "category_id": int(c)} for k, (c, _) in
                              enumerate(table.tolist()) if (ids == k + 1).any()]))
    return outputs


result = evaluate(torch.nn.Identity(), perturbed, loader, task.evaluator(torch.device("cpu")),
                  torch.device("cpu"))
summary = task.summary(result)
print(f"rank {dist.rank()}: " + json.dumps({"names": [i.name for i in result.images],
      "stats": result.stats.tolist(), "PQ": summary["PQ"], "PQ_class": summary["PQ_class"]}))
dist.shutdown()
"""


def test_two_processes_gather_the_matchings_and_score_what_one_does(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(EVALUATE_ON_RANKS)
    one = torchrun_one(script)
    output = torchrun(script)
    for rank in (0, 1):
        line = next(line for line in output.splitlines() if line.startswith(f"rank {rank}: "))
        two = json.loads(line.split(": ", 1)[1])
        assert two == one  # the same sums in the same order: equal, not merely close
    assert one["names"] == [f"synthetic_panoptic/val/{i}" for i in range(5)]
    assert 0 < one["PQ"] < 1


def torchrun_one(script) -> dict:
    """The script's result in one plain process."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    output = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120, check=True).stdout  # fmt: skip
    return json.loads(output.split("rank 0: ", 1)[1])


def test_synthetic_panoptic_scenes_have_stuff_and_things():
    dataset = SyntheticPanoptic("val")
    classes = set()
    for i in range(4):
        _, ids, table = dataset[i]
        assert (ids > 0).all()  # no void
        classes |= set(table[:, 0].tolist())
    assert classes & {0, 1, 2} and classes & {3, 4, 5}
    assert np.array_equal(dataset[0][1], SyntheticPanoptic("val")[0][1])  # deterministic
