"""Per-bucket AOT executables: compile threads, memory analysis, release and microbatch counts.

`BucketedStep` keeps one compiled executable per (batch_size, seqlen) bucket, compiled ahead of
time (`jit(...).lower(...).compile()`) with the state donated. Upcoming buckets compile in a
pool of `compile.threads` background threads (XLA releases the GIL) so that the loop does not
wait for them, and an executable is released once the schedule is past its bucket. The other
functions of the training path (init, eval) compile through the same pool (`compile_other`):
nothing on that path compiles behind the cache's back.

A bucket's step splits its batch into `Microbatching.count(batch_size, seqlen)` microbatches
(gradients accumulated inside the step). `fit_microbatches` finds the fewest microbatches with
which the largest bucket fits a memory budget, from the compiled executables' own
`memory_analysis()`, before any step runs. This module knows nothing of the model: it compiles
whatever step function `step_for(microbatches)` returns.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import os
import queue
import re
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from slw_jax import errors, hardware


def batch_spec(batch_size: int, seqlen: int, sharding=None) -> dict:
  shape = jax.ShapeDtypeStruct((batch_size, seqlen), jnp.int32, sharding=sharding)
  return {"inputs": shape, "targets": shape}


def memory_bytes(compiled) -> int:
  """Device bytes an executable needs: arguments + outputs + temporaries - donated (aliased)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return 0
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


# XLA:CPU, as it compiles by default, drops the optimization barriers that keep rematerialized
# work apart and lets CSE merge the recomputation back into the forward pass, and schedules for
# concurrency: model.remat then changes nothing in its memory analysis. These options keep the
# recomputation and schedule for memory, as accelerator compilers do, so `plan --memory` on CPU
# devices estimates what remat saves (benchmarks/RESULTS.md). For estimates only: not for speed.
CPU_MEMORY_ESTIMATE_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                               "xla_disable_hlo_passes": "cse,cse_barrier_expander"}


# XLA:GPU's pass that recomputes values to bring a step under the memory limit. Left on, a
# step that does not fit "fits" by recomputation XLA chose (the GPT-2 117M check sat at the
# H100's limit with "Can't reduce memory use below 67.77GiB by rematerialization") and its
# memory analysis no longer says what the step needs. MaxText's GPU recipes turn it off;
# model.remat and optim.microbatches are how a run trades compute for memory.
XLA_REMAT_PASS = "rematerialization"


def passes_disabled_by_flags(xla_flags: str | None = None) -> str:
  """The `--xla_disable_hlo_passes=...` list of XLA_FLAGS (default: the environment's), "" if
  none: a compile option of that name replaces the flag's list instead of adding to it."""
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  found = re.findall(r"--xla_disable_hlo_passes=(\S+)", flags)
  return ",".join(found)


def merge_options(*option_dicts) -> dict | None:
  """Compiler options merged left to right; `xla_disable_hlo_passes` lists are joined, starting
  from the passes XLA_FLAGS disables (which the option would otherwise override silently)."""
  merged = {}
  if any("xla_disable_hlo_passes" in (options or {}) for options in option_dicts):
    from_flags = passes_disabled_by_flags()
    if from_flags:
      merged["xla_disable_hlo_passes"] = from_flags
  for options in option_dicts:
    for key, value in (options or {}).items():
      if key == "xla_disable_hlo_passes" and merged.get(key):
        value = ",".join(dict.fromkeys(merged[key].split(",") + value.split(",")))
      merged[key] = value
  return merged or None


def step_compiler_options(xla_remat: bool, backend: str | None = None) -> dict | None:
  """Options every train step compiles with: on a GPU, XLA's rematerialization pass off
  unless `compile.xla_remat` (other backends: none)."""
  if (backend or jax.default_backend()) != "gpu" or xla_remat:
    return None
  return {"xla_disable_hlo_passes": XLA_REMAT_PASS}


def remat_pass_off(options: dict | None) -> bool:
  return XLA_REMAT_PASS in (options or {}).get("xla_disable_hlo_passes", "").split(",")


