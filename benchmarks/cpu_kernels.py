"""The C++ CPU op set (kernels="cpp") against the torch references, side by side in one process.

ops   each op at batch 16 and 64, context 512 and 2048, SmolLM2-135M (9 q / 3 kv heads) and Llama-3.2-1B
      (32 / 8) shapes: decode attention with its KV write (one layer), the PAD sampler (top-k 10, a reward
      row each), RMSNorm with the residual add, rotary, SiLU-and-multiply and the layer's matmuls.
linear  a layer's four matmuls at 1-16 rows: oneDNN's packed matmul (the "cpp" column) against torch's
      F.linear, which `kernels="cpp"` keeps for float32 products of at most csrc.ops.GEMV_ROWS rows.
step  the default model's decode step (forward, LM head, sampler) for 8 requests guiding themselves (16
      rows), at contexts 128 / 1024 / 2048: kernels="torch" vs "cpp", the step's linear layers alone, and the
      attention + KV write + sampler part alone; then the cpp step once more, each op timed where it runs.

Each figure is the median of --reps timed runs (torch and cpp interleaved), with the range beside it.

    python benchmarks/cpu_kernels.py [--only ops|linear|step] [--dtype float32 bfloat16] [--reps 5] [--json FILE]
    (the README's tables: `--reps 5`, all defaults)
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from csrc.ops import packed_linear  # noqa: E402
from padengine import Engine  # noqa: E402
from padengine.default_model import default_model_path  # noqa: E402
from padengine.kernels import get_ops  # noqa: E402
from padengine.layers.attention import AttnBatch  # noqa: E402
from padengine.layers.linear import Linear  # noqa: E402
from padengine.layers.rotary import RotaryEmbedding  # noqa: E402
from padengine.models.llama import MLP, Attention, RMSNorm  # noqa: E402

SHAPES = {  # hidden, q heads, kv heads, head dim, intermediate, vocab
    "SmolLM2-135M": (576, 9, 3, 64, 1536, 49152),
    "Llama-3.2-1B": (2048, 32, 8, 64, 8192, 128256),
    "tiny": (64, 4, 2, 16, 128, 300),       # the smoke test's
}
BLOCK = 16


def timed(fns: dict, reps: int, inner: int = 1) -> dict:
    """{name: (median, min, max) ms}, the callables run in turn each rep after one warm-up call each."""
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                f()
            times[name].append((time.perf_counter() - start) / inner * 1e3)
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def decode_batch(rows: int, ctx: int, blocks: int) -> tuple[AttnBatch, torch.Tensor]:
    """`rows` decoding sequences of `ctx` tokens (the last one new) on shuffled blocks of a pool."""
    per = -(-ctx // BLOCK)
    tables = torch.randperm(blocks)[:rows * per].view(rows, per)
    positions = torch.full((rows,), ctx - 1)
    slots = tables[:, -1] * BLOCK + (ctx - 1) % BLOCK
    return AttnBatch(rows, slots, tables, torch.full((rows,), ctx), [1] * rows, [ctx] * rows), positions


def op_rows(dtype, reps, shapes, batches, contexts):
    sets = {name: get_ops(name) for name in ("torch", "cpp")}
    out = []
    for shape in shapes:
        hidden, heads, kv_heads, dim, inter, vocab = SHAPES[shape]
        for batch in batches:
            for ctx in contexts:
                blocks = batch * -(-ctx // BLOCK) + 1
                k_cache, v_cache = (torch.randn(blocks, BLOCK, kv_heads, dim).to(dtype) for _ in range(2))
                attn, positions = decode_batch(batch, ctx, blocks)
                q, k, v = (torch.randn(batch, h, dim).to(dtype) for h in (heads, kv_heads, kv_heads))
                calls = {name: (lambda o=o: (o.write_kv(k_cache, v_cache, k, v, attn.slot_mapping),
                                             o.attention(q, k_cache, v_cache, attn, dim ** -0.5)))
                         for name, o in sets.items()}
                out.append((shape, batch, ctx, "attention + KV write", timed(calls, reps)))
            base, reward = torch.randn(batch, vocab).to(dtype), torch.randn(batch, vocab)
            rows = lambda v, dt=torch.float32: torch.full((batch,), v, dtype=dt)
            args = (base, reward, rows(10, torch.long), rows(1.0), rows(0.0), rows(0, torch.long), rows(5, torch.long))
            x, res = torch.randn(batch, hidden).to(dtype), torch.randn(batch, hidden).to(dtype)
            w = torch.ones(hidden).to(dtype)
            qr, kr = torch.randn(batch, heads, dim).to(dtype), torch.randn(batch, kv_heads, dim).to(dtype)
            cos, sin = torch.randn(4096, dim), torch.randn(4096, dim)
            weights = [torch.randn(n, k_).to(dtype) * 0.02 for n, k_ in
                       ((heads * dim + 2 * kv_heads * dim, hidden), (hidden, heads * dim), (2 * inter, hidden),
                        (hidden, inter))]
            inputs = [torch.randn(batch, wt.shape[1]).to(dtype) for wt in weights]
            gate_up = torch.randn(batch, 2 * inter).to(dtype)
            for name, make in (("PAD sampler", lambda o: lambda: o.sample(*args, max_k=10)),
                               ("RMSNorm + residual", lambda o: lambda: o.rms_norm(x, w, 1e-5, res)),
                               ("rotary", lambda o: lambda: o.rotary(positions % 4096, qr, kr, cos, sin)),
                               ("SiLU and mul", lambda o: lambda: o.silu_and_mul(gate_up)),
                               ("layer matmuls", lambda o: lambda: [o.linear(a, wt) for a, wt in
                                                                    zip(inputs, weights)])):
                out.append((shape, batch, "-", name, timed({n: make(o) for n, o in sets.items()}, reps, inner=5)))
    return out


def linear_rows(dtype, reps, shapes, rows=(1, 2, 4, 8, 16)):
    """A layer's four matmuls: torch's F.linear against the packed matmul, whatever the row count."""
    out = []
    for shape in shapes:
        hidden, heads, kv_heads, dim, inter, _ = SHAPES[shape]
        weights = [torch.randn(n, k_).to(dtype) * 0.02 for n, k_ in
                   ((heads * dim + 2 * kv_heads * dim, hidden), (hidden, heads * dim), (2 * inter, hidden),
                    (hidden, inter))]
        for m in rows:
            inputs = [torch.randn(m, wt.shape[1]).to(dtype) for wt in weights]
            calls = {name: (lambda f=f: [f(a, wt) for a, wt in zip(inputs, weights)])
                     for name, f in (("torch", torch.nn.functional.linear), ("cpp", packed_linear))}
            out.append((shape, m, "-", "layer matmuls, packed", timed(calls, reps, inner=5)))
    return out


# what Step.breakdown times: (module type, ((its attribute, the part it is counted in), ...))
STEP_PARTS = ((Linear, (("forward", "linear"),)), (RMSNorm, (("forward", "norm"),)),
              (RotaryEmbedding, (("forward", "rotary"),)),
              (Attention, (("store", "KV write"), ("attend", "attention"))), (MLP, (("act", "SiLU and mul"),)))


class Step:
    """One decode step of a model guiding itself, on an engine's own model and KV pool (random K/V)."""

    def __init__(self, path: str, dtype: str, kernels: str, ctxs: list[int], requests: int):
        self.rows, self.requests = 2 * requests, requests
        blocks = self.rows * -(-max(ctxs) // BLOCK) + 1
        self.engine = Engine(path, path, dtype=dtype, kernels=kernels, num_kv_blocks=blocks,
                             max_model_len=max(ctxs) + BLOCK, max_num_seqs=requests)
        self.runner, self.model = self.engine.runner, self.engine.runner.models[0]
        self.sample = self.runner.ops.sample        # an attribute of its own, which `breakdown` times
        for layer in self.model.model.layers:
            layer.self_attn.k_cache.normal_()
            layer.self_attn.v_cache.normal_()
        self.blocks, self.dtype = blocks, self.engine.config.torch_dtype
        rows = lambda v, dt=torch.float32: torch.full((requests,), v, dtype=dt)
        self.params = (rows(10, torch.long), rows(1.0), rows(0.0), rows(0, torch.long), rows(5, torch.long))

    def at(self, ctx: int):
        torch.manual_seed(ctx)
        self.batch, self.positions = decode_batch(self.rows, ctx, self.blocks)
        self.ids = torch.randint(0, self.model.config.vocab_size, (self.rows,))
        c = self.model.config
        self.q = torch.randn(self.rows, c.num_heads, c.head_dim).to(self.dtype)
        self.k = torch.randn(self.rows, c.num_kv_heads, c.head_dim).to(self.dtype)
        self.logits = torch.randn(self.requests, c.vocab_size).to(self.dtype), torch.randn(self.requests, c.vocab_size)
        self.matmul_inputs = [torch.randn(self.rows, n).to(self.dtype) for n in
                              (c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size)]

    @torch.inference_mode()
    def full(self):
        logits = self.model.logits(self.model(self.ids, self.positions, self.batch))
        n = self.requests
        return self.sample(logits[:n], logits[n:].float(), *self.params, max_k=10)

    def op_by_op(self, fn=None):
        """`fn` (default: `full`) with each decoder layer's modules run op by op, not as one native call."""
        layers = self.model.model.layers
        saved = [layer.fused for layer in layers]
        for layer in layers:
            layer.fused = None
        try:
            return (fn or self.full)()
        finally:
            for layer, fused in zip(layers, saved):
                layer.fused = fused

    @torch.inference_mode()
    def matmuls(self):
        """The step's linear layers alone (the LM head's included), on inputs of their shapes made once."""
        x, attended, act = self.matmul_inputs
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.qkv_proj(x), a.o_proj(attended), m.gate_up_proj(x), m.down_proj(act)
        self.model.lm_head(x)

    @torch.inference_mode()
    def attention_and_sampler(self):
        ops = self.runner.ops
        for layer in self.model.model.layers:
            a = layer.self_attn
            ops.write_kv(a.k_cache, a.v_cache, self.k, self.k, self.batch.slot_mapping)
            ops.attention(self.q, a.k_cache, a.v_cache, self.batch, a.scale)
        ops.sample(*self.logits, *self.params, max_k=10)

    def breakdown(self, reps: int) -> dict:
        """Median ms per part of `full` run op by op, each op timed where it runs in the step (inputs as the
        step leaves them, not warm in cache): the linear layers, attention, KV write, norms, rotary,
        SiLU-and-multiply, the sampler, and the rest (Python, views, the embedding)."""
        spent = {}

        def timing(fn, part):
            def timed_call(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    spent[part] = spent.get(part, 0.0) + time.perf_counter() - start
            return timed_call
        wrapped = [(self, "sample", "sampler")] + [
            (m, name, part) for m in self.model.modules() for kind, names in STEP_PARTS if isinstance(m, kind)
            for name, part in names]
        saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in wrapped]   # instance attributes, or None
        for obj, name, part in wrapped:
            obj.__dict__[name] = timing(getattr(obj, name), part)
        runs = []
        try:
            for _ in range(reps + 1):
                spent.clear()
                start = time.perf_counter()
                self.op_by_op()
                runs.append({"step": time.perf_counter() - start, **spent})
        finally:
            for obj, name, own in saved:
                if own is None:
                    del obj.__dict__[name]
                else:
                    obj.__dict__[name] = own
        med = {k: statistics.median(r[k] for r in runs[1:]) * 1e3 for k in runs[-1]}
        med["rest"] = med["step"] - sum(v for k, v in med.items() if k != "step")
        return med


def step_rows(dtype, reps, path, ctxs, requests=8):
    steps = {k: Step(path, dtype, k, list(ctxs), requests) for k in ("torch", "cpp")}
    out = []
    for ctx in ctxs:
        for s in steps.values():
            s.at(ctx)
        for part in ("full", "attention_and_sampler", "matmuls"):
            fns = {k: getattr(s, part) for k, s in steps.items()}
            out.append(("default model", 2 * requests, ctx, part, timed(fns, reps)))
        cpp = steps["cpp"]
        # alternating, so that one drift falls on all three
        t = {k: v[0] for k, v in timed({"step": cpp.full, "op by op": cpp.op_by_op, "matmuls": cpp.matmuls},
                                       2 * reps).items()}
        parts = cpp.breakdown(reps)
        print(f"ctx {ctx}: the cpp step takes {t['step'] / t['matmuls']:.2f}x its linear layers' time, "
              f"{t['op by op'] / t['matmuls']:.2f}x with its layers op by op ({t['step']:.1f} / "
              f"{t['op by op']:.1f} / {t['matmuls']:.1f} ms, alternating); op by op in place (ms): " +
              ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    return out


def show(rows, dtype):
    print(f"\n{dtype}, {torch.get_num_threads()} threads; ms per call, median [min-max]")
    print(f"{'shape':14} {'batch':>5} {'ctx':>5}  {'op':22} {'torch':>22} {'cpp':>22} {'speedup':>7}")
    for shape, batch, ctx, op, t in rows:
        fmt = lambda m: f"{m[0]:8.3f} [{m[1]:.3f}-{m[2]:.3f}]"
        print(f"{shape:14} {batch:>5} {ctx:>5}  {op:22} {fmt(t['torch']):>22} {fmt(t['cpp']):>22} "
              f"{t['torch'][0] / t['cpp'][0]:6.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["ops", "linear", "step"])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shapes", nargs="+", default=["SmolLM2-135M", "Llama-3.2-1B"], choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[16, 64], help="ops: batch sizes")
    p.add_argument("--op-contexts", nargs="+", type=int, default=[512, 2048], help="ops: attention contexts")
    p.add_argument("--model", help="step: the model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--contexts", nargs="+", type=int, default=[128, 1024, 2048], help="step: contexts")
    p.add_argument("--json")
    args = p.parse_args()
    results = {}
    for dtype in args.dtype:
        only = lambda part: args.only in (None, part)
        rows = op_rows(getattr(torch, dtype), args.reps, args.shapes, args.batches, args.op_contexts) \
            if only("ops") else []
        rows += linear_rows(getattr(torch, dtype), args.reps, args.shapes) if only("linear") else []
        rows += step_rows(dtype, args.reps, args.model or default_model_path(), args.contexts) if only("step") else []
        show(rows, dtype)
        results[dtype] = [dict(shape=s, batch=b, ctx=c, op=o, **{k: v for k, v in t.items()}) for s, b, c, o, t in rows]
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
