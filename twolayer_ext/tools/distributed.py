"""Data-parallel training of TwoLayerNet with torch.distributed: DistributedDataParallel
over gloo (CPU) or NCCL (CUDA), one process per rank, started by torchrun.

Why not sgd_step here: it runs forward, backward and the update in one op with autograd off,
so DDP's gradient hooks (its all-reduce) would never fire and the ranks would drift apart.
Under DDP each rank runs the fused loss (TwoLayerNet(x, target), which computes its gradients
in the forward call) + loss.backward() + torch.optim.SGD instead: backward delivers those
gradients to .grad through autograd, so DDP's hooks fire as for any loss.

The loss scaling that makes N ranks equal one process on the whole batch: the global loss is
a sum over ranks, sum_r L_r (divided by numel for "mean"), so its gradient is sum_r g_r. DDP
*averages* gradients, (1/W) sum_r g_r, hence each rank backpropagates W * L_r (over the
global numel for "mean"). That stays exact when the shards are uneven, where averaging
per-rank means would not.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun():
    return all(name in os.environ for name in TORCHRUN_ENV)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    def shard(self, t):
        """This rank's rows of a global batch (contiguous blocks; sizes differ by at most 1)."""
        return torch.tensor_split(t, self.size)[self.rank]


def init(device_type, timeout_s=300):
    """Joins the process group torchrun set up: gloo on CPU, NCCL (one GPU per rank) on CUDA."""
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), device)


def shutdown(sync=True):
    """Leaves the process group. sync: wait for every rank first (after a clean run), since a
    gloo rank that tears down while its peer is still busy (rank 0 writing the outputs) can
    abort at exit ("terminate called without an active exception")."""
    if dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


class DataParallelSGD:
    """Plain SGD on a module wrapped in DistributedDataParallel; step() takes the *global*
    batch (the same on every rank), computes this rank's shard and returns the global loss."""

    def __init__(self, model, world, *, lr, reduction):
        if reduction not in ("sum", "mean"):
            raise ValueError(f'reduction must be "sum" or "mean", got {reduction!r}')
        self.world, self.reduction = world, reduction
        self.ddp = DistributedDataParallel(
            model, device_ids=[world.device] if world.device.type == "cuda" else None
        )
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step(self, x, y):
        """One SGD step on the global batch (x, y); returns its loss before the update."""
        denom = 1 if self.reduction == "sum" else y.numel()
        local = self.ddp(self.world.shard(x), self.world.shard(y), "sum")  # the fused loss
        self.optimizer.zero_grad(set_to_none=True)
        (local * (self.world.size / denom)).backward()  # DDP averages: see the module doc
        self.optimizer.step()
        total = local.detach().clone()
        dist.all_reduce(total)  # the global loss, for reporting
        return total.item() / denom
