"""The pure train step `(state, batch, lr) -> (state, metrics)`, with microbatch accumulation.

The model is split once (`nnx.split`) into a static graph and a `Param` state; the step merges
them inside `jax.jit`, so no NNX graph traversal happens per call. The train state is a plain
dict pytree: params, optax state, step, the minimum loss so far (for the loss ratio) and the
number of skipped updates. The per-bucket executables live in `compiled_steps`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from slw_jax import (attention, compiled_steps, head_loss, input_pipeline, models, monitor, optim,
                     pinned, sharding)


PAD_TARGET = -1  # Target of a padded position (compile.pad_multiple): no loss, not counted.


def token_losses(logits_blv, targets_bl):
  """Each target's negative log-likelihood [B, L], in float32 whatever the logits' dtype; 0 at
  padded positions (target PAD_TARGET)."""
  real = targets_bl != PAD_TARGET
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_blv.astype(jnp.float32),
                                                           jnp.where(real, targets_bl, 0))
  return jnp.where(real, losses, 0.0)


def token_log_z_squared(logits_blv, targets_bl):
  """Each position's log(Z)^2 [B, L], float32, Z the softmax normalizer of its logits (padded
  vocabulary rows, at -1e30, add exactly 0 to it); 0 at padded positions. PaLM's z-loss is a
  coefficient times its mean."""
  lse_bl = jax.nn.logsumexp(logits_blv.astype(jnp.float32), axis=-1)
  return jnp.where(targets_bl != PAD_TARGET, lse_bl * lse_bl, 0.0)


def target_count(targets_bl):
  """How many real (unpadded) targets a batch has, float32: the loss's normalization."""
  return jnp.sum(targets_bl != PAD_TARGET, dtype=jnp.float32)


def loss_sum(model, inputs_bl, targets_bl, *, deterministic: bool = True, rngs=None,
             loss_head: str | None = None, chunk_tokens: int | None = None):
  """The sum of the batch's token losses, float32, through the head `loss_head` (default
  `model.cfg.loss_head`) names: `fused` (head_loss.fused_loss_sum: chunks of `chunk_tokens`,
  default model.loss_chunk_tokens, gradients in the same pass, no whole float32 [B, L, V]
  tensor) or `full` (whole float32 logits, autodiff)."""
  x_bld = model.features(inputs_bl, deterministic=deterministic, rngs=rngs)
  cfg = model.cfg
  if (loss_head or cfg.loss_head) == "full":
    return token_losses(model.head(x_bld, keep_padding=True), targets_bl).sum()
  return head_loss.fused_loss_sum(
      x_bld, model.wte_vd[...], targets_bl, targets_bl != PAD_TARGET,
      vocab_size=cfg.vocab_size, compute_dtype=cfg.compute_dtype,
      chunk_tokens=cfg.loss_chunk_tokens if chunk_tokens is None else chunk_tokens)


def loss_sums(model, inputs_bl, targets_bl, z_loss: float, *, deterministic: bool = True,
              rngs=None, loss_head: str | None = None):
  """(objective, loss sum, z sum), float32, with PaLM's z-loss (`optim.z_loss` > 0): the z sum
  is `z_loss` times the sum of log(Z)^2 over real positions (`token_log_z_squared`), the
  objective loss sum + z sum, the one to differentiate (the fused head gives the others no
  gradient). Heads as in `loss_sum`."""
  x_bld = model.features(inputs_bl, deterministic=deterministic, rngs=rngs)
  cfg = model.cfg
  if (loss_head or cfg.loss_head) == "full":
    logits_blv = model.head(x_bld, keep_padding=True)
    loss = token_losses(logits_blv, targets_bl).sum()
    z = z_loss * token_log_z_squared(logits_blv, targets_bl).sum()
    return loss + z, loss, z
  return head_loss.fused_losses(
      x_bld, model.wte_vd[...], targets_bl, targets_bl != PAD_TARGET,
      vocab_size=cfg.vocab_size, compute_dtype=cfg.compute_dtype,
      chunk_tokens=cfg.loss_chunk_tokens, z_loss=z_loss)


