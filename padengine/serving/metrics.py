"""Serving statistics and their Prometheus text exposition (GET /metrics).

Counters and recent latencies are updated by the engine thread; gauges (running and waiting requests,
KV blocks in use) are read from the scheduler and the block managers when scraped.
"""
import time
from collections import Counter, deque

WINDOW_S = 10.0          # tokens/s is measured over this trailing window
LATENCIES_KEPT = 2048    # recent time-to-first-token samples for the quantiles


class Stats:
    def __init__(self, engine):
        self.engine = engine
        self.tokens_total = 0
        self.finished = Counter()
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.ttft_recent: deque[float] = deque(maxlen=LATENCIES_KEPT)
        self.recent_steps: deque[tuple[float, int]] = deque()

    def step(self, advanced) -> None:
        now = time.perf_counter()
        self.tokens_total += len(advanced)
        self.recent_steps.append((now, len(advanced)))
        while self.recent_steps and self.recent_steps[0][0] < now - WINDOW_S:
            self.recent_steps.popleft()
        for req in advanced:
            if len(req.output_ids) == 1:
                ttft = req.metrics.time_to_first_token
                self.ttft_sum += ttft
                self.ttft_count += 1
                self.ttft_recent.append(ttft)

    def finish(self, req) -> None:
        self.finished[req.finish_reason] += 1

    def tokens_per_s(self) -> float:
        now = time.perf_counter()
        recent = [n for t, n in list(self.recent_steps) if t >= now - WINDOW_S]   # list(): one atomic copy
        return sum(recent) / WINDOW_S

    def render(self) -> str:
        sched = self.engine.scheduler
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP padengine_{name} {help_}", f"# TYPE padengine_{name} {kind}"])
            lines.extend(f"padengine_{name}{labels} {value}" for labels, value in samples)

        metric("requests_running", "gauge", "Requests in the running batch.", [("", len(sched.running))])
        metric("requests_waiting", "gauge", "Requests queued for admission.", [("", len(sched.waiting))])
        metric("kv_blocks_used", "gauge", "KV-cache blocks in use, per pool.",
               [(f'{{pool="{i}"}}', p.num_used) for i, p in enumerate(sched.pools)])
        metric("kv_blocks_total", "gauge", "KV-cache blocks, per pool.",
               [(f'{{pool="{i}"}}', len(p.blocks)) for i, p in enumerate(sched.pools)])
        metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.tokens_total)])
        metric("tokens_per_second", "gauge", f"Tokens generated per second over the last {WINDOW_S:g} s.",
               [("", round(self.tokens_per_s(), 3))])
        metric("requests_finished_total", "counter", "Finished requests by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finished.items())])
        recent = sorted(list(self.ttft_recent))
        quantiles = [(f'{{quantile="{q}"}}', recent[min(len(recent) - 1, int(q * len(recent)))])
                     for q in (0.5, 0.9, 0.99)] if recent else []
        metric("time_to_first_token_seconds", "summary", "Time from arrival to the first token.",
               quantiles + [("_sum", round(self.ttft_sum, 6)), ("_count", self.ttft_count)])
        return "\n".join(lines) + "\n"
