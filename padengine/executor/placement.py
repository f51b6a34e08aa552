"""Where each model lives: which models exist, on which ranks and devices, and which KV pool each stream uses.

Model m's streams live in KV pool m. Model 0 is the base. The reward streams (`Placement.reward`) go to
model 0 itself when the reward folder is the base's (one model, one pool, base and reward streams in one
forward), to model 1 otherwise, and nowhere without a reward model. Each model is split across its ranks
(tensor parallelism, one process per rank; rank 0 is the engine's own process, which schedules). The
reward model shares the base's ranks unless `reward_device` gives it one of its own:

    setting                                 base (model 0)          reward (model 1)
    Engine(b, r)                            rank 0 on `device`      rank 0 on `device`
    Engine(b, r, tensor_parallel_size=2)    ranks 0, 1              ranks 0, 1 (same shards of the vocab)
    Engine(b, r, reward_device="cuda:1")    rank 0 on cuda:0        rank 1 on cuda:1
    tensor_parallel_size=4, reward "cuda:4" ranks 0-3 on cuda:0-3   rank 4 on cuda:4
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from padengine.distributed.parallel import Shard


@dataclass(frozen=True)
class ModelPlace:
    path: str
    field: str                          # the engine argument it came from, for errors
    ranks: tuple[int, ...]              # the ranks holding a shard, in shard order
    devices: tuple[torch.device, ...]   # each rank's device


@dataclass(frozen=True)
class Placement:
    models: tuple[ModelPlace, ...]
    reward: int | None                  # the model (and KV pool) of the reward streams; None: no reward model

    @property
    def world_size(self) -> int:
        return 1 + max(r for m in self.models for r in m.ranks)

    @property
    def shared(self) -> bool:
        """Base and reward are one model: their streams run in one forward over one pool."""
        return self.reward == 0

    @property
    def reward_apart(self) -> bool:
        """The reward model runs on ranks of its own (role placement)."""
        return self.reward == 1 and not set(self.models[0].ranks) & set(self.models[1].ranks)

    def held(self, rank: int) -> list[bool]:
        """Per model, whether `rank` holds a shard of it."""
        return [rank in m.ranks for m in self.models]

    def device(self, rank: int) -> torch.device:
        return next(m.devices[m.ranks.index(rank)] for m in self.models if rank in m.ranks)

    def per_model(self, bases: list, rewards: list) -> list[list]:
        """The streams of each model's forward, in hidden-row order: base streams, then reward streams."""
        if self.reward is None:
            return [bases]
        return [bases + rewards] if self.shared else [bases, rewards]

    def describe(self) -> str:
        return "; ".join(f"{m.field} on {', '.join(map(str, m.devices))} (ranks {', '.join(map(str, m.ranks))})"
                         for m in self.models)


def place(base_model: str, reward_model: str | None, shared: bool, device: torch.device,
          tensor_parallel_size: int, reward_device: torch.device | None) -> Placement:
    """The placement of a configuration (EngineConfig has validated its fields)."""
    tp = tensor_parallel_size
    ranks = tuple(range(tp))
    base = ModelPlace(base_model, "base_model", ranks, tuple(_rank_device(device, r) for r in ranks))
    if reward_model is None or shared:
        return Placement((base,), None if reward_model is None else 0)
    if reward_device is None:
        reward = ModelPlace(reward_model, "reward_model", ranks, base.devices)
    else:
        reward = ModelPlace(reward_model, "reward_model", (tp,), (reward_device,))
    return Placement((base, reward), 1)


def _rank_device(device: torch.device, rank: int) -> torch.device:
    """Tensor-parallel rank r of a model on cuda:i runs on cuda:i+r; on the CPU every rank is a process."""
    return torch.device("cuda", device.index + rank) if device.type == "cuda" else device


def rank_shards(placement: Placement, rank: int, base_vocab: int) -> list[Shard | None]:
    """Per model, this rank's shard (None: the rank holds none of it). Every rank calls this in the same
    order: it creates the process group of each set of ranks a model is split over."""
    groups = {}
    for m in placement.models:
        if len(m.ranks) > 1 and m.ranks not in groups:
            whole = len(m.ranks) == placement.world_size
            groups[m.ranks] = dist.group.WORLD if whole else dist.new_group(list(m.ranks))
    return [None if rank not in m.ranks else Shard() if len(m.ranks) == 1 else
            Shard(m.ranks.index(rank), len(m.ranks), groups[m.ranks], -(-base_vocab // len(m.ranks)))
            for m in placement.models]
