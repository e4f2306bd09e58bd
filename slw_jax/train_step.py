"""The pure train step `(state, batch, lr) -> (state, metrics)` and its per-bucket AOT cache.

The model is split once (`nnx.split`) into a static graph and a `Param` state; the step merges
them inside `jax.jit`, so no NNX graph traversal happens per call. The train state is a plain
dict pytree: params, optax state, step, the minimum loss so far (for the loss ratio) and the
number of skipped updates.

`BucketedStep` keeps one compiled executable per (batch_size, seqlen) bucket, compiled ahead of
time (`jit(...).lower(...).compile()`) with the state donated. Upcoming buckets compile in a
background thread (XLA releases the GIL) so that the loop does not wait for them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from slw_jax import models, schedules, sharding


def token_losses(logits_blv, targets_bl):
  """Each target's negative log-likelihood [B, L], in float32 whatever the logits' dtype."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_blv.astype(jnp.float32),
                                                         targets_bl)


def cross_entropy_sums(logits_blv, targets_bl):
  """(sum of token losses, token count): float32 whatever the logits' dtype."""
  return token_losses(logits_blv, targets_bl).sum(), jnp.asarray(targets_bl.size, jnp.float32)


def build_model(c):
  """(graphdef, abstract Param state) of the config's model: nothing is allocated."""
  cfg = models.GPTConfig.from_config(c.model)
  abstract = nnx.eval_shape(lambda: models.GPT(cfg, nnx.Rngs(c.seed)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  return graphdef, params


def state_from_params(params, optimizer) -> dict:
  """The train state at step 0 around `params`: fresh optimizer state, no loss seen yet."""
  return {"params": params, "opt_state": optimizer.init(params),
          "step": jnp.zeros((), jnp.int32), "min_loss": jnp.full((), jnp.inf, jnp.float32),
          "skipped": jnp.zeros((), jnp.int32)}


def make_init_fn(c, optimizer):
  """A function of no arguments that builds the whole train state (jit it with shardings)."""
  cfg = models.GPTConfig.from_config(c.model)

  def init():
    return state_from_params(nnx.state(models.GPT(cfg, nnx.Rngs(c.seed)), nnx.Param), optimizer)
  return init


def make_train_step(c, graphdef, optimizer, skip_bad: bool):
  """The pure step. With `skip_bad`, an update whose loss is non-finite or whose loss ratio
  exceeds `monitor.skip_ratio` is not applied (parameters and optimizer state stay as they were).
  """
  deterministic = c.model.dropout == 0.0
  skip_ratio = c.monitor.skip_ratio

  def loss_fn(params, inputs, targets, step):
    rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(c.seed), step))
    model = nnx.merge(graphdef, params)
    logits = model(inputs, deterministic=deterministic, rngs=rngs)
    loss_sum, count = cross_entropy_sums(logits, targets)
    return loss_sum / count

  def step_fn(state, batch, lr):
    params = state["params"]
    loss, grads = jax.value_and_grad(loss_fn)(params, batch["inputs"], batch["targets"],
                                              state["step"])
    opt_state = schedules.set_learning_rate(state["opt_state"], lr)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss)
    ratio = loss / state["min_loss"]  # min_loss starts at inf: the first ratio is 0.
    bad = jnp.logical_not(finite) | (ratio > skip_ratio) if skip_bad else jnp.array(False)
    keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(bad, o, n), old, new)  # noqa
    if skip_bad:
      new_params, new_opt_state = keep(params, new_params), keep(opt_state, new_opt_state)
    min_loss = jnp.where(finite, jnp.minimum(state["min_loss"], loss), state["min_loss"])
    new_state = {"params": new_params, "opt_state": new_opt_state, "step": state["step"] + 1,
                 "min_loss": min_loss, "skipped": state["skipped"] + bad.astype(jnp.int32)}
    metrics = {"loss": loss, "loss_ratio": ratio, "grad_norm": optax.tree.norm(grads),
               "skipped": bad, **schedules.adam_nu_stats(new_opt_state)}
    return new_state, metrics

  return step_fn


def make_eval_step(graphdef):
  """(params, batch) -> (loss sum, token count) at full length, deterministic."""
  def eval_fn(params, batch):
    logits = nnx.merge(graphdef, params)(batch["inputs"], deterministic=True)
    return cross_entropy_sums(logits, batch["targets"])
  return eval_fn


def batch_spec(batch_size: int, seqlen: int, sharding=None) -> dict:
  shape = jax.ShapeDtypeStruct((batch_size, seqlen), jnp.int32, sharding=sharding)
  return {"inputs": shape, "targets": shape}


