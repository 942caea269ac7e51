"""scripts/publish_result.py: a run's evidence copied unchanged, with the command and machine."""

import json
import sys

import pytest

from tests.conftest import REPO, load_script

sys.path.insert(0, str(REPO / "scripts"))  # publish_result imports benchmark's cpu_name
publish = load_script("publish_result")


def fake_run(run_dir):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"iteration": 2, "mIoU": 0.5}\n')
    (run_dir / "train.log").write_text("iteration 2/2  loss 0.1\n")
    (run_dir / "config.yaml").write_text("seed: 0\ntrainer:\n  max_iters: 2\n")
    command = ["/somewhere/train.py", "debug=tiny"]
    (run_dir / "run.json").write_text(
        json.dumps({"started": "2026-11-26 10:00:00", "command": command})
    )
    return run_dir


def test_a_run_is_published_unchanged_with_its_command_and_machine(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    evaluation = tmp_path / "eval.json"
    evaluation.write_text('{"mIoU": 0.4}')
    target = publish.publish(run_dir, "tiny", evaluation, tmp_path / "results")
    for name in ("metrics.jsonl", "train.log", "config.yaml"):
        assert (target / name).read_bytes() == (run_dir / name).read_bytes()
    assert (target / "evaluation.json").read_text() == '{"mIoU": 0.4}'
    readme = (target / "README.md").read_text()
    assert "`python train.py debug=tiny`" in readme
    assert publish.cpu_name() in readme and "torch " in readme


def test_an_unfinished_run_is_refused_naming_what_is_missing(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    (run_dir / "metrics.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"metrics\.jsonl missing"):
        publish.publish(run_dir, "tiny", None, tmp_path / "results")
    (run_dir / "metrics.jsonl").touch()
    (run_dir / "run.json").unlink()
    with pytest.raises(SystemExit, match=r"run\.json missing"):
        publish.publish(run_dir, "tiny", None, tmp_path / "results")


def test_the_command_is_quoted_as_a_shell_would_need_it(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    run = json.loads((run_dir / "run.json").read_text())
    run["command"].append("data.class_names=[a, b]")
    (run_dir / "run.json").write_text(json.dumps(run))
    readme = (
        publish.publish(run_dir, "tiny", None, tmp_path / "results") / "README.md"
    ).read_text()
    assert "`python train.py debug=tiny 'data.class_names=[a, b]'`" in readme


def test_an_unfinished_or_damaged_run_is_refused(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    (run_dir / "config.yaml").write_text("seed: 0\ntrainer:\n  max_iters: 20\n")
    with pytest.raises(SystemExit, match=r"stopped at iteration 2 of trainer.max_iters=20"):
        publish.publish(run_dir, "tiny", None, tmp_path / "results")
    with open(run_dir / "train.log", "a") as log:  # an early stop is a finished run
        log.write("Early stop at iteration 2 of 20: val mIoU has not improved\n")
    publish.publish(run_dir, "tiny", None, tmp_path / "results")
    (run_dir / "run.json").write_text('{"started": "2026-11')
    with pytest.raises(SystemExit, match=r"run\.json is damaged"):
        publish.publish(run_dir, "tiny", None, tmp_path / "results")


def test_publishing_under_a_taken_name_keeps_nothing_of_the_first_run(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    evaluation = tmp_path / "eval.json"
    evaluation.write_text('{"mIoU": 0.4}')
    publish.publish(run_dir, "tiny", evaluation, tmp_path / "results")
    target = publish.publish(run_dir, "tiny", None, tmp_path / "results")
    assert not (target / "evaluation.json").exists()
