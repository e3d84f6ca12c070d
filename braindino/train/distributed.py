"""Process-group setup for ``python train_dino.py`` (one process) and ``torchrun`` (one process per device)."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group when launched by torchrun (env ``WORLD_SIZE``), else run alone.

    NCCL with one GPU per process when CUDA is available, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


_control_group = None   # a gloo group for small CPU-side agreements (no GPU sync on the training stream)


def agree_max(value: int) -> int:
    """The maximum of a small int over all processes, exchanged on the CPU (the value itself when alone).

    Used once per step to agree on stopping (pre-emption signal, deadline) and after rank 0 writes a checkpoint;
    under NCCL it goes through a separate gloo group, so it never waits for the GPU.
    """
    global _control_group
    if not (dist.is_available() and dist.is_initialized()):
        return value
    if _control_group is None:
        _control_group = (dist.new_group(backend="gloo") if dist.get_backend() != "gloo"
                          else dist.group.WORLD)
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_control_group)
    return int(tensor.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    global _control_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None
