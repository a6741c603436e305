"""A resumable, rank-sharded random sampler: its position is part of every checkpoint, so resume continues the epoch."""
import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Seeded permutation per epoch; yields this rank's share from `position` on. state_dict() = (epoch, position).

    Ranks take the epoch order in blocks of `block` (the per-rank micro-batch): rank r takes blocks r, r+N, r+2N...
    so the k-th sample rank r yields is order[(k // b) * b*N + r*b + k % b], the run-wide sample index that
    engine/distributed.global_sample_index gives it (block = 1 is the plain order[rank::N] split). An epoch keeps the
    largest multiple of b*N samples, so N ranks and one process see the same epochs when the size divides evenly.
    """

    def __init__(self, dataset_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 block: int = 1, tag_epochs: bool = False):
        if dataset_size < block * world_size:
            raise ValueError(f"dataset has {dataset_size} samples, fewer than one global micro-batch of {block} "
                             f"x {world_size} ranks")
        self.dataset_size, self.seed, self.shuffle = dataset_size, seed, shuffle
        self.rank, self.world_size, self.block = rank, world_size, block
        # tag_epochs: yield index + epoch * dataset_size, so a dataset can key its augmentation by (epoch, index) and
        # a resumed run sees the same crops (datasets that want it decode with divmod; see video_data.py).
        self.tag_epochs = tag_epochs
        self.epoch, self.position = 0, 0  # position counts samples this rank has yielded in the current epoch

    def per_rank(self) -> int:
        return self.dataset_size // (self.block * self.world_size) * self.block

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            order = list(range(self.dataset_size))
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        b, n = self.block, self.world_size
        return [order[(k // b) * b * n + self.rank * b + k % b] for k in range(self.per_rank())]

    def __iter__(self):
        # Endless: the train loop counts optimizer steps, not epochs.
        while True:
            order = self.epoch_order(self.epoch)
            while self.position < len(order):
                index = order[self.position]
                self.position += 1
                yield index + self.epoch * self.dataset_size if self.tag_epochs else index
            self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.per_rank()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
