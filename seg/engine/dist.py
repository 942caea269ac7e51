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
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
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
    the device of this rank: ``cuda:LOCAL_RANK`` on GPUs (``cuda:0`` where each process sees
    one GPU, as with ``srun --gpus-per-task=1``), else ``device``. A CUDA device also becomes
    the current one, so that nothing lands on GPU 0 by default (``trainer.device=cuda:1``)."""
    refuse_plain_srun()
    if launched_by_torchrun() and device.type == "cuda":
        device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not launched_by_torchrun():
        return device
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


def rank_device() -> torch.device:
    """``cuda:LOCAL_RANK``, checked against the GPUs this process sees; ``cuda:0`` where the
    launcher bound one GPU to each process (``srun --gpus-per-task=1``: every process sees
    only its own, as GPU 0)."""
    local_rank, visible = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes per node
    if processes > visible or (local_rank >= visible and visible != 1):
        raise ValueError(
            f"local rank {local_rank} of {processes} process(es) on this node, but it sees "
            f"{visible} GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}): "
            "start at most one process per visible GPU (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank if local_rank < visible else 0)


def refuse_plain_srun() -> None:
    """Several SLURM tasks without torchrun would each train alone, as rank 0, into one run
    directory: refuse, with the command that forms a process group."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks > 1 and "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"this is one of {tasks} SLURM tasks started without torchrun: each would train "
            "alone into the same run directory. Start one torchrun per node, e.g. `srun "
            "--ntasks-per-node=1 torchrun --nproc_per_node=<GPUs per node> ... train.py ...` "
            "(scripts/launch/slurm_train.sbatch does this), or run a single task (srun -n 1)"
        )


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


# What a collective raises on one process when another process of the job has died (gloo).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process of the job ended:
    that process's own error is the one to read."""
    return launched_by_torchrun() and any(text in str(error) for text in PEER_LOST)


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


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0 alone (None on the others): what only
    rank 0 uses (validation pictures) is not sent to every rank."""
    if not torch_dist.is_initialized():
        return [value]
    values = [None] * world_size() if is_main() else None
    torch_dist.gather_object(value, values, dst=0)
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


def resolve_sync_bn(sync_bn: bool | str, model: nn.Module) -> bool:
    """``auto`` -> on when several processes train a model with BatchNorm: each rank's batch
    alone is too small for good statistics (mmsegmentation #179: PSPNet 69.1 vs 79.8 mIoU)."""
    if sync_bn == "auto":
        return world_size() > 1 and has_batchnorm(model)
    if not isinstance(sync_bn, bool):
        raise ValueError(f"trainer.sync_bn={sync_bn!r}; options: auto, true, false")
    return sync_bn and world_size() > 1


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, _BatchNorm) for module in model.modules())


def convert_sync_batchnorm(model: nn.Module, device: torch.device, prefix: str = "") -> nn.Module:
    """``model`` with its BatchNorm layers normalising with the statistics of the global batch
    (all ranks), each replaced in place by a layer that computes the same function.

    CUDA: torch's SyncBatchNorm, and timm's SyncBatchNormAct for timm's BatchNormAct2d (a
    BatchNorm2d followed by its activation and drop path, which torch's conversion would drop:
    efficientnet, regnet and mobilenetv3 encoders). The CPU has no kernels for SyncBatchNorm,
    so there ``CPUSyncBatchNorm`` and ``CPUSyncBatchNormAct`` do the same with two
    differentiable all-reduces (multi-process CPU runs: tests, CI). Any other BatchNorm
    subclass is refused by name: converting it would change what it computes.
    """
    for name, child in model.named_children():
        synced = synced_batchnorm(child, device, f"{prefix}{name}")
        if synced is None:
            convert_sync_batchnorm(child, device, f"{prefix}{name}.")
        else:
            setattr(model, name, synced)
    return model


def synced_batchnorm(module: nn.Module, device: torch.device, name: str) -> nn.Module | None:
    """The synced layer that replaces ``module``, or None for a module that is not a BatchNorm
    layer (or is already synced)."""
    if not isinstance(module, _BatchNorm) or isinstance(module, SYNCED_BATCHNORMS):
        return None
    on_cuda = device.type == "cuda"
    kind = type(module)  # exact types: a subclass may compute something else
    if kind is nn.BatchNorm2d:
        synced_kind = nn.SyncBatchNorm if on_cuda else CPUSyncBatchNorm
    elif kind is BatchNormAct2d:
        synced_kind = SyncBatchNormAct if on_cuda else CPUSyncBatchNormAct
    else:
        raise ValueError(
            f"trainer.sync_bn: {name} is a {kind.__module__}.{kind.__qualname__}, which seg "
            "cannot synchronise over processes without changing what it computes (known: "
            "torch's BatchNorm2d and timm's BatchNormAct2d). Set trainer.sync_bn=false"
        )
    synced = synced_kind(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
    )
    # The same parameter and buffer objects (an optimizer built before keeps them) and the
    # same submodules (BatchNormAct2d's activation and drop path).
    synced._parameters, synced._buffers = module._parameters, module._buffers
    synced._modules = module._modules
    synced.train(module.training)
    return synced


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


class CPUSyncBatchNormAct(CPUSyncBatchNorm):
    """timm's BatchNormAct2d (normalisation, drop path, activation) with ``CPUSyncBatchNorm``'s
    statistics; its ``drop`` and ``act`` submodules come from the layer it replaces."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))


# Layers that already normalise over all ranks: a second conversion keeps them.
SYNCED_BATCHNORMS = (nn.SyncBatchNorm, CPUSyncBatchNorm)


class SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: each rank's input gets the sum of all ranks' output
    gradients (torch.distributed.nn.functional.all_reduce, which did this, is deprecated)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return sum_over_ranks(tensor.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return sum_over_ranks(grad.clone())