# ----- microbatches ------------------------------------------------------------------------------

def microbatch_options(batch_size: int, batch_shards: int) -> list[int]:
  """Microbatch counts that split `batch_size` rows into equal microbatches that still split
  evenly over the `batch_shards` data-parallel shards (each shard keeps its own rows)."""
  return [k for k in range(1, batch_size + 1)
          if batch_size % k == 0 and (batch_size // k) % batch_shards == 0]


@dataclasses.dataclass(frozen=True)
class Microbatching:
  """How many microbatches each bucket uses: `largest_count` for the largest bucket; a shorter
  bucket uses the fewest whose microbatches hold at most the largest bucket's tokens per
  microbatch (so activation memory stays roughly what the largest bucket was checked for)."""
  largest: tuple[int, int]  # (batch_size, seqlen) of the bucket with the most tokens.
  largest_count: int
  batch_shards: int

  @property
  def tokens_per_microbatch(self) -> int:
    return self.largest[0] * self.largest[1] // self.largest_count

  def count(self, batch_size: int, seqlen: int) -> int:
    options = microbatch_options(batch_size, self.batch_shards)
    for k in options:
      if batch_size * seqlen <= k * self.tokens_per_microbatch:
        return k
    return options[-1]


def check_microbatches(count: int, largest: tuple[int, int], batch_shards: int):
  """A configured count must split the largest bucket's batch evenly over the data shards."""
  options = microbatch_options(largest[0], batch_shards)
  if count not in options:
    raise errors.ConfigError(
        f"config.optim.microbatches={count} is invalid: the largest bucket's batch of "
        f"{largest[0]} rows over {batch_shards} data-parallel shard(s) splits into "
        f"{', '.join(map(str, options))} microbatches (or 'auto')")


# ----- the cache ---------------------------------------------------------------------------------

class PriorityPool:
  """`threads` worker threads that run submitted work in order of priority (the step at which
  its result is first needed), not of submission: a bucket needed at step 40 compiles before
  the evaluation step needed at step 100, whatever was asked for first."""

  def __init__(self, threads: int, name: str):
    self._queue = queue.PriorityQueue()
    self._order = itertools.count()  # Ties run in submission order; never compares functions.
    self._closed = False
    self._busy = set()  # Names of the workers running work now (an idle one is not waited for).
    self._workers = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                     for i in range(threads)]
    for worker in self._workers:
      worker.start()

  def submit(self, priority: float, fn) -> concurrent.futures.Future:
    if self._closed:  # Would queue behind the stop markers and never run.
      raise RuntimeError("the compile pool is shut down")
    future = concurrent.futures.Future()
    self._queue.put((priority, next(self._order), fn, future))
    return future

  def _work(self):
    while True:
      _, _, fn, future = self._queue.get()
      if fn is None:
        return
      if future.set_running_or_notify_cancel():
        self._busy.add(threading.current_thread().name)
        try:
          future.set_result(fn())
        except BaseException as error:  # Handed to whoever waits on the future.
          future.set_exception(error)
        finally:
          self._busy.discard(threading.current_thread().name)

  def shutdown(self, wait: bool = True, timeout: float | None = None) -> bool:
    """Cancels what has not started; with `wait`, waits for running work to finish, for at
    most `timeout` seconds in all (None: as long as it takes). True when every worker ended."""
    if self._closed:
      return self._join(timeout if wait else 0.0)
    self._closed = True
    while True:
      try:
        _, _, _, future = self._queue.get_nowait()
      except queue.Empty:
        break
      if future is not None:
        future.cancel()
    for _ in self._workers:  # Sorts after any real work: priority infinity.
      self._queue.put((float("inf"), next(self._order), None, None))
    return self._join(timeout if wait else 0.0)

  def _join(self, timeout: float | None) -> bool:
    if timeout is not None and math.isinf(timeout):  # A join cannot take an infinite timeout.
      timeout = None
    end = None if timeout is None else time.monotonic() + max(timeout, 0.0)
    for worker in self._workers:
      worker.join(None if end is None else max(end - time.monotonic(), 0.0))
    return not self.running()

  def running(self) -> list[str]:
    """The names of the workers still running work (a compile in native code cannot be
    interrupted: a stop waits for it only until its deadline). An idle worker, waiting on
    the queue in Python, does not count: it ends with the interpreter."""
    return sorted(worker.name for worker in self._workers
                  if worker.is_alive() and worker.name in self._busy)


@dataclasses.dataclass(frozen=True)
class BucketStats:
  """What compiling one bucket cost and what its executable needs on the device."""
  batch_size: int
  seqlen: int
  compile_s: float
  memory_bytes: int  # arguments + outputs + temporaries - aliased (donated) buffers
  background: bool
  microbatches: int = 1

  def line(self) -> str:
    """The log line of this compile."""
    where = "in the background" if self.background else "while the loop waited"
    return (f"compiled bucket {self.batch_size}x{self.seqlen} {where} in {self.compile_s:.1f} s "
            f"({self.microbatches} microbatch(es)); needs {self.memory_bytes / 2**20:.1f} MiB")


class BucketedStep:
  """One AOT-compiled executable per (batch_size, seqlen), compiled ahead in a thread.

  `step_for(k)` returns the pure step `(state, batch, lr) -> (state, metrics)` that splits its
  batch into k microbatches; `microbatches(batch_size, seqlen)` says which k a bucket uses
  (default: 1 everywhere).
  """

  def __init__(self, step_for: Callable[[int], Callable], state_spec, *, background: bool = True,
               batch_sharding=None, scalar_sharding=None, jit_kwargs: dict | None = None,
               on_compiled=None, microbatches: Callable[[int, int], int] | None = None,
               compiler_options: dict | None = None, threads: int = 1):
    self._step_for, self._jit_kwargs = step_for, dict(jit_kwargs or {})
    self.compiler_options = compiler_options
    self._jitted: dict[int, object] = {}  # One jitted function per microbatch count.
    self._state_spec = state_spec
    self._batch_sharding = batch_sharding
    self._lr_spec = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar_sharding)
    self._background = background
    self._pool = PriorityPool(threads, "slw-compile") if background else None
    self._futures: dict[tuple[int, int], concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self.microbatches = microbatches or (lambda batch_size, seqlen: 1)
    self.stats: dict[tuple[int, int], BucketStats] = {}
    self.other_compile_s: dict[str, float] = {}  # Seconds per function of `compile_other`.
    self.released = 0  # Executables dropped because the schedule is past their bucket.
    self.stall_s = 0.0  # Seconds the training loop waited on compilation.
    self._on_compiled = on_compiled  # Called with each BucketStats (from the compile thread).

  def _jit(self, k: int):
    with self._lock:
      if k not in self._jitted:
        self._jitted[k] = jax.jit(self._step_for(k), donate_argnums=0, **self._jit_kwargs)
      return self._jitted[k]

  def compile_with(self, shape: tuple[int, int], k: int, background: bool = False):
    """(executable, stats) of bucket `shape` split into k microbatches; not cached."""
    start = time.perf_counter()
    lowered = self._jit(k).lower(self._state_spec, batch_spec(*shape, self._batch_sharding),
                                 self._lr_spec)
    compiled = lowered.compile(compiler_options=self.compiler_options)
    stats = BucketStats(shape[0], shape[1], time.perf_counter() - start, memory_bytes(compiled),
                        background, k)
    return compiled, stats

  def adopt(self, shape: tuple[int, int], compiled, stats: BucketStats):
    """Caches an executable compiled by `compile_with` as the bucket's (no second compile)."""
    future = concurrent.futures.Future()
    future.set_result(compiled)
    with self._lock:
      self._futures[shape] = future
    self._record(stats)

  def _record(self, stats: BucketStats):
    self.stats[(stats.batch_size, stats.seqlen)] = stats
    if self._on_compiled is not None:
      self._on_compiled(stats)

  def _compile(self, shape: tuple[int, int], background: bool):
    compiled, stats = self.compile_with(shape, self.microbatches(*shape), background)
    self._record(stats)
    return compiled

  def prefetch(self, shapes, priority: float = 0):
    """Queues these buckets for the compile threads (no-op when background compiles are off);
    lower `priority` (the step that first needs them) compiles first."""
    if not self._background:
      return
    with self._lock:
      for shape in shapes:
        if shape not in self._futures:
          self._futures[shape] = self._pool.submit(
              priority, lambda shape=shape: self._compile(shape, True))

  def get(self, shape: tuple[int, int]):
    """The executable of a bucket; compiles it now (counted as stall) if it was not ahead."""
    start = time.perf_counter()
    with self._lock:  # Registered before compiling: a prefetch of it now waits, not recompiles.
      future = self._futures.get(shape)
      compile_here = future is None
      if compile_here:
        future = self._futures[shape] = concurrent.futures.Future()
    if compile_here:
      try:
        future.set_result(self._compile(shape, False))
      except BaseException as error:
        future.set_exception(error)
    compiled = future.result()
    self.stall_s += time.perf_counter() - start
    return compiled

  def compile_other(self, name: str, jitted, *specs, priority: float = 0,
                    here: bool = False) -> concurrent.futures.Future:
    """AOT-compiles another jitted function of the training path (`name`: "init", "eval")
    in the compile threads at `priority`, or in this thread (`here`, or when background
    compiles are off); its seconds are kept in `other_compile_s`. The future's result is the
    executable."""
    def compile_now():
      start = time.perf_counter()
      compiled = jitted.lower(*specs).compile()
      self.other_compile_s[name] = time.perf_counter() - start
      return compiled
    if self._background and not here:
      return self._pool.submit(priority, compile_now)
    future = concurrent.futures.Future()
    future.set_result(compile_now())
    return future

  def wait_for(self, future: concurrent.futures.Future):
    """The result of a `compile_other` future; the time waited counts as a stall."""
    waited = time.perf_counter()
    result = future.result()
    self.stall_s += time.perf_counter() - waited
    return result

  def release(self, shapes):
    """Drops the executables of buckets the schedule no longer uses (device and host memory);
    a compile still queued for one is cancelled. A bucket needed again (after a rollback)
    compiles again, from the persistent cache when it is on."""
    with self._lock:
      for shape in shapes:
        future = self._futures.pop(shape, None)
        if future is not None:
          future.cancel()
          self.released += 1

  def live_shapes(self) -> list[tuple[int, int]]:
    """The buckets whose executables are held (or compiling) now."""
    with self._lock:
      return list(self._futures)

  @property
  def num_live(self) -> int:
    """Executables held (or compiling) now."""
    with self._lock:
      return len(self._futures)

  @property
  def num_compiled(self) -> int:
    return len(self.stats)

  def close(self, wait: bool = True, timeout: float | None = None) -> list[str]:
    """Stops the compile threads: queued compiles are cancelled, running ones waited for (with
    `wait`, for at most `timeout` seconds). Returns the threads still compiling (none
    normally; after a stop, those whose compile outlasts the preemption deadline)."""
    if self._pool is None:
      return []
    self._pool.shutdown(wait=wait, timeout=timeout)
    return self._pool.running()


def fit_microbatches(steps: BucketedStep, shape: tuple[int, int], options: list[int],
                     limit_bytes: int) -> tuple[int, BucketStats, bool]:
  """(count, stats, fits): the fewest microbatches in `options` with which bucket `shape` needs
  at most `limit_bytes`, by binary search over AOT compiles (memory falls as the count grows).
  The executable found is adopted into `steps`' cache. When none fits: the largest count and
  fits=False."""
  best, tried = None, None
  low, high = 0, len(options) - 1
  while low <= high:
    middle = (low + high) // 2
    compiled, stats = steps.compile_with(shape, options[middle])
    if stats.memory_bytes <= limit_bytes:
      best, high = (compiled, stats), middle - 1
    else:
      tried, low = (compiled, stats), middle + 1
  chosen = best or tried
  steps.adopt(shape, *chosen)
  return chosen[1].microbatches, chosen[1], best is not None


def choose_microbatches(steps: BucketedStep, setting, largest: tuple[int, int], batch_shards: int,
                        limit_bytes: int | None) -> tuple[Microbatching, str]:
  """Sets how many microbatches each bucket of `steps` uses, from `optim.microbatches`.

  An integer is checked against the largest bucket (ConfigError naming the allowed counts).
  "auto" picks the fewest with which the largest bucket fits `limit_bytes`, compiling it (the
  executable is kept); with no limit (a CPU reports none) it is 1. Returns the policy and a
  log line that says what was chosen and why.
  """
  if setting != "auto":
    check_microbatches(setting, largest, batch_shards)
    policy, why = Microbatching(largest, setting, batch_shards), "optim.microbatches"
  elif not limit_bytes:
    policy = Microbatching(largest, 1, batch_shards)
    why = "auto: the device reports no memory limit (CPU), so one pass"
  else:
    options, start = microbatch_options(largest[0], batch_shards), time.perf_counter()
    count, stats, fits = fit_microbatches(steps, largest, options, limit_bytes)
    steps.stall_s += time.perf_counter() - start  # The search compiles before step 0.
    policy = Microbatching(largest, count, batch_shards)
    verdict = "the fewest that fit" if fits else "the most possible, and still too big"
    how = ("XLA's rematerialization pass off: the step's own need"
           if remat_pass_off(steps.compiler_options) else "as compiled")
    why = (f"auto: {verdict} {limit_bytes / 2**30:.2f} GiB (needs "
           f"{stats.memory_bytes / 2**30:.2f} GiB per device, {how})")
  steps.microbatches = policy.count
  line = (f"microbatches: {policy.largest_count} for the largest bucket {largest[0]}x"
          f"{largest[1]} ({why}); shorter buckets keep at most {policy.tokens_per_microbatch:,} "
          "tokens per microbatch")
  return policy, line


def check_memory(steps: BucketedStep, setting, largest: tuple[int, int], batch_shards: int,
                 first: tuple[int, int] | None, log: Callable[[str], None]):
  """Chooses the microbatch counts (`setting`: optim.microbatches) and, where the device
  reports its memory, compiles the `largest` bucket and stops if it cannot fit. The `first`
  bucket to run compiles in the background meanwhile (after the search when `auto` must
  compile to choose). A CPU reports no limit: nothing to check, the largest bucket compiles in
  its turn. Raises StopTraining naming the settings that would make it fit."""
  limit = hardware.device_memory_limit()
  if limit and jax.process_count() > 1:  # Every process must search with the same budget.
    limit = int(multihost_utils.process_allgather(np.int64(limit)).min())
  # Compiles only for `auto` against a memory limit; then `first` needs its counts.
  policy, line = choose_microbatches(steps, setting, largest, batch_shards, limit)
  log(line)
  if steps.compiler_options:
    log("compiler options of every train step: " + ", ".join(
        f"{k}={v}" for k, v in sorted(steps.compiler_options.items())))
  steps.prefetch([first] if first else [], priority=-1)
  if not limit:
    log(f"largest bucket {largest[0]}x{largest[1]}: the device reports no memory limit, so "
        "there is nothing to check before step 0")
    return
  steps.get(largest)
  need = steps.stats[largest].memory_bytes
  if need > limit:
    more = ("" if policy.largest_count == microbatch_options(largest[0], batch_shards)[-1]
            else "optim.microbatches=auto (or more), ")
    raise errors.StopTraining(
        f"the largest bucket (batch {largest[0]} x seqlen {largest[1]}) needs "
        f"{need / 2**30:.2f} GiB per device with {policy.largest_count} microbatch(es) but the "
        f"device has {limit / 2**30:.2f} GiB: set {more}model.remat=block, "
        "model.dtype=bfloat16, compile.xla_remat=true (XLA recomputes to fit), or use more "
        "devices (mesh.fsdp)")
  log(f"largest bucket {largest[0]}x{largest[1]} needs {need / 2**30:.3f} GiB of "
      f"{limit / 2**30:.2f} GiB")
