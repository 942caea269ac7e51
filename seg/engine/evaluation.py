"""One pass over a split, for any task: the batch loop, the stop polling and the equal-shard
logic of distributed evaluation, written once. What is predicted and how it is scored is the
task's (``predict``, ``Evaluator``)."""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from seg.engine import dist
from seg.engine.prefetch import tensors
from seg.engine.task import Evaluator


def sample_name(dataset, index: int) -> str:
    """The dataset's own name for sample ``index`` (a file path, usually), through Subsets."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return dataset.describe(index) if hasattr(dataset, "describe") else str(index)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    predict: Callable[[Any, list[str]], Any],
    loader: DataLoader,
    evaluator: Evaluator,
    device: torch.device,
    stop: Callable[[], bool] | None = None,
    progress: Callable[[int], object] | None = None,
) -> Any | None:
    """``evaluator.result()`` after ``predict(batch, names)`` and ``evaluator.process`` on every
    batch of ``loader``; None as soon as ``stop()`` is true on any rank (a stop signal).

    ``model`` is in eval mode meanwhile (``predict`` runs it), and cuDNN's autotuning
    (``cudnn.benchmark``) is off from the first batch whose images differ in size from the
    first batch's (whole images of varying sizes: it would tune again at every new shape);
    both are restored at the end. Under torchrun each rank passes
    its share of the split (``loader.val_loader`` shards it) and the evaluator combines the
    ranks' results. A stop on any rank stops them all at the same batch. ``progress`` is
    called with each batch's number of samples (e.g. a bar's ``update``).
    """
    was_training = model.training
    model.eval()
    # Shares differ by up to one sample, so batch counts may too: every rank runs the largest
    # count of steps, so that the per-step stop decisions (a collective) always pair up.
    steps = max(dist.gather(len(loader)))
    batches = iter(loader)
    seen = 0
    autotuning, first_sizes = torch.backends.cudnn.benchmark, None
    try:
        for _ in range(steps):
            batch = next(batches, None)
            if stop is not None and stop_on_any_rank(stop, device):
                return None
            if batch is None:
                continue  # this rank's share is done: it only joins the stop decisions
            sizes = [tensor.shape[1:] for tensor in tensors(batch)]  # not the sample count
            first_sizes = first_sizes or sizes
            if sizes != first_sizes:
                torch.backends.cudnn.benchmark = False
            names = [sample_name(loader.dataset, seen + i) for i in range(batch_size(batch))]
            seen += len(names)
            evaluator.process(batch, predict(batch, names), names)
            if progress is not None:
                progress(len(names))
    finally:
        model.train(was_training)
        torch.backends.cudnn.benchmark = autotuning
    return evaluator.result()


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the length of its first element (images)."""
    return len(batch[0])


def stop_on_any_rank(stop: Callable[[], bool], device: torch.device) -> bool:
    """Whether ``stop()`` is true on any rank: every rank then stops at the same batch, none
    left waiting for the others in a collective."""
    return bool(dist.any_rank(torch.tensor([int(stop())], device=device)).item())
