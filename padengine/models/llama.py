"""The Llama family (Llama 2/3, Mistral, Qwen2) as one lean torch model that runs on the paged KV cache.

Read top to bottom: config, attention, MLP, decoder layer, model. Linear layers keep transformers'
parameter names, except that q/k/v and gate/up are fused into one matmul each (`PACKED` tells the
loader where each checkpoint tensor goes).
"""
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from padengine.layers.attention import AttnBatch, paged_attention, write_kv
from padengine.layers.rotary import RotaryEmbedding

SUPPORTED = ("llama", "mistral", "qwen2")

# checkpoint name -> (fused parameter, shard index)
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None

    @classmethod
    def from_hf(cls, c) -> "ModelConfig":
        rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(c, "rope_theta", 10000.0)
        window = getattr(c, "sliding_window", None)
        if c.model_type == "qwen2" and not getattr(c, "use_sliding_window", False):
            window = None
        attn_bias = bool(getattr(c, "attention_bias", False))
        return cls(
            model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            rms_norm_eps=c.rms_norm_eps, rope_theta=float(theta), rope_scaling=rope or None,
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=attn_bias or c.model_type == "qwen2", o_bias=attn_bias,
            mlp_bias=bool(getattr(c, "mlp_bias", False)), sliding_window=window)


def rms_norm(x, weight, eps: float, residual=None):
    """Returns (normed, residual): with `residual`, x + residual is normed and becomes the new residual;
    without, x itself is. The norm runs in float32 and is rounded before the weight, as in transformers."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = rms_norm      # the runner may swap in the Triton kernel

    def forward(self, x, residual=None):
        return self.kernel(x, self.weight, self.eps, residual)


class FusedLinear(nn.Linear):
    """One matmul for several projections that read the same input; `shards` are their output sizes."""

    def __init__(self, in_features: int, shards: list[int], bias: bool):
        super().__init__(in_features, sum(shards), bias=bias)
        self.shards = shards

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        start = sum(self.shards[:index])
        return param.narrow(0, start, self.shards[index])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = FusedLinear(cfg.hidden_size, [q, kv, kv], bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=cfg.o_bias)
        self.rope = rope
        self.scale = self.head_dim ** -0.5
        self.k_cache = self.v_cache = None  # views into the model's KV pool, set by the runner
        self.store, self.attend = write_kv, paged_attention   # the runner may swap in Triton kernels

    def forward(self, x, positions, batch: AttnBatch):
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.shards, dim=-1)
        q = q.view(-1, self.heads, self.head_dim)
        k = k.view(-1, self.kv_heads, self.head_dim)
        v = v.view(-1, self.kv_heads, self.head_dim)
        q, k = self.rope(positions, q, k)
        self.store(self.k_cache, self.v_cache, k, v, batch.slot_mapping)
        out = self.attend(q, self.k_cache, self.v_cache, batch, self.scale)
        return self.o_proj(out.flatten(1))


def silu_and_mul(x):
    """x [T, 2 * I] (gate, then up) -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = FusedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = silu_and_mul     # the runner may swap in the Triton kernel

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(cfg, rope)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, batch):
        """Returns (output, residual): the residual add of each sub-block is left to the next norm,
        which fuses it."""
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.rope = rope = RotaryEmbedding(cfg.head_dim, max_len, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, batch):
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, batch)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """Trunk + LM head."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg, max_len)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def materialize(self, device, dtype) -> "CausalLM":
        """Allocate (uninitialized) weights of a model built on `meta`, ready for the loader."""
        self.to_empty(device=device).to(dtype=dtype)
        self.model.rope.build()
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        return self

    def forward(self, input_ids, positions, batch: AttnBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] of the new tokens (after the final norm)."""
        return self.model(input_ids, positions, batch)

    def logits(self, hidden: torch.Tensor, value_head: nn.Linear | None = None) -> torch.Tensor:
        """LM-head logits; a PersRM's value head (`summary`), when given, maps the hidden state first."""
        if value_head is not None:
            hidden = value_head(hidden)
        return self.lm_head(hidden)
