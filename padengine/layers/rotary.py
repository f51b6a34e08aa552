"""Rotary position embeddings (RoPE), including Llama 3 frequency scaling.

Computed the same way as the reference transformers implementation so float32 runs agree bit for bit
on the angles: inv_freq from an int64 arange, angles as position * inv_freq in float32.
"""
import math

import torch


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Holds a cos/sin table for every position up to max_len; applies it to q and k."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict | None, kernel=None):
        super().__init__()
        self.head_dim, self.max_len, self.theta, self.scaling = head_dim, max_len, theta, scaling or {}
        self.kind = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if self.kind not in ("default", "llama3"):
            raise ValueError(f"rope_scaling: type {self.kind!r} is not supported (default and llama3 are)")
        self.register_buffer("cos", torch.empty(max_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_len, head_dim), persistent=False)
        self.kernel = kernel or apply_rotary    # an op set's rotary, as apply_rotary
        self.build()

    def build(self):
        """(Re)compute the float32 table in place, e.g. after the model was materialized from `meta`."""
        device = self.cos.device
        if device.type == "meta":
            return
        arange = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (arange / self.head_dim))
        if self.kind == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        freqs = torch.arange(self.max_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim]; positions: [T]."""
        return self.kernel(positions, q, k, self.cos, self.sin)


def apply_rotary(positions, q, k, cos, sin):
    """Rotate q and k by the float32 cos/sin table rows of their positions (rounded to q's dtype first)."""
    cos = cos[positions].unsqueeze(1).to(q.dtype)
    sin = sin[positions].unsqueeze(1).to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