def build_model(c, cfg: models.GPTConfig | None = None):
  """(graphdef, abstract Param state) of the config's model: nothing is allocated. `cfg`: its
  GPTConfig; the trainer passes the one `on_mesh` built (None, for tests and benchmarks:
  built here)."""
  cfg = cfg or models.GPTConfig.from_config(c.model)
  abstract = nnx.eval_shape(lambda: models.GPT(cfg, nnx.Rngs(c.seed)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  return graphdef, params


def state_from_params(params, optimizer) -> dict:
  """The train state at step 0 around `params`: fresh optimizer state, no loss seen yet."""
  return {"params": params, "opt_state": optimizer.init(params),
          "step": jnp.zeros((), jnp.int32), "min_loss": jnp.full((), jnp.inf, jnp.float32),
          "skipped": jnp.zeros((), jnp.int32)}


def make_init_fn(c, optimizer, cfg: models.GPTConfig | None = None):
  """A function of no arguments that builds the whole train state (jit it with shardings);
  `cfg`: the model's GPTConfig, as in `build_model`."""
  cfg = cfg or models.GPTConfig.from_config(c.model)

  def init():
    return state_from_params(nnx.state(models.GPT(cfg, nnx.Rngs(c.seed)), nnx.Param), optimizer)
  return init


def split_microbatches(x_bl, k: int):
  """[B, L] -> [k, B / k, L]: microbatch j holds rows j, j + k, j + 2k, ..., so each
  data-parallel shard's contiguous block of rows splits into its own part of every microbatch
  (no data moves between devices)."""
  batch_size, seqlen = x_bl.shape
  return jnp.swapaxes(x_bl.reshape(batch_size // k, k, seqlen), 0, 1)


def make_loss_and_grads(c, graphdef, microbatches: int):
  """(params, batch, step) -> (losses, gradients): `losses` {"loss": mean token loss} plus,
  with optim.z_loss > 0, "z_loss" (the mean z-loss term, whose gradient joins the loss's).
  Over `microbatches` sequential microbatches whose sums and gradients accumulate in float32:
  equal to one pass over the whole batch up to float rounding, with the activation memory of
  one microbatch. Every mean divides by the batch's real token count."""
  deterministic = c.model.dropout == 0.0 and c.model.attention_dropout == 0.0
  seed_key = jax.random.key(c.seed)
  z_loss = c.optim.z_loss

  def scaled_losses(params, inputs, targets, dropout_key, count):
    """(objective / count, losses / count)."""
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=dropout_key)
    if not z_loss:  # The step as before z-loss existed, to the bit.
      loss = loss_sum(model, inputs, targets, deterministic=deterministic, rngs=rngs) / count
      return loss, {"loss": loss}
    objective, loss, z = loss_sums(model, inputs, targets, z_loss, deterministic=deterministic,
                                   rngs=rngs)
    return objective / count, {"loss": loss / count, "z_loss": z / count}

  grad_fn = jax.value_and_grad(scaled_losses, has_aux=True)

  def loss_and_grads(params, batch, step):
    inputs, targets = batch["inputs"], batch["targets"]
    count, step_key = target_count(targets), jax.random.fold_in(seed_key, step)
    if microbatches == 1:
      (_, losses), grads = grad_fn(params, inputs, targets, step_key, count)
      return losses, grads

    def accumulate(carry, xs):
      totals, grad_sum = carry
      inputs_mb, targets_mb, index = xs
      inputs_mb, targets_mb = (pinned.constrain(x, "batch") for x in (inputs_mb, targets_mb))
      (_, losses), grads = grad_fn(params, inputs_mb, targets_mb,
                                   jax.random.fold_in(step_key, index), count)
      grad_sum = pinned.constrain(jax.tree.map(jnp.add, grad_sum, grads), "params")
      return (jax.tree.map(jnp.add, totals, losses), grad_sum), None

    # The accumulators are laid out like the parameters (FSDP: each device holds its shard).
    zeros = pinned.constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                             "params")
    no_losses = {name: jnp.float32(0) for name in ("loss", "z_loss")[:2 if z_loss else 1]}
    xs = (split_microbatches(inputs, microbatches), split_microbatches(targets, microbatches),
          jnp.arange(microbatches))
    (losses, grads), _ = jax.lax.scan(accumulate, (no_losses, zeros), xs)
    return losses, grads

  return loss_and_grads


def make_train_step(c, graphdef, optimizer, skip_bad: bool, microbatches: int = 1):
  """The pure step, over `microbatches` microbatches. With `skip_bad`, a bad update
  (`monitor.is_bad`) is not applied: parameters and optimizer state stay as they were.
  """
  skip_ratio = c.monitor.skip_ratio
  loss_and_grads = make_loss_and_grads(c, graphdef, microbatches)

  def step_fn(state, batch, lr):
    params = state["params"]
    losses, grads = loss_and_grads(params, batch, state["step"])
    loss = losses["loss"]  # The cross-entropy alone: the loss ratio's and the monitor's.
    grad_norm = optax.tree.norm(grads)
    opt_state = optim.set_learning_rate(state["opt_state"], lr)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss)
    ratio = loss / state["min_loss"]  # min_loss starts at inf: the first ratio is 0.
    bad = (monitor.is_bad(loss, grad_norm, ratio, skip_ratio, xp=jnp) if skip_bad
           else jnp.array(False))
    keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(bad, o, n), old, new)  # noqa
    if skip_bad:
      new_params, new_opt_state = keep(params, new_params), keep(opt_state, new_opt_state)
    min_loss = jnp.where(finite, jnp.minimum(state["min_loss"], loss), state["min_loss"])
    new_state = {"params": new_params, "opt_state": new_opt_state, "step": state["step"] + 1,
                 "min_loss": min_loss, "skipped": state["skipped"] + bad.astype(jnp.int32)}
    metrics = {"loss": loss, "loss_ratio": ratio, "grad_norm": grad_norm,
               "skipped": bad, **optim.adam_nu_stats(new_opt_state)}
    if "z_loss" in losses:  # optim.z_loss > 0: the z-loss term, apart from the loss.
      metrics["z_loss"] = losses["z_loss"]
    return new_state, metrics

  return step_fn


