"""Per-step cost of several processes on the CPU: tensor parallelism and role placement against one process.

The tiny random base + PersRM of `host_overhead.py` (2 layers, hidden 64, vocabulary 512), so the forward
is small and what TP adds is mostly communication: per decode step, rank 0's wall time, the time it spends
inside torch.distributed calls (the layers' all-reduces, the sampler's gathers, the step broadcast; it
includes waiting for the slower rank) and how many calls and bytes that is. Every layout decodes the same
greedy tokens, which the script checks. Each rank runs torch on one thread.

    PYTHONPATH=. python benchmarks/tp_overhead.py [--batches 1 16] [--steps 30] [--layouts tp1 tp2 reward]
"""
import argparse
import json
import pickle
import tempfile
import time

LAYOUTS = {"tp1": {}, "tp2": {"tensor_parallel_size": 2}, "reward": {"reward_device": "cpu"},
           "tp2+reward": {"tensor_parallel_size": 2, "reward_device": "cpu"}}
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "broadcast_object_list")


class Collectives:
    """Wraps torch.distributed's collectives (as the padengine modules call them) to count calls, tensor
    bytes and wall time on this rank."""

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.calls, self.bytes, self.seconds = dist, 0, 0, 0.0
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES}
        for name, fn in self.saved.items():
            setattr(dist, name, self._timed(fn))

    def _timed(self, fn):
        def timed(first, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(first, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
                self.bytes += _nbytes(first)
        return timed

    def reset(self) -> None:
        self.calls, self.bytes, self.seconds = 0, 0, 0.0

    def restore(self) -> None:
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)


def _nbytes(arg) -> int:
    """A collective's payload on this rank: its tensor, or its tensors, or its pickled objects."""
    import torch
    items = arg if isinstance(arg, list) else [arg]
    if all(isinstance(t, torch.Tensor) for t in items):
        return sum(t.numel() * t.element_size() for t in items)
    return len(pickle.dumps(items))


def measure(base: str, reward: str, batch: int, steps: int, layout: dict) -> tuple[dict, list]:
    """One layout at one batch size: the per-step figures, and a short greedy run's tokens (the check)."""
    from padengine import Engine, SamplingParams
    counter = Collectives()
    engine = Engine(base, reward, block_size=16, max_num_seqs=batch, kernels="torch", dtype="float32", **layout)
    try:
        prompts = [[5 + i % 400, 7, 9, 11] for i in range(batch)]
        check = engine.generate(prompt_token_ids=prompts, params=SamplingParams(max_tokens=8, weight=1.0))
        engine.add_requests(prompt_token_ids=prompts, params=SamplingParams(max_tokens=steps + 8, top_k=10,
                                                                            weight=1.0, ignore_eos=True))
        for _ in range(4):      # the prefill and a few decode steps, before the clock starts
            engine.step()
        compute, step_compute = [0.0], engine.runner.compute

        def timed_compute(x):
            start = time.perf_counter()
            try:
                return step_compute(x)
            finally:
                compute[0] += time.perf_counter() - start
        engine.runner.compute = timed_compute
        counter.reset()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - start
        per = lambda v: v / steps * 1e3
        return dict(batch=batch, step_ms=per(wall), compute_ms=per(compute[0]), comm_ms=per(counter.seconds),
                    calls=counter.calls / steps, kib=counter.bytes / steps / 1024), [o.token_ids for o in check]
    finally:
        engine.close()
        counter.restore()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--layouts", nargs="+", default=["tp1", "tp2", "reward"], choices=list(LAYOUTS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import logging
    logging.disable(logging.WARNING)
    import torch
    torch.set_num_threads(1)
    from benchmarks.host_overhead import build_models
    rows = []
    print("| layout | batch | ms/step | compute ms | in collectives ms | collectives/step | KiB/step "
          f"| vs {args.layouts[0]} ms | same tokens |\n" + "|---" * 9 + "|", flush=True)
    with tempfile.TemporaryDirectory() as root:
        base, reward = build_models(root)
        for batch in args.batches:
            first = None
            for name in args.layouts:
                row, tokens = measure(base, reward, batch, args.steps, LAYOUTS[name])
                first = first or (row, tokens)
                row.update(layout=name, vs_first_ms=row["step_ms"] - first[0]["step_ms"], same=tokens == first[1])
                rows.append(row)
                print(f"| {name} | {batch} | {row['step_ms']:.2f} | {row['compute_ms']:.2f} | {row['comm_ms']:.2f} "
                      f"| {row['calls']:.0f} | {row['kib']:.1f} | {row['vs_first_ms']:+.2f} | {row['same']} |",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not all(r["same"] for r in rows):
        raise SystemExit("the layouts decoded different tokens")


if __name__ == "__main__":
    main()
