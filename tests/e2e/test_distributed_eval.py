"""evaluate.py and predict.py under torchrun (2 CPU processes, gloo): every image handled by
one process, the results written once, and the metrics exactly those of one process."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seg.data.synthetic import SyntheticScenes
from tests.conftest import REPO, run_evaluation, run_training

VAL_IMAGES = 7  # odd: the two processes' shares differ (4 and 3 images)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("outputs") / "run"
    run_training(run_dir, f"data.dataset.num_samples.val={VAL_IMAGES}")
    return run_dir / "checkpoints" / "best.pt"


def torchrun(script: str, *arguments: str) -> str:
    """Run ``script`` on 2 processes; returns their output (stdout and stderr)."""
    # PYTHONPATH: this checkout's seg, also for a script outside it
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), *arguments],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def read_rows(report_dir) -> list[dict]:
    with open(report_dir / "per_image.csv") as file:
        return list(csv.DictReader(file))


def test_evaluate_on_two_processes_equals_one(checkpoint, tmp_path):
    common = (f"checkpoint={checkpoint}", "num_worst=3")
    one = run_evaluation(*common, f"report_dir={tmp_path / 'one'}")
    out = tmp_path / "two.json"
    output = torchrun("evaluate.py", *common, f"out={out}")  # default report dir: the run's
    two = json.loads(out.read_text())
    assert two["images"] == VAL_IMAGES
    # rank 0's progress shown as the whole split's, not as its share's "4/4"
    assert f"evaluate: {VAL_IMAGES}/{VAL_IMAGES} images (100%)" in output, output[-3000:]
    # the same integer confusion matrix: equal, not merely close
    assert two["mIoU"] == one["mIoU"] and two["IoU"] == one["IoU"]
    assert two["mIoU_ci95"] == one["mIoU_ci95"]  # the per-image counts, in the same order
    run_dir = checkpoint.parent.parent
    report = run_dir / "eval_val_best"
    rows = read_rows(report)
    assert [row["image"] for row in rows] == [f"synthetic/val/{i}" for i in range(VAL_IMAGES)]
    assert rows == read_rows(tmp_path / "one")
    for name in ("worst", "confusion"):  # the same worst images, in the same order
        pictures = [np.asarray(Image.open(d / f"{name}.png")) for d in (report, tmp_path / "one")]
        assert np.array_equal(*pictures)
    # rank 0 alone reports: one table, one JSON, one TensorBoard event file
    for line in ("Metrics written to", "Per-image metrics and figures in", "\nmean "):
        assert output.count(line) == 1, output[-3000:]
    assert len(list((run_dir / "tb" / report.name).glob("events.*"))) == 1


def test_predict_on_two_processes_writes_each_image_once(checkpoint, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(5):
        image, _ = SyntheticScenes("test", image_size=64 + 8 * (i % 2)).load(i)
        Image.fromarray(image).save(images / f"scene{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    output = torchrun(
        "predict.py", f"checkpoint={checkpoint}", f"input={images}", f"output={out}",
        "format=[index]",
    )  # fmt: skip
    written = sorted(path.name for path in (out / "index").iterdir())
    assert written == [f"scene{i}.png" for i in range(5)]
    # the counts of both processes, summed and logged once: 10 would mean both did all
    assert output.count("Wrote predictions for 5 images") == 1, output[-3000:]
    assert output.count("Skipped 1 unreadable files") == 1
    assert "predict: 6/6 images (100%)" in output  # all the files, not rank 0's 3


# Rank 1's share (3 of 7 images) is one batch of 3, rank 0's (4) two: rank 1 asks to stop when
# it has no batch left, and both must stop there (a rank that went on would wait forever).
STOP_ON_ONE_RANK = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

from seg.data.loader import val_loader
from seg.engine import dist
from seg.tasks.semantic import evaluate
from seg.inference import Predictor

dist.init(torch.device("cpu"))
images, masks = torch.zeros(7, 3, 4, 4, dtype=torch.uint8), torch.zeros(7, 4, 4, dtype=torch.uint8)
loader = val_loader(TensorDataset(images, masks), batch_size=3, num_workers=0, rank=dist.rank(),
                    world_size=dist.world_size())
predictor = Predictor(nn.Conv2d(3, 2, 1), torch.device("cpu"), (0.5,) * 3, (0.25,) * 3)
checks = 0


def stop() -> bool:  # rank 1, at its second check: its share is done
    global checks
    checks += 1
    return dist.rank() == 1 and checks == 2


stopped = evaluate(predictor, loader, 2, 255, stop=stop)
whole = evaluate(predictor, loader, 2, 255, num_examples=2, num_worst=3, stop=lambda: False)
print(f"rank {dist.rank()}: stopped {stopped is None}, {len(whole.image_names)} images")
dtypes = {str(picture.dtype) for example in whole.examples for picture in example}
print(f"rank {dist.rank()}: counts {tuple(whole.image_counts.shape)}, "
      f"{len(whole.examples)} examples, {len(whole.worst)} worst, {sorted(dtypes)}")
dist.shutdown()
"""


def test_a_stop_on_one_rank_stops_both_at_the_same_batch(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(STOP_ON_ONE_RANK)
    output = torchrun(script)
    for rank in (0, 1):
        assert f"rank {rank}: stopped True, 7 images" in output, output[-3000:]
    # Metrics and per-image counts on every rank (best.pt, early stopping); the pictures, in
    # uint8, on rank 0 alone (which shows them).
    assert "rank 0: counts (7, 3, 2), 2 examples, 3 worst, ['torch.uint8']" in output
    assert "rank 1: counts (7, 3, 2), 0 examples, 0 worst, []" in output, output[-3000:]
