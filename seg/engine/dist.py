"""torch.distributed for seg: the process group from torchrun's environment, rank helpers, and
the few collectives the loop needs. With one process every helper is a no-op, so the
single-process path runs the same lines."""

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

# A rank that dies or hangs must end the job, not leave the others waiting forever in a
# collective (torchrun then stops the group, or restarts it under --max-restarts).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("SEG_DIST_TIMEOUT_MIN", 10)))


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) if not yet joined; returns
    the device of this rank: ``cuda:LOCAL_RANK`` on GPUs, else ``device``."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = restart_store()
        torch_dist.init_process_group(
            backend,
            timeout=COLLECTIVE_TIMEOUT,
            device_id=device if device.type == "cuda" else None,
            store=store,
            rank=int(os.environ["RANK"]) if store else -1,
            world_size=int(os.environ["WORLD_SIZE"]) if store else -1,
        )
    return device


def restart_store() -> torch_dist.Store | None:
    """torchrun's key-value store with a namespace of this attempt's own (None: env:// as usual).

    Under ``--max-restarts`` torchrun keeps its store, with the failed attempt's keys in it,
    across restarts: a restarted rank would read a dead peer's address and fail (Gloo
    "connectFullMesh failed ... Connection refused"; NCCL alike, pytorch/pytorch#167288).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch_dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,  # the agent hosts it
        timeout=COLLECTIVE_TIMEOUT,
    )
    return torch_dist.PrefixStore(f"/seg/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def decided_by_main(decide: Callable[[], Any]) -> Any:
    """``decide()`` run on rank 0 alone, its result on every rank; an error it raises is
    raised on every rank (no rank is left waiting for an answer that never comes)."""
    if not torch_dist.is_initialized():
        return decide()
    outcome = None
    if is_main():
        try:
            outcome = (True, decide())
        except Exception as error:
            broadcast((False, error))
            raise
    succeeded, value = broadcast(outcome)
    if not succeeded:
        raise value
    return value


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of 0/1 ``flags`` over all ranks (in place; one small all-reduce): the
    decisions every rank must take alike (stop, skip this step)."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
    return flags


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (confusion matrices: integer counts, exact)."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a run directory, a resume decision)."""
    if not torch_dist.is_initialized():
        return value
    holder = [value]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not torch_dist.is_initialized():
        return [value]
    values = [None] * world_size()
    torch_dist.all_gather_object(values, value)
    return values


def shard(indices: Sequence[int]) -> Sequence[int]:
    """This rank's share of ``indices`` (every ``world_size``-th): each index on exactly one
    rank, no padding, so an evaluation counts every sample once."""
    return indices[rank() :: world_size()]


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def unshard(shares: Sequence[Sequence[Any]]) -> list[Any]:
    """The inverse of ``shard``: every rank's share (``gather``'s list, in rank order) merged
    back into the original order."""
    merged = []
    for i in range(max(map(len, shares), default=0)):
        merged += [share[i] for share in shares if i < len(share)]
    return merged


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun (gradients averaged over ranks in the
    backward pass), else ``model`` itself."""
    if not torch_dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def no_sync(model: nn.Module):
    """Skip DDP's gradient all-reduce for this backward (all but the last accumulated batch)."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers that normalize with the statistics of the global batch (all ranks).

    CUDA: torch's SyncBatchNorm. The CPU has no kernels for it, so there ``CPUSyncBatchNorm``
    does the same with two differentiable all-reduces (multi-process CPU runs: tests, CI).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, CPUSyncBatchNorm):
            synced = CPUSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            # The same parameter and buffer objects: an optimizer built before keeps them.
            synced._parameters, synced._buffers = child._parameters, child._buffers
            synced.train(child.training)
            setattr(model, name, synced)
        else:
            convert_sync_batchnorm(child, device)
    return model


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch over all ranks (CPU)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch_dist.is_initialized() and world_size() > 1):
            return super().forward(input)
        # Sums over the local batch, then over all ranks: mean and biased variance of the
        # global batch, with the gradient flowing back to every rank's input.
        # In float32 whatever the autocast dtype: bf16 sums of squares lose the variance.
        values = input.float()
        count = torch.tensor([values.numel() / values.shape[1]], dtype=torch.float32)
        local = torch.cat([values.sum((0, 2, 3)), values.square().sum((0, 2, 3)), count])
        total = SumOverRanks.apply(local)
        channels = input.shape[1]
        n = total[-1]
        mean = total[:channels] / n
        variance = (total[channels : 2 * channels] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    self.momentum
                    if self.momentum is not None
                    else 1 / self.num_batches_tracked.item()
                )
                self.running_mean.lerp_(mean.detach(), momentum)
                # The running variance is unbiased, as BatchNorm2d's.
                self.running_var.lerp_(variance.detach() * n / (n - 1).clamp_min(1), momentum)
        shape = (1, channels, 1, 1)
        output = (values - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output.to(input.dtype)


class SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: each rank's input gets the sum of all ranks' output
    gradients (torch.distributed.nn.functional.all_reduce, which did this, is deprecated)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return sum_over_ranks(tensor.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return sum_over_ranks(grad.clone())
