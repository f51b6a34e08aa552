"""Serving benchmark: throughput and latency of the AsyncEngine under a request rate or a fixed batch.

Requests arrive as a Poisson process at `rate` per second (all at once for rate = inf), each streams its
tokens; reported: output tokens/s, time to first token and time per output token (p50, p99, mean).
"""
import asyncio
import random
import statistics
import time
from dataclasses import dataclass

from padengine.sampling_params import SamplingParams
from padengine.serving.async_engine import AsyncEngine


@dataclass
class Sample:
    ttft: float
    tpot: float | None
    tokens: int


async def _one(engine: AsyncEngine, prompt: str, params: SamplingParams, preference) -> Sample:
    start = time.perf_counter()
    times, tokens = [], 0
    async for out in engine.generate(prompt, params, preference=preference):
        if out.token_ids:
            times.append(time.perf_counter())
            tokens += len(out.token_ids)
    tpot = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None
    return Sample(times[0] - start, tpot, tokens)


async def _run(engine, prompts, params, preference, rate, seed):
    rng, tasks = random.Random(seed), []
    for prompt in prompts:
        tasks.append(asyncio.create_task(_one(engine, prompt, params, preference)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    return await asyncio.gather(*tasks)


def run(engine: AsyncEngine, prompts: list[str], params: SamplingParams, preference=None,
        rate: float = float("inf"), seed: int = 0) -> dict:
    start = time.perf_counter()
    samples = asyncio.run(_run(engine, prompts, params, preference, rate, seed))
    elapsed = time.perf_counter() - start
    result = {"requests": len(samples), "request_rate": rate, "elapsed_s": elapsed,
              "output_tokens": sum(s.tokens for s in samples),
              "tokens_per_s": sum(s.tokens for s in samples) / elapsed}
    for name, values in (("ttft_s", [s.ttft for s in samples]), ("tpot_s", [s.tpot for s in samples if s.tpot])):
        values = sorted(values)
        if values:
            result[name] = {"p50": _quantile(values, 0.5), "p99": _quantile(values, 0.99),
                            "mean": statistics.fmean(values)}
    return result


def table(result: dict) -> str:
    lines = [f"requests {result['requests']}, rate {result['request_rate']}/s, "
             f"{result['output_tokens']} tokens in {result['elapsed_s']:.1f} s",
             f"throughput               {result['tokens_per_s']:10.1f} tokens/s",
             f"{'':24} {'p50':>10} {'p99':>10} {'mean':>10}"]
    for name, label in (("ttft_s", "time to first token (ms)"), ("tpot_s", "time per token (ms)")):
        if name in result:
            q = result[name]
            lines.append(f"{label:24} {q['p50'] * 1e3:10.1f} {q['p99'] * 1e3:10.1f} {q['mean'] * 1e3:10.1f}")
    return "\n".join(lines)


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]
