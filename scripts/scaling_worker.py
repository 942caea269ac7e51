"""One launch of benchmark.py's scaling figure: seg's training step, timed in this process.

    python scripts/scaling_worker.py --model unet --out single.json        # as `python train.py`
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        scripts/scaling_worker.py --model unet --out ddp.json               # as `torchrun train.py`

Under torchrun every process joins the process group (gloo on the CPU, NCCL on GPUs), also a
lone one, which train.py leaves out: so `--nproc_per_node=1` shows what DDP itself costs. Rank 0
writes the medians as JSON to --out; threads come from OMP_NUM_THREADS, as for train.py.
"""

import argparse
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # seg
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark.py's helpers

import torch
import torch.distributed as torch_dist
from benchmark import interleaved_medians, make_trainer, random_batch, train_config
from hydra.utils import instantiate
from torch.nn.parallel import DistributedDataParallel

from seg.engine import dist


def join_group(device: torch.device) -> torch.device:
    """Join torchrun's group; ``dist.init`` (the Trainer's) then only picks this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch_dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        device_id=device if device.type == "cuda" else None,
    )
    return device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet")
    parser.add_argument("--size", nargs=2, type=int, default=[256, 512], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=4, help="images per process")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    if "LOCAL_RANK" in os.environ:
        device = join_group(device)

    cfg = train_config(args.model, args.device)
    torch.manual_seed(0)  # the same weights on every rank and in every launch
    template = instantiate(cfg.model)
    trainer = make_trainer(cfg, copy.deepcopy(template))
    images, masks = random_batch(args.batch, *args.size, seed=dist.rank())  # a batch per rank
    batches = iter(lambda: (images, masks), None)  # the same batch forever, already in memory

    # The step as train.py runs it; under DDP, also without the gradient all-reduce (the same
    # model under no_sync) and without SyncBatchNorm (a second replica with plain BatchNorm,
    # which sync_bn=auto swaps in): what each costs of the step, in time not hidden by compute.
    steps = {"seg": lambda: trainer.train_step(batches)}
    if isinstance(trainer.ddp_model, DistributedDataParallel):

        def without_grad_allreduce():
            with dist.no_sync(trainer.ddp_model):
                trainer.train_step(batches)

        steps["no_grad_allreduce"] = without_grad_allreduce
    if any(
        isinstance(module, (torch.nn.SyncBatchNorm, dist.CPUSyncBatchNorm))
        for module in trainer.model.modules()
    ):
        plain_bn = make_trainer(cfg, copy.deepcopy(template), sync_bn=False)
        steps["no_sync_bn"] = lambda: plain_bn.train_step(batches)

    def sync():
        """Wait for the device and for every rank, so that rank 0 times the slowest one."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        if dist.world_size() > 1:  # a lone rank's barrier would only add its own cost
            dist.barrier()

    medians = interleaved_medians(steps, args.reps, args.warmup, sync, str(device))
    if dist.is_main():
        args.out.write_text(json.dumps({
            "world_size": dist.world_size(),
            "backend": torch_dist.get_backend() if torch_dist.is_initialized() else None,
            "threads": torch.get_num_threads(),
            "precision": trainer.precision,
            "channels_last": trainer.channels_last,
            "seconds": {name: medians[name] for name in steps},
        }) + "\n")  # fmt: skip
    dist.shutdown()


if __name__ == "__main__":
    main()
