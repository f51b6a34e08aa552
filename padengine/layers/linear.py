"""Linear layers through an op set's `linear(x, weight, bias)` (as F.linear): one projection, or several
fused into one matmul; and the token embedding. Their tensor-parallel splits are in
`padengine/distributed/parallel.py`. None of them initializes its weights: a model is built on the `meta`
device and then loaded (or materialized), and a random init on `meta` runs torch's Python reference ops,
whose first call imports torch._dynamo and with it Triton (whose bindings then report leaks at exit)."""
import torch
from torch import nn


class Linear(nn.Linear):
    """nn.Linear through the op set's `linear(x, weight, bias)` (as F.linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kernel):
        super().__init__(in_features, out_features, bias=bias)
        self.kernel = kernel

    def reset_parameters(self) -> None:
        pass        # loaded later (module docstring)

    def forward(self, x):
        return self.kernel(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass        # loaded later (module docstring)


class FusedLinear(Linear):
    """One matmul for several projections that read the same input; `shards` are their output sizes."""

    def __init__(self, in_features: int, shards: list[int], bias: bool, kernel):
        super().__init__(in_features, sum(shards), bias, kernel)
        self.shards = shards

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        start = sum(self.shards[:index])
        return param.narrow(0, start, self.shards[index])