EVAL_CHUNK_TOKENS = 8192  # Evaluation's chunks when model.loss_chunk_tokens=0 (one chunk).


def make_eval_step(graphdef):
  """(params, batch) -> (loss sum, token count) at full length, deterministic: the
  cross-entropy alone, whatever optim.z_loss. The head runs fused, in chunks, whatever
  model.loss_head: a full-length eval batch's float32 logits would need more memory than
  training."""
  def eval_fn(params, batch):
    model = nnx.merge(graphdef, params)
    total = loss_sum(model, batch["inputs"], batch["targets"], loss_head="fused",
                     chunk_tokens=model.cfg.loss_chunk_tokens or EVAL_CHUNK_TOKENS)
    return total, target_count(batch["targets"])
  return eval_fn


@dataclasses.dataclass(frozen=True)
class OnMesh:
  """The model, its optimizer and where the train state lives on the mesh: built once per run
  (`on_mesh`) and handed to everything after (the compiled steps, the trainer, plan)."""
  model_cfg: models.GPTConfig
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
  attention.resolve_attention(c.model.attention, c.model.dtype,  # AttentionError before compiling.
                              attention_dropout=c.model.attention_dropout)
  cfg, optimizer = models.GPTConfig.from_config(c.model), optim.make_optimizer(c.optim)
  graphdef, abstract_params = build_model(c, cfg)  # The model's one abstract trace.
  shapes = jax.eval_shape(lambda params: state_from_params(params, optimizer), abstract_params)
  layout = sharding.make_layout(c, shapes, abstract_params, optimizer, devices)
  return OnMesh(cfg, graphdef, optimizer, layout, layout.abstract(shapes))


@dataclasses.dataclass
class ShardedSteps:
  """Everything that runs on the devices, laid out on one mesh (`sharding.Layout`)."""
  init: object  # () -> train state, created directly in its sharded layout.
  executables: "compiled_steps.BucketedStep"  # One compiled train step per bucket.
  eval: object  # (params, batch) -> (loss sum, token count), replicated.


