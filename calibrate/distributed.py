"""Data-parallel calibration with torch.distributed: each rank sees a share of the batches and
the statistics are summed (maxima: max) across ranks with all_reduce.

Started by ``torchrun --nproc_per_node N glu-prune calibrate ...`` (NCCL on GPUs, gloo on CPU);
only rank 0 writes files. Without torchrun everything runs as a single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from itertools import islice

import torch
import torch.distributed as dist

from calibrate.stats import LayerStats


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str | None = None) -> None:
    """Join the process group torchrun describes (NCCL when this rank uses a GPU, else gloo)."""
    if launched_by_torchrun() and not dist.is_initialized():
        use_gpu = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_gpu else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device_for_rank(device: str | None) -> str | None:
    """``cuda:LOCAL_RANK`` for GPU ranks under torchrun, else ``device`` unchanged."""
    if launched_by_torchrun() and torch.cuda.is_available() and (device is None or device == "cuda"):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shard(batches: Iterable[dict]) -> Iterator[dict]:
    """This rank's batches: every world_size-th one, starting at its rank."""
    return islice(batches, rank(), None, world_size())


def all_reduce_stats(layers: dict[int, LayerStats]) -> None:
    """Sum every running sum (max for ``max_abs``) across ranks, in place, in float64."""
    if world_size() == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for index in sorted(layers):
        s = layers[index] = layers[index].folded()  # kept activations differ in length across ranks: summed as x xᵀ
        count = torch.tensor([float(s.count)], dtype=torch.float64, device=device)
        dist.all_reduce(count)
        s.count = int(count.item())
        for name in ("sum", "abs_sum", "sq_sum", "second_moment", "max_abs"):
            value = getattr(s, name)
            if value is None:
                continue
            moved = value.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.MAX if name == "max_abs" else dist.ReduceOp.SUM)
            setattr(s, name, moved.cpu())


def all_reduce_count(value: int) -> int:
    if world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())
