"""Publish a training run as the evidence for a result the docs quote (docs/results.md).

    python scripts/publish_result.py outputs/2026-11-26/22-50-00 default_run
    python scripts/publish_result.py <run dir> camvid_unet --eval outputs/.../eval_test_last/metrics.json

Copies the run's ``metrics.jsonl``, ``train.log`` and ``config.yaml`` (small text files) into
``docs/results/<name>/`` and writes its ``README.md``: the command, the date, and the machine
(CPU model, cores, GPU) and Python and torch versions of the machine that publishes it (so
publish where the run ran), so that anyone can re-run the command and compare their files line
by line. ``--eval`` adds an evaluation's JSON (``evaluate.py out=...``).
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
from datetime import datetime
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import cpu_name

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("metrics.jsonl", "train.log", "config.yaml")


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} cores, {gpu}"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise SystemExit(f"{path} is damaged (truncated?): {error}") from None


def refuse_unfinished(run_dir: Path) -> None:
    """Evidence is a run that reached its end: ``trainer.max_iters``, or its early stop."""
    max_iters = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_iters"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    reached = json.loads(lines[-1])["iteration"] if lines else 0
    if reached < max_iters and "Early stop at iteration" not in (run_dir / "train.log").read_text():
        raise SystemExit(
            f"{run_dir} stopped at iteration {reached} of trainer.max_iters={max_iters}: it is not "
            f"finished. Continue it with python train.py resume={run_dir}/checkpoints/last.pt, "
            "then publish it"
        )


def publish(run_dir: Path, name: str, evaluation: Path | None, root: Path) -> Path:
    """Write ``root/<name>/`` from ``run_dir``; returns that directory."""
    missing = [f for f in (*RUN_FILES, "run.json") if not (run_dir / f).is_file()]
    if missing:
        raise SystemExit(f"{run_dir} is not a finished run directory: {', '.join(missing)} missing")
    run = read_json(run_dir / "run.json")
    refuse_unfinished(run_dir)
    target = root / name
    if target.exists():  # an earlier run's files (its evaluation.json) must not stay beside these
        print(f"Replacing {target}", file=sys.stderr)
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for file in RUN_FILES:
        shutil.copyfile(run_dir / file, target / file)
    command = shlex.join(["python", Path(run["command"][0]).name, *run["command"][1:]])
    lines = [
        f"# {name}",
        "",
        f"- command: `{command}`",
        f"- started: {run['started']}; published {datetime.now():%Y-%m-%d %H:%M}",
        f"- machine: {machine()}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}",
        f"- files: {', '.join(RUN_FILES)} of the run directory, unchanged",
    ]
    if evaluation is not None:
        shutil.copyfile(evaluation, target / "evaluation.json")
        lines.append("- evaluation.json: the evaluation quoted in the docs (evaluate.py out=...)")
    (target / "README.md").write_text("\n".join(lines) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name", help="the folder under docs/results/")
    parser.add_argument("--eval", type=Path, default=None, help="an evaluation's JSON to add")
    parser.add_argument("--root", type=Path, default=REPO / "docs" / "results")
    args = parser.parse_args()
    print(publish(args.run_dir, args.name, args.eval, args.root))


if __name__ == "__main__":
    main()
