"""The compile pool: work runs by priority, several compiles at once, released executables."""

import threading
import time

import jax
import pytest

from slw_jax import compiled_steps, config_lib, optim, train_step


def test_pool_runs_queued_work_by_priority_not_submission_order():
  pool = compiled_steps.PriorityPool(1, "test")
  gate, ran = threading.Event(), []
  blocker = pool.submit(0, gate.wait)  # Holds the only thread while the rest queue up.
  futures = [pool.submit(p, lambda p=p: ran.append(p)) for p in (100, 5, 40)]
  gate.set()
  for future in [blocker, *futures]:
    future.result(timeout=30)
  assert ran == [5, 40, 100]
  pool.shutdown()


def test_pool_runs_threads_at_once_and_cancels_queued_work_on_shutdown():
  pool = compiled_steps.PriorityPool(2, "test")
  both = threading.Barrier(2, timeout=30)  # Passes only if two functions run concurrently.
  running = [pool.submit(0, both.wait) for _ in range(2)]
  assert sorted(f.result(timeout=60) for f in running) == [0, 1]
  gate = threading.Event()
  holders = [pool.submit(0, gate.wait) for _ in range(2)]
  queued = pool.submit(1, lambda: "never")
  threading.Timer(0.5, gate.set).start()
  pool.shutdown(wait=True)
  assert all(h.done() for h in holders) and queued.cancelled()
  with pytest.raises(RuntimeError, match="shut down"):  # Would otherwise wait forever.
    pool.submit(0, lambda: None)


def test_pool_shutdown_waits_for_running_work_only_until_its_timeout():
  """A stop waits for a compile in flight only until the preemption deadline: one that
  outlasts it is reported running, and the wait returns on time."""
  pool = compiled_steps.PriorityPool(2, "test")
  gate, started = threading.Event(), threading.Event()
  holder = pool.submit(0, lambda: (started.set(), gate.wait(60)))
  assert started.wait(30)
  begun = time.monotonic()
  assert pool.shutdown(wait=True, timeout=0.5) is False
  assert 0.4 < time.monotonic() - begun < 5
  assert len(pool.running()) == 1 and not holder.done()  # The idle worker has ended.
  gate.set()
  assert pool.shutdown(wait=True, timeout=30) is True and pool.running() == []


def test_pool_counts_only_busy_workers_and_takes_an_infinite_timeout():
  """An idle worker is not reported running (a stop would name it as left behind), and a
  stop with no deadline (timeout infinity) waits as with None instead of overflowing."""
  pool = compiled_steps.PriorityPool(2, "test")
  assert pool.running() == []
  gate, started = threading.Event(), threading.Event()
  pool.submit(0, lambda: (started.set(), gate.wait(60)))
  assert started.wait(30) and len(pool.running()) == 1
  threading.Timer(0.3, gate.set).start()
  assert pool.shutdown(wait=True, timeout=float("inf")) is True and pool.running() == []


@pytest.fixture(scope="module")
def bucketed():
  c = config_lib.validate(config_lib.load_config_file(
      "configs/tiny.py", {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2,
                          "model.max_seqlen": 32, "pacing.seqlen_start": 8,
                          "pacing.multiple": 8}))
  optimizer = optim.make_optimizer(c.optim)
  graphdef, _ = train_step.build_model(c)
  spec = jax.eval_shape(train_step.make_init_fn(c, optimizer))
  return lambda threads: compiled_steps.BucketedStep(
      lambda k: train_step.make_train_step(c, graphdef, optimizer, False, k), spec,
      threads=threads)


@pytest.mark.slow
def test_released_buckets_are_dropped_and_compile_again_when_needed(bucketed):
  steps = bucketed(2)
  steps.prefetch([(4, 8), (4, 16)])
  first = steps.get((4, 8))
  steps.get((4, 16))
  assert steps.num_live == 2
  steps.release([(4, 8), (4, 24)])  # One held, one never compiled.
  assert steps.num_live == 1 and steps.released == 1
  again = steps.get((4, 8))  # After a rollback, say: compiled again.
  assert again is not first and steps.num_live == 2
  steps.close()
