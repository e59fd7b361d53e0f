"""Data-parallel training under ``torchrun`` (DDP): process group, data sharding, metric reduction, rank-0 writes.

``torchrun --nproc-per-node N -m train ...`` starts N copies of ``python -m train``; torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``TORCHELASTIC_RESTART_COUNT``) tells each copy who it is. Without it
(plain ``python -m train``) :func:`setup` returns a single-process context whose helpers are no-ops, so the
single-process run is unchanged. Backend: NCCL on CUDA (one GPU per local rank), gloo on CPU.

Each rank trains on its shard of the epoch's order (a :class:`~torch.utils.data.DistributedSampler`, reseeded every
epoch with ``set_epoch``) with ``--batch-size`` images per step, so the effective batch is ``batch_size × world``;
gradients are averaged by DDP. Train loss/accuracy are summed over ranks, validation is sharded and its logits
gathered, so every rank computes the same metrics and takes the same early-stopping decision. Only rank 0 writes
(checkpoints, history, plots, the final calibration). When torchrun restarts the group after a rank died
(``--max-restarts``), every rank resumes from ``last.pt``.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    restart: int = 0  # torchrun's restart count (0 = first attempt)
    backend: str = ""
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ data
    def shard(self, order: list[int], epoch: int, seed: int, shuffle: bool) -> list[int]:
        """This rank's part of an epoch. ``shuffle``: a DistributedSampler over the dataset, reseeded by ``epoch``
        (``order`` only gives the size); else ``order`` (e.g. a class-balanced draw, the same on every rank) split
        like DistributedSampler does (padded to a multiple of the world size)."""
        if not self.enabled:
            return order
        if shuffle:
            sampler = DistributedSampler(range(len(order)), num_replicas=self.world, rank=self.rank, shuffle=True,
                                         seed=seed, drop_last=False)
            sampler.set_epoch(epoch)
            return list(sampler)
        sampler = DistributedSampler(order, num_replicas=self.world, rank=self.rank, shuffle=False, drop_last=False)
        return [order[i] for i in sampler]

    def val_indices(self, n: int) -> list[int]:
        """Unpadded validation shard (every image once over all ranks)."""
        return list(range(self.rank, n, self.world))

    # ------------------------------------------------------------------ reductions
    def sum(self, *values: float) -> list[float]:
        """Element-wise sum over ranks (float64 on CPU: gloo and NCCL both carry it)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def gather_rows(self, indices: list[int], *arrays: np.ndarray) -> list[np.ndarray]:
        """Reassemble per-rank rows (``arrays[k][j]`` belongs to dataset row ``indices[j]``) in dataset order."""
        if not self.enabled:
            return list(arrays)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (indices, *arrays))
        idx = np.concatenate([np.asarray(p[0], np.int64) for p in parts])
        order = np.argsort(idx, kind="stable")
        return [np.concatenate([p[k + 1] for p in parts])[order] for k in range(len(arrays))]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def pauses_here(self, flag: Path) -> bool:
        """Test hook (``train.loop.PAUSE_ENV``): under torchrun only the last rank pauses, on the first attempt,
        and leaves its pid beside the flag so a test can kill exactly that rank."""
        if not self.enabled:
            return True
        if self.rank != self.world - 1 or self.restart:
            return False
        flag.with_name(flag.name + ".pid").write_text(f"{os.getpid()}\n")
        return True

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str, threads: int) -> DistContext:
    """Join torchrun's process group (if any) and pick this rank's device; returns the context.

    ``device`` is the resolved ``--device`` (``cpu`` or ``cuda[:N]``); on CUDA each local rank takes GPU
    ``LOCAL_RANK``. With ``threads`` 0 on CPU, each rank gets ``cores // local ranks`` torch threads, so N ranks
    do not oversubscribe the machine."""
    rank, world, local_rank = env_rank()
    ctx = DistContext(rank=rank, world=world, local_rank=local_rank,
                      local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                      restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), device=device)
    if world <= 1:
        return ctx
    if device.startswith("cuda"):
        ctx.device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        ctx.backend = "nccl"
    else:
        ctx.backend = "gloo"
        if threads <= 0:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.local_world)))
    timeout = datetime.timedelta(minutes=30)
    # torchrun's store can outlive a restart of the group: keys of a dead attempt (a dead rank's gloo address) must
    # not be read by the next one, so each attempt gets its own prefix.
    store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    store = dist.PrefixStore(f"sem_train/attempt_{ctx.restart}", store)
    dist.init_process_group(ctx.backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return ctx


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """The module to train with: DDP around ``model`` under torchrun (``model`` itself is what gets saved)."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.local_rank] if ctx.backend == "nccl" else None
    return DistributedDataParallel(model, device_ids=ids)