@dataclasses.dataclass(frozen=True)
class OnMesh:
  """The model, its optimizer and where the train state lives on the mesh."""
  graphdef: object
  optimizer: object
  layout: "sharding.Layout"
  state_spec: object  # ShapeDtypeStructs with shardings: compile and restore targets.

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.state_spec["params"]))


def on_mesh(c, devices=None) -> OnMesh:
  """Builds the model and optimizer abstractly (nothing allocated) and lays the train state out
  on the config's mesh over `devices` (default: all). Raises ConfigError for a bad mesh."""
  optimizer = schedules.make_optimizer(c.optim)
  graphdef, abstract_params = build_model(c)
  shapes = jax.eval_shape(make_init_fn(c, optimizer))
  layout = sharding.make_layout(c, shapes, abstract_params, optimizer, devices)
  return OnMesh(graphdef, optimizer, layout, layout.abstract(shapes))


@dataclasses.dataclass
class ShardedSteps:
  """Everything that runs on the devices, laid out on one mesh (`sharding.Layout`)."""
  init: object  # () -> train state, created directly in its sharded layout.
  steps: "BucketedStep"
  eval: object  # (params, batch) -> (loss sum, token count), replicated.


def sharded_steps(c, placed: OnMesh, *, skip_bad: bool, background: bool = True,
                  on_compiled=None) -> ShardedSteps:
  """Init, per-bucket train steps and the eval step, all with the layout's shardings: the
  state is never materialized on one device, and every bucket uses the same shardings."""
  layout, graphdef, optimizer = placed.layout, placed.graphdef, placed.optimizer
  init = jax.jit(make_init_fn(c, optimizer), out_shardings=layout.state)
  step_fn = layout.traced(make_train_step(c, graphdef, optimizer, skip_bad))
  steps = BucketedStep(step_fn, placed.state_spec, background=background,
                       batch_sharding=layout.batch, scalar_sharding=layout.replicated,
                       on_compiled=on_compiled,
                       jit_kwargs={"out_shardings": (layout.state, layout.replicated)})
  eval_fn = jax.jit(layout.traced(make_eval_step(graphdef)), out_shardings=layout.replicated)
  return ShardedSteps(init, steps, eval_fn)


@dataclasses.dataclass(frozen=True)
class BucketStats:
  """What compiling one bucket cost and what its executable needs on the device."""
  batch_size: int
  seqlen: int
  compile_s: float
  memory_bytes: int  # arguments + outputs + temporaries - aliased (donated) buffers
  background: bool


def memory_bytes(compiled) -> int:
  stats = compiled.memory_analysis()
  if stats is None:
    return 0
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


class BucketedStep:
  """One AOT-compiled executable per (batch_size, seqlen), compiled ahead in a thread."""

  def __init__(self, step_fn, state_spec, *, background: bool = True, batch_sharding=None,
               scalar_sharding=None, jit_kwargs: dict | None = None, on_compiled=None):
    self._jitted = jax.jit(step_fn, donate_argnums=0, **(jit_kwargs or {}))
    self._state_spec = state_spec
    self._batch_sharding = batch_sharding
    self._lr_spec = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar_sharding)
    self._background = background
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="slw-compile")
    self._futures: dict[tuple[int, int], concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self.stats: dict[tuple[int, int], BucketStats] = {}
    self.stall_s = 0.0  # Seconds the training loop waited on compilation.
    self._on_compiled = on_compiled  # Called with each BucketStats (from the compile thread).

  def _compile(self, shape: tuple[int, int], background: bool):
    start = time.perf_counter()
    lowered = self._jitted.lower(self._state_spec, batch_spec(*shape, self._batch_sharding),
                                 self._lr_spec)
    compiled = lowered.compile()
    self.stats[shape] = BucketStats(shape[0], shape[1], time.perf_counter() - start,
                                    memory_bytes(compiled), background)
    if self._on_compiled is not None:
      self._on_compiled(self.stats[shape])
    return compiled

  def prefetch(self, shapes):
    """Starts compiling these buckets in the background thread (no-op when disabled)."""
    if not self._background:
      return
    with self._lock:
      for shape in shapes:
        if shape not in self._futures:
          self._futures[shape] = self._executor.submit(self._compile, shape, True)

  def get(self, shape: tuple[int, int]):
    """The executable of a bucket; compiles it now (counted as stall) if it was not ahead."""
    start = time.perf_counter()
    with self._lock:
      future = self._futures.get(shape)
      if future is None:
        future = concurrent.futures.Future()
        future.set_result(self._compile(shape, False))
        self._futures[shape] = future
    compiled = future.result()
    self.stall_s += time.perf_counter() - start
    return compiled

  @property
  def num_compiled(self) -> int:
    return len(self.stats)

  def close(self, wait: bool = True):
    """Stops the compile thread; queued compiles are cancelled (a running one completes)."""
    self._executor.shutdown(wait=wait, cancel_futures=True)