def sharded_steps(c, placed: OnMesh, *, skip_bad: bool, background: bool = True,
                  on_compiled=None, compiler_options: dict | None = None,
                  threads: int = 1) -> ShardedSteps:
  """Init, per-bucket train steps and the eval step, all with the layout's shardings: the
  state is never materialized on one device, and every bucket uses the same shardings.
  `compiler_options` go to every bucket's compile (e.g. compiled_steps's memory estimate),
  with `compiled_steps.step_compiler_options` (XLA's remat pass off on a GPU)."""
  layout, graphdef, optimizer = placed.layout, placed.graphdef, placed.optimizer
  compiler_options = compiled_steps.merge_options(
      compiler_options, compiled_steps.step_compiler_options(c.compile.xla_remat))
  init = jax.jit(make_init_fn(c, optimizer, placed.model_cfg), out_shardings=layout.state)
  step_for = lambda k: layout.traced(make_train_step(c, graphdef, optimizer, skip_bad, k))  # noqa
  steps = compiled_steps.BucketedStep(
      step_for, placed.state_spec, background=background, batch_sharding=layout.batch,
      scalar_sharding=layout.replicated, on_compiled=on_compiled,
      compiler_options=compiler_options, threads=threads,
      jit_kwargs={"out_shardings": (layout.state, layout.replicated)})
  eval_fn = jax.jit(layout.traced(make_eval_step(graphdef)), out_shardings=layout.replicated)
  return ShardedSteps(init, steps, eval_fn)


def padded_batch(batch, seqlen: int) -> dict:
  """A loader batch as the step's inputs/targets, right-padded to the bucket's `seqlen`: the
  padded targets are PAD_TARGET (no loss, not counted), the padded inputs token 0 (causal
  attention never lets a real position see them)."""
  pad = ((0, 0), (0, seqlen - batch.inputs.shape[1]))
  if not pad[1][1]:
    return {"inputs": batch.inputs, "targets": batch.targets}
  return {"inputs": np.pad(batch.inputs, pad),
          "targets": np.pad(batch.targets, pad, constant_values=PAD_TARGET)}


class Validation:
  """The eval step (compiled in the background through `executables`, by when it is first
  needed) and the validation loss: mean loss per real token over `e.batches` batches of
  `val_index` at full length (`seqlen`), eval config `e`."""

  def __init__(self, e, val_index, layout, executables, eval_fn, params_spec, seqlen: int):
    self.e, self.val_index, self.layout, self.executables = e, val_index, layout, executables
    self.eval_fn, self.params_spec, self.seqlen = eval_fn, params_spec, seqlen
    self.compiled = None  # A future of the compiled eval step.

  def compile(self, start: int, num_steps: int):
    """Queues the compile at the priority of the first evaluation after step `start`."""
    first_eval = (start // self.e.every_steps + 1) * self.e.every_steps
    self.compiled = self.executables.compile_other(
        "eval", self.eval_fn, self.params_spec,
        compiled_steps.batch_spec(self.e.batch_size, self.seqlen, self.layout.batch),
        priority=min(first_eval, num_steps))

  def loss(self, params, step: int, num_steps: int) -> float:
    """The loss at `step`; waiting for the compile counts as a stall. Every batch is
    dispatched before one transfer reads them all."""
    if self.compiled is None:  # A state set without the trainer's setup.
      self.compile(step, num_steps)
    eval_step = self.executables.wait_for(self.compiled)
    sums = []
    for number in range(self.e.batches):
      batch = input_pipeline.validation_batch(self.val_index, number, self.e.batch_size,
                                              *self.layout.process_rows)
      batch = self.layout.global_batch({"inputs": batch.inputs, "targets": batch.targets},
                                       self.e.batch_size)
      sums.append(eval_step(params, batch))
    fetched = sharding.fetch(sums)
    return sum(float(s) for s, _ in fetched) / sum(float(n) for _, n in fetched)
