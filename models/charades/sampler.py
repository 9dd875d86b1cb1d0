"""Resumable batches of item indices for training (frames or videos).

Epoch e visits the items in a permutation drawn from ``numpy.random.default_rng([seed, e])``,
so the whole sampler state is two integers (epoch, position): a checkpoint restores it
exactly, and every process of a distributed run draws the same global batch and takes its
own contiguous share (:meth:`BatchSampler.share`), so that the processes' shares in rank
order are the one-process batch.
"""

from __future__ import annotations

import numpy as np

from fieldlib.errors import FieldlibError

__all__ = ["BatchSampler"]


class BatchSampler:
    """Batches of ``batch`` indices of ``items`` (an int n: 0..n-1, or an index array).

    Args:
        items: the population; batch: indices a batch; seed: the permutation seed.
    """

    def __init__(self, items, batch: int, seed: int = 0):
        self.items = np.arange(items) if np.isscalar(items) else np.asarray(items)
        if self.items.size == 0:
            raise FieldlibError("sampler: nothing to sample from")
        if batch < 1:
            raise FieldlibError(f"sampler: batch size must be >= 1, got {batch}")
        self.batch, self.seed = int(batch), int(seed)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return self.items[np.random.default_rng([self.seed, epoch]).permutation(
            self.items.size)]

    def next(self) -> np.ndarray:
        """The next global batch (crossing into the next epoch when this one runs out)."""
        out = []
        need = self.batch
        while need:
            take = self._order[self.position:self.position + need]
            out.append(take)
            need -= take.size
            self.position += take.size
            if self.position == self._order.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return np.concatenate(out)

    @staticmethod
    def share(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
        """This process's contiguous share of a global batch; FieldlibError unless the batch
        divides evenly."""
        if batch.size % world:
            raise FieldlibError(f"a global batch of {batch.size} does not split evenly over "
                                f"{world} processes")
        k = batch.size // world
        return batch[rank * k:(rank + 1) * k]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "size": int(self.items.size), "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.items.size or state["seed"] != self.seed:
            raise FieldlibError(f"sampler state of {state['size']} items, seed "
                                f"{state['seed']}; this sampler has {self.items.size}, seed "
                                f"{self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
