"""``train.py`` as a torchrun worker that also reports what a test cannot see from outside:
its exit code and its model's weights after training, per rank, in ``$SEG_TEST_OUT``; and
that can make one rank fail (``$SEG_TEST_FAIL``) or its compile (``$SEG_TEST_COMPILE_FAIL``)."""

import os
import runpy
import sys
from pathlib import Path

import torch

from seg.engine import dist
from seg.engine import trainer as trainer_module

out = Path(os.environ["SEG_TEST_OUT"])
fit = trainer_module.Trainer.fit


def fit_and_report(self, *args, **kwargs):
    metrics = fit(self, *args, **kwargs)
    torch.save(self.model.state_dict(), out / f"weights_rank{dist.rank()}.pt")
    return metrics


trainer_module.Trainer.fit = fit_and_report

# SEG_TEST_FAIL=<rank>:<iteration>: that rank's step raises there, as a bug or an OOM would.
if "SEG_TEST_FAIL" in os.environ:
    failing_rank, failing_iteration = map(int, os.environ["SEG_TEST_FAIL"].split(":"))
    accumulate = trainer_module.Trainer.accumulate_gradients

    def failing_accumulate(self, batches):
        if dist.rank() == failing_rank and self.iteration + 1 == failing_iteration:
            raise RuntimeError(f"injected failure on rank {failing_rank}")
        return accumulate(self, batches)

    trainer_module.Trainer.accumulate_gradients = failing_accumulate
# SEG_TEST_COMPILE_FAIL=<rank>: torch.compile fails on that rank; elsewhere it "compiles" to
# the eager model, so that the other ranks' first call succeeds.
if "SEG_TEST_COMPILE_FAIL" in os.environ:
    compile_fails_on = int(os.environ["SEG_TEST_COMPILE_FAIL"])

    def fake_compile(model):
        def compiled(*args, **kwargs):
            if dist.rank() == compile_fails_on:
                raise RuntimeError(f"injected compile failure on rank {compile_fails_on}")
            return model(*args, **kwargs)

        return compiled

    torch.compile = fake_compile
code = 0
try:
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "train.py"), run_name="__main__")
except SystemExit as exit:
    code = exit.code
finally:
    (out / f"exit_rank{os.environ['RANK']}").write_text(str(code))
sys.exit(code)
