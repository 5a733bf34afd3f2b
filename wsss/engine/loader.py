"""The training data stream: per-sample seeded augmentation, a resumable distributed sampler, the
loader and the endless batch iterator that continues mid-epoch exactly where a run stopped."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from wsss.config import Config
from wsss.engine.distributed import DistContext


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] % 2**63)


class SeededSamples(Dataset):
    """Items keyed by ``(epoch, index)``: the augmentation of a sample draws from torch's RNG
    seeded by (train.seed, epoch, index) only, so it is the same whatever the worker, the
    number of workers, the rank, or whether the run was resumed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, epoch, index))
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (permutation from seed + epoch, every world-th index for this rank)
    yielding ``(epoch, index)`` keys, that can start ``skip`` samples into the epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def _worker_init(seed: int, rank: int, worker_id: int) -> None:
    # The augmentation is seeded per sample (SeededSamples); this only keeps numpy / random
    # in the workers distinct and reproducible for any other use.
    worker_seed = _sample_seed(seed, 10_000 + rank, worker_id)
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    torch.manual_seed(worker_seed)


def build_train_loader(dataset: Dataset, cfg: Config, ctx: DistContext,
                       batch_size: int | None = None) -> tuple[DataLoader, ResumableSampler]:
    """Per-process batches of ``batch_size`` (default ``data.batch_size``), drop_last, persistent workers,
    pinned memory on CUDA."""
    batch_size = batch_size or cfg.data.batch_size
    sampler = ResumableSampler(dataset, ctx.world_size, ctx.rank, cfg.train.seed)
    generator = torch.Generator()
    generator.manual_seed(cfg.train.seed + ctx.rank)
    workers = cfg.data.num_workers
    loader = DataLoader(
        SeededSamples(dataset, cfg.train.seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        worker_init_fn=functools.partial(_worker_init, cfg.train.seed, ctx.rank),
        generator=generator,
        prefetch_factor=2 if workers > 0 else None,
    )
    return loader, sampler


def iterate_batches(loader: DataLoader, sampler: ResumableSampler, epoch: int, consumed: int,
                    batch_size: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Endless batches -> (epoch, batches of that epoch consumed so far incl. this one, batch),
    starting ``consumed`` batches into ``epoch`` (the same order as an uninterrupted run)."""
    while True:
        sampler.set_epoch(epoch)
        sampler.skip = consumed * batch_size
        for batch in loader:
            consumed += 1
            yield epoch, consumed, batch
        epoch, consumed = epoch + 1, 0


__all__ = ["ResumableSampler", "SeededSamples", "build_train_loader", "iterate_batches"]
