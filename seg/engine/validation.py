"""The best validation score so far, which best.pt and early stopping follow."""

import math


class BestScore:
    """The best score of the task's primary ``metric`` (``mode`` ``max``: higher is better,
    ``min``: lower) and how many validations in a row have not improved on it; with
    ``patience``, that many end the run (early stopping). A NaN score never improves."""

    def __init__(self, metric: str, mode: str, patience: int | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"a task's metric mode is 'max' or 'min', not {mode!r}")
        self.metric, self.mode, self.patience = metric, mode, patience
        self.value = -math.inf if mode == "max" else math.inf
        self.without_improvement = 0

    def update(self, score: float) -> bool:
        """Count a validation's ``score``; whether it is the best so far."""
        better = score > self.value if self.mode == "max" else score < self.value
        if better:
            self.value, self.without_improvement = score, 0
        else:
            self.without_improvement += 1
        return better

    def spent(self) -> bool:
        """Whether early stopping ends the run (the same on every rank: the scores are)."""
        return self.patience is not None and self.without_improvement >= self.patience

    def finite(self) -> float:
        """The best score, NaN if no validation produced one."""
        return self.value if math.isfinite(self.value) else math.nan
