"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) as one lean torch model that runs on the paged KV cache.

Read top to bottom: config, norms, attention, MLP, decoder layer, model. Linear layers keep transformers'
parameter names, except that q/k/v and gate/up are fused into one matmul each (`PACKED` tells the
loader where each checkpoint tensor goes). Qwen3 adds an RMSNorm over each query and key head
(`q_norm`, `k_norm`) before the rotary embedding. The model is built with an op set (`padengine.kernels`):
every linear layer, norm, the rotary embedding, the activation and the attention call its functions.
Built with a `Shard` of a tensor-parallel group, each layer holds its rank's part (`distributed/parallel.py`).
"""
from dataclasses import dataclass

import torch
from torch import nn

from padengine.distributed.parallel import Shard
from padengine.kernels import Ops, get_ops
from padengine.layers.attention import AttnBatch
from padengine.layers.rotary import RotaryEmbedding

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "llama3")

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
    qk_norm: bool = False       # Qwen3: RMSNorm over each q and k head, before rotary

    @classmethod
    def from_hf(cls, c) -> "ModelConfig":
        """Raises ValueError, naming the config field, for what the engine does not run."""
        rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(c, "rope_theta", 10000.0)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling: type {kind!r} is not supported ({' and '.join(ROPE_TYPES)} are)")
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
            mlp_bias=bool(getattr(c, "mlp_bias", False)), sliding_window=_sliding_window(c),
            qk_norm=c.model_type == "qwen3")


def _sliding_window(c) -> int | None:
    """The one attention window of every layer (None: full attention). Mistral windows every layer;
    Qwen2/Qwen3 only with `use_sliding_window`, and then only layers >= `max_window_layers` (their
    `layer_types`). The engine runs one window per model, so a mix of windowed and full layers is refused."""
    window = getattr(c, "sliding_window", None)
    if c.model_type not in ("qwen2", "qwen3"):
        return window
    if not getattr(c, "use_sliding_window", False) or window is None:
        return None
    first = getattr(c, "max_window_layers", 0)
    types = list(getattr(c, "layer_types", None) or ["sliding_attention" if i >= first else "full_attention"
                                                     for i in range(c.num_hidden_layers)])
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"}:
        return window
    raise ValueError(f"use_sliding_window: a sliding window on some layers only (max_window_layers={first}, "
                     f"layer_types={types}) is not supported; the engine runs one attention window for "
                     f"all layers (set max_window_layers to 0 to window all, or use_sliding_window false)")


class RMSNorm(nn.Module):
    """`kernel(x, weight, eps, residual)` -> (normed, residual): the op set's rms_norm."""

    def __init__(self, dim: int, eps: float, kernel):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = kernel

    def forward(self, x, residual=None):
        return self.kernel(x, self.weight, self.eps, residual)


class HeadRMSNorm(RMSNorm):
    """RMSNorm over each head of x [T, heads, head_dim] (Qwen3's q_norm / k_norm). The kernel gets the
    heads as rows of a contiguous [T * heads, head_dim] copy, as the Triton kernel needs."""

    def forward(self, x):
        return self.kernel(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.eps)[0].view(x.shape)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, ops: Ops, tp: Shard):
        super().__init__()
        self.head_dim = d = cfg.head_dim
        self.heads, self.kv_heads, first_q, first_kv = tp.heads(cfg.num_heads, cfg.num_kv_heads)
        q, kv = self.heads * d, self.kv_heads * d
        self.qkv_proj = tp.column(cfg.hidden_size, [(first_q * d, q), (first_kv * d, kv), (first_kv * d, kv)],
                                  cfg.qkv_bias, ops.linear)
        self.o_proj = tp.row(cfg.num_heads * d, cfg.hidden_size, cfg.o_bias, ops.linear)
        self.q_norm = HeadRMSNorm(self.head_dim, cfg.rms_norm_eps, ops.rms_norm) if cfg.qk_norm else None
        self.k_norm = HeadRMSNorm(self.head_dim, cfg.rms_norm_eps, ops.rms_norm) if cfg.qk_norm else None
        self.rope = rope
        self.scale = self.head_dim ** -0.5
        self.k_cache = self.v_cache = None  # views into the model's KV pool, set by the runner
        self.store, self.attend = ops.write_kv, ops.attention

    def forward(self, x, positions, batch: AttnBatch):
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.shards, dim=-1)
        q = q.view(-1, self.heads, self.head_dim)
        k = k.view(-1, self.kv_heads, self.head_dim)
        v = v.view(-1, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(positions, q, k)
        self.store(self.k_cache, self.v_cache, k, v, batch.slot_mapping)
        out = self.attend(q, self.k_cache, self.v_cache, batch, self.scale)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, tp: Shard):
        super().__init__()
        part = (tp.rank * cfg.intermediate_size // tp.size, cfg.intermediate_size // tp.size)
        self.gate_up_proj = tp.column(cfg.hidden_size, [part, part], cfg.mlp_bias, ops.linear)
        self.down_proj = tp.row(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, ops.linear)
        self.act = ops.silu_and_mul     # [T, 2I] (gate, then up) -> silu(gate) * up

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, ops: Ops, tp: Shard):
        super().__init__()
        self.self_attn = Attention(cfg, rope, ops, tp)
        self.mlp = MLP(cfg, ops, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops.rms_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops.rms_norm)
        # the op set's whole-layer call, which does what the lines of forward do, in one native call
        self.fused = ops.decoder_layer if not cfg.qk_norm and tp.size == 1 else None

    def forward(self, x, residual, positions, batch):
        """Returns (output, residual): the residual add of each sub-block is left to the next norm,
        which fuses it."""
        if self.fused is not None:
            return self.fused(self, x, residual, positions, batch)
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int, ops: Ops, tp: Shard):
        super().__init__()
        self.rope = rope = RotaryEmbedding(cfg.head_dim, max_len, cfg.rope_theta, cfg.rope_scaling, ops.rotary)
        self.embed_tokens = tp.embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope, ops, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops.rms_norm)

    def forward(self, input_ids, positions, batch):
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, batch)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """Trunk + LM head, on the op set `ops` (default: the torch references); `tp` (default: the whole
    model) is this rank's shard of a tensor-parallel group, whose logits cover `tp.vocab_range` only."""

    def __init__(self, cfg: ModelConfig, max_len: int, ops: Ops | None = None, tp: Shard | None = None):
        super().__init__()
        self.config = cfg
        self.tp = tp = tp or Shard()
        ops = ops or get_ops("torch")
        self.model = Transformer(cfg, max_len, ops, tp)
        self.lm_head = tp.lm_head(cfg.hidden_size, cfg.vocab_size, ops.linear)

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
