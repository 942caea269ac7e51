"""kill -9 a training run at random moments and check that it always resumes.

    python scripts/fault_test.py --trials 20

Each trial starts `train.py debug=tiny` with a checkpoint every iteration (so kills often land
inside a save), kills it with SIGKILL after a random delay, checks that the newest checkpoint
loads, then resumes with `resume=auto` and checks that the run continues past it. Prints one
line per trial and the totals "trials, loadable, resumed".
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from seg.checkpoint import load_checkpoint, newest_loadable_checkpoint  # noqa: E402

TRAIN = [
    sys.executable, "train.py", "debug=tiny", "trainer.precision=fp32", "trainer.max_iters=100000",
    "trainer.ckpt_every=1", "trainer.val_every=100000",
]  # fmt: skip


def start(output_root: Path, *overrides: str) -> subprocess.Popen:
    run_dir = output_root / f"run-{time.monotonic_ns()}"
    command = [*TRAIN, f"output_root={output_root}", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def newest_iteration(output_root: Path) -> int | None:
    found = newest_loadable_checkpoint(output_root)
    return None if found is None else found[1]["iteration"]


def newest_mtime(output_root: Path) -> float:
    """Cheap progress probe: loading a checkpoint on every poll would slow the run down."""
    return max((p.stat().st_mtime for p in output_root.glob("**/checkpoints/*.pt")), default=0.0)


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def trial(output_root: Path, rng: random.Random) -> tuple[bool, bool, str]:
    before = newest_mtime(output_root)
    process = start(output_root, *(["resume=auto"] if before else []))
    # Once it writes checkpoints again, kill it at a random moment.
    wait_until(lambda: newest_mtime(output_root) > before, timeout=120)
    time.sleep(rng.uniform(0.0, 2.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    path = newest_loadable_checkpoint(output_root)
    loadable = path is not None
    try:
        killed_at = load_checkpoint(path[0])["iteration"] if loadable else None
    except ValueError:
        loadable, killed_at = False, None
    if not loadable:
        return False, False, "no loadable checkpoint"
    resumed = start(output_root, "resume=auto")
    saved = newest_mtime(output_root)
    # progress = a newer checkpoint, which must load and be past the kill
    ok = wait_until(lambda: newest_mtime(output_root) > saved, timeout=120)
    ok = ok and (newest_iteration(output_root) or 0) > killed_at
    resumed.send_signal(signal.SIGKILL)
    resumed.wait()
    return True, ok, f"killed at iteration {killed_at}, resumed past it: {ok}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    loadable = resumed = 0
    with tempfile.TemporaryDirectory() as directory:
        for number in range(1, args.trials + 1):
            ok_load, ok_resume, detail = trial(Path(directory), rng)
            loadable += ok_load
            resumed += ok_resume
            print(f"trial {number}: {detail}", flush=True)
    print(f"trials {args.trials}, loadable {loadable}, resumed {resumed}")
    sys.exit(0 if loadable == resumed == args.trials else 1)


if __name__ == "__main__":
    main()
