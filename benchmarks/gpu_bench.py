"""GPU benchmark (run by benchmarks/gpu_check.sh): kernel micro-benchmarks and an end-to-end table.

Kernels: the fused Triton PAD sampler against the torch sampler (vocab 128256, batch 1 and 64), and
Triton paged decode attention against torch SDPA on already-gathered KV; each beside the time to read
its inputs once at the measured copy bandwidth. End to end: random bf16 models of Llama-3.2-1B and
Llama-3-8B shape built on the GPU, base + reward, 64 new tokens, per batch size: the engine in its
default configuration (CUDA graphs and the asynchronous loop) ms/step and tokens/s, the same without
graphs, the synchronous loop (`async_scheduling=False`, whose greedy tokens the default's must equal:
the `same tokens` column), the engine with the base model alone, the transformers PAD loop
(benchmarks/baselines, left-padded batch) and the weight-read floor (both models' weight bytes / copy
bandwidth). Every engine is closed before the next is built, and each gets a KV budget of
`--kv-cache-gb` (the default leaves the rest of the card to the transformers loop).

    PYTHONPATH=. python benchmarks/gpu_bench.py --json out.json
    PYTHONPATH=. python benchmarks/gpu_bench.py --device cpu --shapes tiny --skip-kernels   # a smoke run

`--tensor-parallel-size N` (and `--reward-device`) add a column: the engine with each model split over N
devices (the PersRM on its own device with --reward-device), eagerly (no CUDA graphs with several
processes), beside the one-device eager column. The other ranks' processes load weights from files, so
these runs write the random weights to the temporary folder first (disk for both models in bf16).
    PYTHONPATH=. python benchmarks/gpu_bench.py --shapes llama-3-8b --tensor-parallel-size 2 --skip-kernels
    PYTHONPATH=. python benchmarks/gpu_bench.py --device cpu --shapes tiny --skip-kernels --tensor-parallel-size 2
"""
import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.baselines.hf_pad import HFPad  # noqa: E402
from padengine import Engine, SamplingParams  # noqa: E402
from padengine.models.llama import CausalLM, ModelConfig  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
BATCHES = {"tiny": [1, 2], "llama-3.2-1b": [1, 16, 64], "llama-3-8b": [1, 16]}
PROMPT_LEN = 32


