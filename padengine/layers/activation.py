"""The MLP's gated activation (torch reference backend)."""
import torch.nn.functional as F


def silu_and_mul(x):
    """x [T, 2 * I] (gate, then up) -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
