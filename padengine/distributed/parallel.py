"""Tensor parallelism: a model's layers split across the ranks of a process group.

Column-parallel layers (q/k/v, gate/up) keep a slice of their output features and need no communication;
row-parallel layers (o, down) keep the matching slice of their input features and all-reduce the partial
sums (one all-reduce each, the bias added once after it). Query heads are split evenly; KV heads too, or
replicated (each rank keeps the one its query heads read) when there are fewer KV heads than ranks. The
embedding and the LM head keep one slice of the vocabulary (`Shard.vocab_range`): the embedding all-reduces
its rows (zeros for ids another rank holds), the LM head's logits stay split for the distributed sampler.
Each split layer's `take(param, tensor, part)` cuts its rank's piece from a checkpoint tensor (the loader).

`Shard()` (rank 0 of 1) builds the plain single-device layers, unchanged.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from padengine.errors import require
from padengine.layers.linear import Embedding, FusedLinear, Linear


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    size: int = 1
    group: object = None            # the process group of the model's ranks (None: size 1)
    vocab_chunk: int = 0            # vocabulary ids per rank: ceil(base vocabulary / size), the same for
                                    # both models, so a rank's base and reward logits cover the same ids

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        """The ids [start, end) of a `vocab`-wide row this rank holds; the last rank also holds the ids
        past the base vocabulary (a reward vocabulary padded wider)."""
        if self.size == 1:
            return 0, vocab
        start = self.rank * self.vocab_chunk
        return start, vocab if self.rank == self.size - 1 else start + self.vocab_chunk

    def heads(self, heads: int, kv_heads: int) -> tuple[int, int, int, int]:
        """(query heads, KV heads, first query head, first KV head) of this rank."""
        local = heads // self.size
        if kv_heads >= self.size:
            return local, kv_heads // self.size, self.rank * local, self.rank * kv_heads // self.size
        return local, 1, self.rank * local, self.rank * kv_heads // self.size

    def column(self, in_features: int, parts: list[tuple[int, int]], bias: bool, kernel) -> FusedLinear:
        """Fused projections, this rank's rows (start, size) of each part's output features."""
        if self.size == 1:
            return FusedLinear(in_features, [n for _, n in parts], bias, kernel)
        return ColumnParallelLinear(in_features, parts, bias, kernel)

    def row(self, in_features: int, out_features: int, bias: bool, kernel) -> Linear:
        if self.size == 1:
            return Linear(in_features, out_features, bias, kernel)
        return RowParallelLinear(in_features, out_features, bias, kernel, self)

    def embedding(self, vocab: int, hidden: int) -> Embedding:
        return Embedding(vocab, hidden) if self.size == 1 else VocabParallelEmbedding(vocab, hidden, self)

    def lm_head(self, hidden: int, vocab: int, kernel) -> Linear:
        if self.size == 1:
            return Linear(hidden, vocab, False, kernel)
        return ParallelLMHead(hidden, vocab, kernel, self)


def check_splits(cfg, size: int, base_vocab: int, field: str) -> None:
    """That a model (a ModelConfig) splits over `size` ranks; errors name the engine argument `field`."""
    why = f"does not split over tensor_parallel_size={size}"
    require(cfg.num_heads % size == 0, field, f"{cfg.num_heads} attention heads: {why}")
    kv = cfg.num_kv_heads
    require(kv % size == 0 if kv >= size else size % kv == 0, field, f"{kv} KV heads: {why} (nor replicate)")
    require(cfg.intermediate_size % size == 0, field, f"intermediate_size {cfg.intermediate_size}: {why}")
    require(-(-base_vocab // size) * (size - 1) < base_vocab, field, f"a vocabulary of {base_vocab}: {why}")


class ColumnParallelLinear(FusedLinear):
    def __init__(self, in_features: int, parts: list[tuple[int, int]], bias: bool, kernel):
        super().__init__(in_features, [n for _, n in parts], bias, kernel)
        self.starts = [s for s, _ in parts]

    def take(self, param: str, tensor: torch.Tensor, part: int | None) -> torch.Tensor:
        return tensor.narrow(0, self.starts[part or 0], self.shards[part or 0])


class RowParallelLinear(Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, kernel, tp: Shard):
        super().__init__(in_features // tp.size, out_features, bias, kernel)
        self.tp = tp

    def take(self, param: str, tensor: torch.Tensor, part: int | None) -> torch.Tensor:
        n = self.in_features
        return tensor.narrow(1, self.tp.rank * n, n) if param == "weight" else tensor

    def forward(self, x):
        out = self.tp.all_reduce(self.kernel(x, self.weight, None))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(Embedding):
    def __init__(self, vocab: int, hidden: int, tp: Shard):
        self.start, end = tp.vocab_range(vocab)
        super().__init__(end - self.start, hidden)
        self.tp = tp

    def take(self, param: str, tensor: torch.Tensor, part: int | None) -> torch.Tensor:
        return tensor.narrow(0, self.start, self.num_embeddings)

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(rows.masked_fill(outside[:, None], 0.0))


class ParallelLMHead(Linear):
    """Logits of this rank's vocabulary slice only (`tp.vocab_range`)."""

    def __init__(self, hidden: int, vocab: int, kernel, tp: Shard):
        self.start, end = tp.vocab_range(vocab)
        super().__init__(hidden, end - self.start, False, kernel)

    def take(self, param: str, tensor: torch.Tensor, part: int | None) -> torch.Tensor:
        return tensor.narrow(0, self.start, self.out_features)
