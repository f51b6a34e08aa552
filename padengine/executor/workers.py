"""The engine's other ranks: worker processes started by rank 0 (spawn), each holding its shards.

Rank 0 (the engine's process) schedules. Each step it first sets the store key `step/<n>` (workers wait
for it with no time limit, so an engine idle for any length of time keeps its workers), then broadcasts the
step's layout (`StepLayout.header`, pickled) and its two uploaded value arrays; every rank then runs the
runner's `compute` on them, the ranks meeting in the layers' all-reduces and the sampler's gathers. Workers
only run forwards: each builds the runner class rank 0 hands it (`Workers(..., runner)`), so this module
needs none of the executor's others.

Failures: a worker that dies while starting (before it reaches the rendezvous store) makes the Engine
raise `WorkerError` at once; one that has exited makes the next step raise it at once; one that dies during a
step breaks the step's collectives (gloo and NCCL see the closed connection), and one that hangs makes
them time out after `worker_timeout` seconds (the process group's timeout); either way `WorkerError`, and
every worker is stopped: the engine is done. `close()` (also when the Workers object is collected, or at
exit) tells the workers to leave their loop and terminates any still running after a grace period.
Workers die with rank 0: their next collective fails when its connection closes.
"""
import itertools
import logging
import multiprocessing as mp
import time
import weakref
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from padengine.errors import require

logger = logging.getLogger(__name__)
GRACE_S = 10        # how long close() waits for workers to leave before terminating them
START_S = 300       # at least this long for a worker to start (spawn, import torch): not a step's timeout


class WorkerError(RuntimeError):
    """Another rank died or stopped answering; the engine's workers are stopped."""


def init_group(cfg, rank: int, world_size: int, store):
    """Join the process group; returns the group the pickled step layouts travel in: gloo, on the host
    (with NCCL a gloo group beside it, as vLLM does, so no device copy or sync carries them)."""
    backend = "nccl" if cfg.torch_device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=cfg.worker_timeout))
    return dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo")


class Workers:
    def __init__(self, cfg, world_size: int, runner: type):
        """`runner`: the class each worker builds for its rank (`runner(cfg, rank)`); spawn pickles it by name."""
        require(not dist.is_initialized(), "tensor_parallel_size",
                "another multi-process engine runs in this process: close() it first")
        self.timeout = timedelta(seconds=cfg.worker_timeout)
        self.store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=self.timeout,
                                   wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker_main, args=(cfg, rank, world_size, self.store.port, runner),
                                  daemon=True, name=f"padengine-rank{rank}") for rank in range(1, world_size)]
        for p in self.procs:
            p.start()
        self.stop = weakref.finalize(self, _stop, self.procs)
        self.broken = None
        self.steps = 0
        self._wait_started(max(cfg.worker_timeout, START_S))
        with self.guard():
            self.host = init_group(cfg, 0, world_size, self.store)

    def _wait_started(self, timeout: float) -> None:
        """Until every worker has imported and reached the store. One that dies first (an import error, a
        script without `if __name__ == "__main__":`, which spawn needs) fails now, not after `timeout`."""
        keys = [f"started/{p.name}" for p in self.procs]
        deadline = time.monotonic() + timeout
        while not self.store.check(keys):
            if self._dead():
                self.fail(self._dead() + " while starting (see its traceback above; a script that makes a "
                          "multi-process Engine needs `if __name__ == \"__main__\":`)")
                raise WorkerError(self.broken)
            if time.monotonic() > deadline:
                self.fail(f"the workers did not start within {timeout} s")
                raise WorkerError(self.broken)
            time.sleep(0.02)

    def check(self) -> None:
        if self.broken is None and self._dead():
            self.fail(self._dead())
        if self.broken is not None:
            raise WorkerError(self.broken)

    def _dead(self) -> str:
        return ", ".join(f"worker {p.name} (pid {p.pid}) exited with code {p.exitcode}"
                         for p in self.procs if not p.is_alive())

    def fail(self, reason: str) -> None:
        self.broken = f"{reason}; all worker processes are stopped, create a new Engine"
        logger.error("%s", self.broken)
        self.stop()

    @contextmanager
    def guard(self):
        """Run collectives. A failure inside stops every worker (they wait in a collective rank 0 left);
        a failed or timed-out collective (torch.distributed's errors are RuntimeErrors) raises WorkerError,
        naming any worker gone; anything else (an InvalidInput while loading) is raised as it is."""
        self.check()
        try:
            yield
        except BaseException as e:
            if self.broken is None:
                self.fail(self._dead() or f"a collective failed or timed out: {type(e).__name__}: {e}")
            if isinstance(e, RuntimeError):
                raise WorkerError(self.broken) from e
            raise

    def _announce(self) -> None:
        """Wake the workers for the next broadcast (the store outlives any idle time; a group would not)."""
        self.store.set(f"step/{self.steps}", "1")
        if self.steps:
            self.store.delete_key(f"step/{self.steps - 1}")     # every worker has passed it: it ran that step
        self.steps += 1

    def broadcast(self, header, ints: torch.Tensor, floats: torch.Tensor) -> None:
        self._announce()
        dist.broadcast_object_list([(header, ints.numel(), floats.numel())], src=0, group=self.host)
        for values in (ints, floats):
            if values.numel():
                dist.broadcast(values, src=0)

    def close(self) -> None:
        if self.broken is None and self.stop.alive:
            try:
                self._announce()
                dist.broadcast_object_list([None], src=0, group=self.host)     # the workers leave their loop
                for p in self.procs:
                    p.join(GRACE_S)
            except RuntimeError as e:
                logger.warning("workers did not stop cleanly: %s", e)
        self.stop()
        self.broken = self.broken or "the engine was closed; create a new Engine"


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(GRACE_S)
        if p.is_alive():
            p.kill()
            p.join()
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker_main(cfg, rank: int, world_size: int, port: int, runner_class: type) -> None:
    if cfg.torch_device.type == "cpu":
        torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=timedelta(seconds=cfg.worker_timeout))
    store.set(f"started/{mp.current_process().name}", "1")
    host = init_group(cfg, rank, world_size, store)
    runner = runner_class(cfg, rank)
    idle = timedelta(days=365 * 100)     # between steps a worker waits as long as rank 0 lives (its store)
    with torch.inference_mode():
        for step in itertools.count():
            store.wait([f"step/{step}"], idle)
            box = [None]
            dist.broadcast_object_list(box, src=0, group=host)
            if box[0] is None:
                break
            header, num_ints, num_floats = box[0]
            values = []
            for n, dtype in ((num_ints, torch.long), (num_floats, torch.float32)):
                values.append(torch.empty(n, dtype=dtype, device=runner.device))
                if n:
                    dist.broadcast(values[-1], src=0)
            runner.compute(header.inputs(*values, runner.windows, static=False))
    dist.destroy_process_group()
