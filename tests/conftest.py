"""Tiny random checkpoints, built once per test session and saved as safetensors folders."""
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU; it must be on before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen3Config)

CORPUS = ["the quick brown fox jumps over the lazy dog", "write a short poem about the sea and the sky",
          "explain how a computer works in simple words", "be concise and answer in french please",
          "guidelines principles instruction task response considering following principle"] * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer(chat_template: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build(path, config, tokenizer, seed: int, value_head: bool = False, std: float = 0.1,
          random_norms: bool = False) -> str:
    """Save a random model whose logits are spread wide enough that greedy choices are not near-ties.
    `random_norms`: norm weights (initialized to ones) and biases drawn at random too, so that a norm
    or bias skipped or swapped changes the output."""
    torch.manual_seed(seed)
    config.initializer_range = std
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if random_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.5 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if value_head:
        h = config.hidden_size
        save_file({"summary.weight": torch.randn(h, h) * h ** -0.5, "summary.bias": torch.randn(h) * 0.1},
                  os.path.join(path, "value_head.safetensors"))
    return str(path)


def shapes(tokenizer, **kw) -> dict:
    d = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=0, eos_token_id=1, pad_token_id=1)
    d.update(kw)
    return d


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="session")
def llama(tmp_path_factory, tokenizer):
    """Llama, tied embeddings, Llama 3 rope scaling, chat template."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(**shapes(tokenizer, tie_word_embeddings=True, rope_parameters=rope))
    return build(tmp_path_factory.mktemp("llama"), cfg, tokenizer, seed=1)


@pytest.fixture(scope="session")
def persrm(tmp_path_factory, tokenizer):
    """A PersRM: untied Llama with a value head and a vocabulary padded wider than the tokenizer's."""
    cfg = LlamaConfig(**shapes(tokenizer, vocab_size=len(tokenizer) + 12, tie_word_embeddings=False,
                               num_key_value_heads=4))
    return build(tmp_path_factory.mktemp("persrm"), cfg, tokenizer, seed=2, value_head=True)


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory, tokenizer):
    """Qwen2 (q/k/v biases), sharded into two safetensors files with an index."""
    cfg = Qwen2Config(**shapes(tokenizer, tie_word_embeddings=False))
    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(3)
    cfg.initializer_range = 0.1
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path, max_shard_size="200KB")
    tokenizer.save_pretrained(path)
    assert os.path.isfile(path / "model.safetensors.index.json")
    return str(path)


@pytest.fixture(scope="session")
def mistral(tmp_path_factory):
    """Mistral with a sliding window shorter than the test contexts, and no chat template."""
    tok = tiny_tokenizer(chat_template=False)
    cfg = MistralConfig(**shapes(tok, sliding_window=24))
    return build(tmp_path_factory.mktemp("mistral"), cfg, tok, seed=4)


def qwen3_shapes(tokenizer, **kw) -> dict:
    """head_dim 24, unlike hidden_size / num_attention_heads = 16, and grouped-query attention."""
    return shapes(tokenizer, head_dim=24, **kw)


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory, tokenizer):
    """Qwen3: per-head q/k RMSNorm (random weights), no q/k/v bias, explicit head_dim, tied embeddings."""
    cfg = Qwen3Config(**qwen3_shapes(tokenizer, tie_word_embeddings=True))
    return build(tmp_path_factory.mktemp("qwen3"), cfg, tokenizer, seed=5, random_norms=True)


@pytest.fixture(scope="session")
def qwen3_persrm(tmp_path_factory, tokenizer):
    """A Qwen3 PersRM: value head, `attention_bias` (q/k/v/o biases), untied, one kv head, and a sliding
    window (on every layer: max_window_layers=0) shorter than the test contexts."""
    cfg = Qwen3Config(**qwen3_shapes(tokenizer, tie_word_embeddings=False, num_key_value_heads=1,
                                     attention_bias=True, use_sliding_window=True, sliding_window=24,
                                     max_window_layers=0))
    assert set(cfg.layer_types) == {"sliding_attention"}
    return build(tmp_path_factory.mktemp("qwen3_persrm"), cfg, tokenizer, seed=6, value_head=True,
                 random_norms=True)
