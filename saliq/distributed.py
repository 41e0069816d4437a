"""Data-parallel calibration under `torchrun --nproc-per-node N saliq quantize ...` (torch.distributed).

Every process holds the whole model and every calibration sample's activations, so a run computes exactly
what one process computes: each global batch of `--batch-size` samples is split evenly over the processes,
the gradients are averaged (all-reduce) before every optimizer step, and the saliency is the sum of each
process's share of the samples. Only process 0 writes files and prints; the others wait at barriers. The
speed-up is in the compute (forward and backward per step, the saliency pass), not in memory: for a model
larger than one GPU, calibrate on one process with `--offload-activations` (blocks move to the GPU in turn).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """True under torchrun (WORLD_SIZE > 1 in the environment) or once a process group exists."""
    return (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device | str | None) -> torch.device | None:
    """Join the process group torchrun describes (nccl for CUDA, gloo for the CPU) and return this process's
    device (cuda:LOCAL_RANK for a CUDA run); outside torchrun, returns `device` unchanged."""
    if not launched():
        return None if device is None else torch.device(device)
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return None if device is None else torch.device(device)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier():
    if world_size() > 1:
        dist.barrier()


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This process's share of a batch of sample indices (every world_size-th, starting at its rank)."""
    return indices[rank()::world_size()]


def check_batch(batch_size: int):
    """A batch must split evenly, or the averaged gradient would weight the processes' samples unequally."""
    if world_size() > 1 and batch_size % world_size():
        raise ValueError(f"--batch-size {batch_size} does not split over {world_size()} processes; use a multiple "
                         f"of {world_size()}")


def average_gradients(params):
    """All-reduce the gradients of `params` into their mean over the processes, in one flat buffer."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean of `t` over the processes."""
    if world_size() > 1:
        dist.all_reduce(t)
        t /= world_size()
    return t


def sum_(tensors, device: torch.device | None = None) -> None:
    """In-place sum of each tensor over the processes (through `device` when the backend needs it there:
    nccl reduces only CUDA tensors)."""
    if world_size() == 1:
        return
    for t in tensors:
        if device is not None and t.device != device:
            on = t.to(device)
            dist.all_reduce(on)
            t.copy_(on)
        else:
            dist.all_reduce(t)
