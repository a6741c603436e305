"""A resumable, rank-sharded random sampler: its position is part of every checkpoint, so resume continues the epoch."""
import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Seeded permutation per epoch; yields this rank's share from `position` on. state_dict() = (epoch, position)."""

    def __init__(self, dataset_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if dataset_size < world_size:
            raise ValueError(f"dataset has {dataset_size} samples, fewer than the {world_size} ranks that share it")
        self.dataset_size, self.seed, self.shuffle = dataset_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0  # position counts samples this rank has yielded in the current epoch

    def per_rank(self) -> int:
        return self.dataset_size // self.world_size

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            order = list(range(self.dataset_size))
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        return order[self.rank : self.per_rank() * self.world_size : self.world_size]

    def __iter__(self):
        # Endless: the train loop counts optimizer steps, not epochs.
        while True:
            order = self.epoch_order(self.epoch)
            while self.position < len(order):
                index = order[self.position]
                self.position += 1
                yield index
            self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.per_rank()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
