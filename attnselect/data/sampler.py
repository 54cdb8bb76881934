"""Identity-balanced batch sampler (P identities x K instances per batch), single-process or DDP."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["RandomIdentitySampler"]

logger = logging.getLogger(__name__)


def _pids_of(data_source) -> list[int]:
    if hasattr(data_source, "pids"):
        pids = list(data_source.pids)
    else:
        pids = [item if isinstance(item, int) else item[0] for item in data_source]
    out = []
    for i, p in enumerate(pids):
        if isinstance(p, torch.Tensor):
            p = p.item()
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"RandomIdentitySampler: the identity of index {i} must be an int, got {p!r}")
        out.append(p)
    return out


class RandomIdentitySampler(Sampler[int]):
    """Yields dataset indices so that every consecutive block of ``batch_size`` holds ``batch_size //
    num_instances`` distinct identities with ``num_instances`` samples each (the reference sampler's scheme).

    Per epoch: each identity's indices are shuffled and cut into chunks of ``num_instances`` (an incomplete last
    chunk is dropped; an identity with fewer samples is oversampled with replacement to one chunk); then batches
    are formed by drawing ``P`` random identities that still have chunks, taking one chunk of each, until fewer
    than ``P`` identities remain.

    Unlike the reference sampler the plan of an epoch is a deterministic function of ``(seed, epoch)``, so
    ``len(sampler)`` is exact: it is the number of indices the next ``iter(sampler)`` yields (the reference
    sampler over-counts). Call :meth:`set_epoch` every epoch as with ``DistributedSampler``; without it, each
    iteration advances the epoch by itself.

    Under DDP (``num_replicas > 1``) every rank computes the same plan and takes every ``num_replicas``-th batch
    starting at its rank, truncated so that all ranks get the same number of batches. ``batch_size`` is the
    per-rank batch.

    Args:
        data_source: identities, one per dataset index: a sequence of ints, of samples whose first item is the
            identity, or an object with a ``pids`` attribute (e.g. ``PedesTrainDataset``).
        batch_size: per-rank batch size; a multiple of ``num_instances``.
        num_instances: samples per identity in a batch (2 as published).
        seed: base seed of the epoch plans.
        num_replicas: number of DDP ranks (default: the world size if ``torch.distributed`` is initialised, else 1).
        rank: this rank (default: from ``torch.distributed``, else 0).

    Examples:
        >>> pids = [0, 0, 1, 1, 2, 2, 3, 3]  # identity of each dataset index
        >>> order = list(RandomIdentitySampler(pids, batch_size=4, num_instances=2, seed=0))
        >>> sorted(order)  # every index once in this epoch
        [0, 1, 2, 3, 4, 5, 6, 7]
        >>> all(len({pids[i] for i in order[j : j + 4]}) == 2 for j in (0, 4))  # 2 identities x 2 per batch
        True
    """

    def __init__(
        self,
        data_source,
        batch_size: int,
        num_instances: int = 2,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_instances < 1:
            raise ValueError(f"RandomIdentitySampler: num_instances must be >= 1, got {num_instances}")
        if batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"RandomIdentitySampler: batch_size must be a positive multiple of num_instances={num_instances}, "
                f"got {batch_size}"
            )
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if dist else 1
        if rank is None:
            rank = torch.distributed.get_rank() if dist else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"RandomIdentitySampler: need 0 <= rank < num_replicas, got {rank}, {num_replicas}")
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._explicit_epoch = False
        self.index_dict: dict[int, list[int]] = {}
        for index, pid in enumerate(_pids_of(data_source)):
            self.index_dict.setdefault(pid, []).append(index)
        self.pids = sorted(self.index_dict)
        if len(self.pids) < self.num_pids_per_batch:
            raise ValueError(
                f"RandomIdentitySampler: a batch needs {self.num_pids_per_batch} identities "
                f"(batch_size / num_instances) but the data has only {len(self.pids)}"
            )
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the plan of ``epoch`` (call before iterating, once per epoch)."""
        self.epoch = int(epoch)
        self._explicit_epoch = True

    def _batches(self, epoch: int) -> list[list[int]]:
        """All batches of an epoch (before the DDP split), a pure function of ``(seed, epoch)``."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        k = self.num_instances
        chunks: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            idxs = list(self.index_dict[pid])
            if len(idxs) < k:
                idxs = [rng.choice(idxs) for _ in range(k)]
            rng.shuffle(idxs)
            chunks[pid] = [idxs[i : i + k] for i in range(0, len(idxs) - k + 1, k)]
        available = list(self.pids)
        batches = []
        while len(available) >= self.num_pids_per_batch:
            selected = rng.sample(available, self.num_pids_per_batch)
            batch = []
            for pid in selected:
                batch.extend(chunks[pid].pop())
                if not chunks[pid]:
                    available.remove(pid)
            batches.append(batch)
        self._plan_cache = (epoch, batches)
        return batches

    def _local_batches(self, epoch: int) -> list[list[int]]:
        batches = self._batches(epoch)
        per_rank = len(batches) // self.num_replicas
        return batches[self.rank : per_rank * self.num_replicas : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        batches = self._local_batches(self.epoch)
        if not self._explicit_epoch:
            self.epoch += 1
        return iter([i for b in batches for i in b])

    def __len__(self) -> int:
        return len(self._local_batches(self.epoch)) * self.batch_size

    def num_batches(self) -> int:
        """Batches of ``batch_size`` the next iteration yields on this rank."""
        return len(self._local_batches(self.epoch))


def identities_per_batch(indices: Sequence[int], pids: Sequence[int], batch_size: int) -> list[dict[int, int]]:
    """Count identities in each consecutive block of ``batch_size`` indices (a check helper for tests and logs)."""
    out = []
    for start in range(0, len(indices), batch_size):
        counts: dict[int, int] = {}
        for i in indices[start : start + batch_size]:
            counts[pids[i]] = counts.get(pids[i], 0) + 1
        out.append(counts)
    return out
