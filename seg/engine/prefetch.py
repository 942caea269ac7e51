"""Batches moved to the device one ahead of the step that uses them."""

from collections.abc import Iterator
from typing import Any

import torch


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it copied to ``device`` (non-blocking: from pinned memory
    on a GPU): a tensor, or tuples, lists and dicts of them, nested (an instance batch is a
    list of images and a list of per-image tables)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def tensors(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested ``batch``."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from tensors(value)
    elif isinstance(batch, list | tuple):
        for value in batch:
            yield from tensors(value)


class DeviceBatches:
    """The batches of ``batches`` on ``device``, one batch ahead: while the model computes on
    batch k, batch k+1 is already being copied, on a side CUDA stream from pinned memory. Step
    k waits for batch k's copy alone (an event recorded after it), not for batch k+1's, which
    is queued by then. On the CPU the same lines run without a stream or event (the copy is a
    no-op).

    An error fetching the batch ahead is raised when that batch is asked for, not earlier, so
    a failing batch still fails the step it belongs to.
    """

    def __init__(self, batches: Iterator, device: torch.device):
        self.batches = batches
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # (batch or the error fetching it, the event its copy completes, or None on the CPU)
        self.ahead: tuple[Any, torch.cuda.Event | None] | None = None

    def __iter__(self) -> "DeviceBatches":
        return self

    def __next__(self) -> Any:
        batch, copied = self.ahead if self.ahead is not None else self.fetch()
        self.ahead = self.fetch()  # the next copy starts before this step computes
        if isinstance(batch, Exception):
            raise batch
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)  # this batch's copy must be done before the step reads it
            for tensor in tensors(batch):
                tensor.record_stream(current)  # its memory is in use on this stream now
        return batch

    def fetch(self) -> tuple[Any, torch.cuda.Event | None]:
        try:
            batch = next(self.batches)
        except Exception as error:  # StopIteration included: raised in its turn
            return error, None
        if self.stream is None:
            return to_device(batch, self.device), None
        with torch.cuda.stream(self.stream):
            batch = to_device(batch, self.device)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return batch, copied