def bench(fn, device) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    x = torch.empty(1 << (28 if device == "cuda" else 22), dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (bench(lambda: y.copy_(x), device) / 1e3)


def kernel_benchmarks(device, bandwidth) -> list[dict]:
    import triton_kernels
    from padengine.layers.sampler import pad_sample
    rows, vocab = [], 128256
    for batch in (1, 64):
        base = torch.randn(batch, vocab, device=device, dtype=torch.bfloat16) * 3
        reward = torch.randn(batch, vocab, device=device, dtype=torch.bfloat16) * 3
        per_row = (torch.full((batch,), 10, device=device), torch.full((batch,), 1.0, device=device),
                   torch.tensor([0.0, 0.7] * (batch // 2) or [0.7], device=device),
                   torch.arange(batch, device=device), torch.arange(batch, device=device))
        # max_k as the engine passes it (the batch's largest k, known on the host): no sync in either
        torch_ms = bench(lambda: pad_sample(base, reward, *per_row, max_k=10), device)
        fused_ms = bench(lambda: triton_kernels.pad_sample(base, reward, *per_row, max_k=10), device)
        floor = 2 * base.numel() * 2 / bandwidth * 1e3
        rows.append(dict(kernel=f"pad_sample batch {batch} vocab {vocab}", torch_ms=torch_ms, triton_ms=fused_ms,
                         floor_ms=floor))
    batch, ctx, heads, kv_heads, dim, bs = 64, 2048, 32, 8, 128, 16
    blocks = batch * ctx // bs
    k_cache = torch.randn(blocks, bs, kv_heads, dim, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(blocks, device=device).view(batch, ctx // bs).to(torch.int32)
    lens = torch.full((batch,), ctx, device=device)
    q = torch.randn(batch, heads, dim, device=device, dtype=torch.bfloat16)
    k = k_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    v = v_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)
    paged = lambda: triton_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim ** -0.5,
                                                          max_context=ctx)
    rows.append(dict(kernel=f"decode attention batch {batch} ctx {ctx} (paged vs SDPA on gathered KV)",
                     torch_ms=bench(sdpa, device), triton_ms=bench(paged, device),
                     floor_ms=2 * k.numel() * 2 / bandwidth * 1e3))
    return rows


class _Tokenizer:
    """Random weights make no text: the engine only needs a vocabulary and a decoder to run."""
    chat_template, eos_token_id = None, None

    def get_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        return ""


def random_model(path, cfg, max_len, dtype, device, field, ops=None, tp=None):
    """`load_model` with random weights (the model still gets the engine's op set), the same ones for a role
    in every engine, so that the columns' tokens can be compared."""
    with torch.device("meta"):
        model = CausalLM(cfg, max_len, ops, tp)
    model.materialize(device, dtype)
    gen = torch.Generator(device).manual_seed(0 if field == "base_model" else 1)
    for p in model.parameters():
        p.data.normal_(0, 0.02, generator=gen)
    return model.eval()


def engine_for(folder, reward: bool, device, kernels, batch, kv_bytes, graphs=None, asynchronous=None,
               **layout) -> Engine:
    """`layout`: tensor_parallel_size / reward_device; with several processes the weights come from the
    folder's files (written by `save_random`), since mock patches do not reach the workers."""
    with contextlib.ExitStack() as patches:
        if not layout:
            patches.enter_context(mock.patch("padengine.executor.model_runner.load_model", random_model))
        patches.enter_context(mock.patch("padengine.engine.llm_engine.load_tokenizer", lambda *a: _Tokenizer()))
        patches.enter_context(mock.patch("padengine.engine.llm_engine.eos_token_ids", lambda *a: set()))
        reward_folder = os.path.join(folder, "reward") if reward else None
        return Engine(os.path.join(folder, "base"), reward_folder, device=device, dtype="bfloat16",
                      max_model_len=PROMPT_LEN + 160, max_num_seqs=max(batch, 1), kernels=kernels,
                      cuda_graphs=graphs, async_scheduling=asynchronous, kv_cache_bytes=kv_bytes, **layout)


def save_random(folder, hf_config) -> None:
    """Random bf16 weights as a checkpoint in `folder` (for worker processes, which load files)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM._from_config(hf_config, dtype=torch.bfloat16).save_pretrained(folder)


def model_bytes(hf_config) -> int:
    """Bytes of one bf16 model's weights, tied embeddings counted once (as the issue's floor counts them)."""
    cfg = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = CausalLM(cfg, 8)
    tied = model.lm_head.weight.numel() if cfg.tie_word_embeddings else 0
    return 2 * (sum(p.numel() for p in model.parameters()) - tied)


def ms_per_step(engine, prompts, max_tokens) -> tuple[float, list[list[int]]]:
    """Mean time per output token after a warm-up run of the same shape (which captures its graphs), and
    the (greedy) tokens."""
    run = lambda n: engine.generate(prompt_token_ids=prompts, params=SamplingParams(max_tokens=n, weight=1.0,
                                                                                    ignore_eos=True))
    run(4)
    outs = run(max_tokens)
    return sum(o.metrics.time_per_output_token for o in outs) / len(outs) * 1e3, [o.token_ids for o in outs]


def engine_ms(folder, reward, device, kernels, batch, prompts, max_tokens, kv_bytes, graphs=None,
              asynchronous=None, **layout) -> tuple[float, list[list[int]]]:
    with engine_for(folder, reward, device, kernels, batch, kv_bytes, graphs, asynchronous, **layout) as engine:
        return ms_per_step(engine, prompts, max_tokens)


def hf_ms_per_step(shape_cfg, device, prompts, max_tokens) -> float:
    from transformers import LlamaForCausalLM
    with torch.device(device):
        models = [LlamaForCausalLM._from_config(shape_cfg, dtype=torch.bfloat16).eval() for _ in range(2)]
    ref = HFPad(models[0], models[1])
    run = lambda n: ref.generate_batch(prompts, [prompts], [1.0], max_tokens=n)
    run(2)
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    run(max_tokens)
    _sync(device)
    t2 = time.perf_counter()
    del ref, models
    return ((t2 - t1) - (t1 - t0)) / (max_tokens - 1) * 1e3


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def end_to_end(shape, device, max_tokens, bandwidth, kernels, batches, kv_bytes, layout):
    """Yields one table row per batch size as soon as it is measured. `layout` (tensor_parallel_size,
    reward_device) adds the `tp_ms` column."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with tempfile.TemporaryDirectory() as folder:
        for role in ("base", "reward"):
            cfg.save_pretrained(os.path.join(folder, role))
            if layout:
                save_random(os.path.join(folder, role), cfg)
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            prompts = [torch.randint(0, cfg.vocab_size, (PROMPT_LEN,), generator=gen).tolist() for _ in range(batch)]
            run = lambda reward, **kw: engine_ms(folder, reward, device, kernels, batch, prompts, max_tokens,
                                                 kv_bytes, **kw)
            pad_ms, tokens = run(True)
            eager_ms, _ = run(True, graphs=False)
            sync_ms, sync_tokens = run(True, asynchronous=False)
            base_ms, _ = run(False)
            tp_ms = run(True, **layout)[0] if layout else None
            hf_ms = hf_ms_per_step(cfg, device, prompts, max_tokens)
            gc.collect()
            floor = 2 * model_bytes(cfg) / bandwidth * 1e3       # base and reward
            yield dict(shape=shape, batch=batch, engine_ms=pad_ms, engine_tok_s=batch / pad_ms * 1e3,
                       eager_ms=eager_ms, sync_ms=sync_ms, same_tokens=tokens == sync_tokens, tp_ms=tp_ms,
                       base_alone_ms=base_ms, hf_ms=hf_ms, hf_tok_s=batch / hf_ms * 1e3, floor_ms=floor,
                       vs_floor=pad_ms / floor, vs_hf=hf_ms / pad_ms)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3-8b"], choices=list(SHAPES))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--kv-cache-gb", type=float, default=4.0, help="each engine's KV budget (both pools)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton", "flash"])
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--json", help="write all numbers here")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="adds a column: each model over N devices")
    p.add_argument("--reward-device", help="with it, the PersRM on this device of its own (e.g. cuda:4)")
    args = p.parse_args()
    layout = {}
    if args.tensor_parallel_size > 1 or args.reward_device:
        layout = dict(tensor_parallel_size=args.tensor_parallel_size, reward_device=args.reward_device)
    tp_name = f"TP {args.tensor_parallel_size}" + (f" + reward on {args.reward_device}" if args.reward_device else "")
    bandwidth = copy_bandwidth(args.device)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "copy_bandwidth_GBps": bandwidth / 1e9, "kernels": [], "end_to_end": []}
    print(f"{result['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    if not args.skip_kernels:
        result["kernels"] = kernel_benchmarks(args.device, bandwidth)
        print("\n| kernel | torch ms | triton ms | speedup | input-read floor ms | triton / floor |\n|---|---|---|---|---|---|")
        for r in result["kernels"]:
            print(f"| {r['kernel']} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['torch_ms'] / r['triton_ms']:.1f}x "
                  f"| {r['floor_ms']:.3f} | {r['triton_ms'] / r['floor_ms']:.1f}x |")
    tp_head = f"| {tp_name} ms/step (eager) | {tp_name} - eager ms " if layout else ""
    print(f"\n| shapes ({args.kernels} kernels) | batch | engine ms/step | engine tok/s | without graphs ms/step "
          "| synchronous loop ms/step | same tokens "
          f"{tp_head}| base alone ms/step | transformers ms/step | transformers tok/s | floor ms | engine / floor "
          "| engine vs transformers |")
    print("|---" * (15 if layout else 13) + "|", flush=True)
    kv_bytes = int(args.kv_cache_gb * 2**30)
    for shape in args.shapes:
        for r in end_to_end(shape, args.device, args.max_tokens, bandwidth, args.kernels, BATCHES[shape], kv_bytes,
                            layout):
            result["end_to_end"].append(r)
            tp_cells = f"| {r['tp_ms']:.2f} | {r['tp_ms'] - r['eager_ms']:+.2f} " if layout else ""
            print(f"| {r['shape']} | {r['batch']} | {r['engine_ms']:.2f} | {r['engine_tok_s']:.0f} "
                  f"| {r['eager_ms']:.2f} | {r['sync_ms']:.2f} | {'yes' if r['same_tokens'] else 'NO'} "
                  f"{tp_cells}| {r['base_alone_ms']:.2f} "
                  f"| {r['hf_ms']:.2f} | {r['hf_tok_s']:.0f} "
                  f"| {r['floor_ms']:.2f} | {r['vs_floor']:.2f}x | {r['vs_hf']:.1f}x |", flush=True)
            if args.json:       # after every row, so a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=2)

if __name__ == "__main__":
    main()
