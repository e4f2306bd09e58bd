"""Token-based learning-rate schedule, the optax optimizer and Adam-nu statistics.

LR (Megatron-DeepSpeed's token-based schedule): linear warmup by steps or by tokens, then cosine
decay by tokens consumed before the step (or by steps, for step-based baselines):

  progress = clip((tokens - tokens_at_warmup_end) / (decay_tokens - tokens_at_warmup_end), 0, 1)
  lr = min_lr + (lr_peak - min_lr) * 0.5 * (1 + cos(pi * progress))

Warmup counts the current step: step t < warmup_steps uses lr_peak * (t + 1) / warmup_steps,
and token warmup uses lr_peak * min(1, tokens_through_this_step / warmup_tokens), so the first
update is never wasted at lr 0 and the last warmup step reaches the peak.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slw_jax import models, pacing


def learning_rates(c, schedule: pacing.Schedule) -> np.ndarray:
  """The learning rate of every step of `schedule` (float64, [S])."""
  o = c.optim
  steps = np.arange(schedule.num_steps, dtype=np.float64)
  tokens_before = schedule.tokens_before[:-1].astype(np.float64)
  tokens_through = schedule.tokens_before[1:].astype(np.float64)
  end = pacing.warmup_end(c)
  if c.pacing.kind == "adaptive" and o.warmup_steps and o.warmup_steps <= schedule.num_steps:
    # The tokens by the end of step warmup are decided online: the schedule's own (a past
    # fixed by then, since only steps after the warmup decay by them).
    end = pacing.WarmupEnd(o.warmup_steps, int(schedule.tokens_before[o.warmup_steps]))

  if o.decay_tokens is not None:
    progress = (tokens_before - end.tokens) / (o.decay_tokens - end.tokens)
  else:
    progress = (steps - end.step) / (o.decay_steps - end.step)
  progress = np.clip(progress, 0.0, 1.0)
  lr = o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + np.cos(np.pi * progress))

  if o.warmup_steps:
    in_warmup = steps < o.warmup_steps
    warm = o.lr * (steps + 1) / o.warmup_steps
  elif o.warmup_tokens:
    in_warmup = tokens_before < o.warmup_tokens
    warm = o.lr * np.minimum(tokens_through / o.warmup_tokens, 1.0)
  else:
    return lr
  return np.where(in_warmup, warm, lr)


# Weight decay by parameter name (Megatron-LM's rule: weight matrices and embeddings decay,
# biases and LayerNorm parameters do not), never by rank: the QKV bias is [3, heads, head_dim]
# and a scanned model's LayerNorm scale is [layers, d_model]. models.py names every parameter
# by what it is and its axes; a name in neither list is an error, so a new parameter is classed
# on purpose.
DECAYED_PREFIXES = ("wte_", "wpe_", "qkv_weight_", "out_weight_", "fc_weight_", "proj_weight_")
NOT_DECAYED_PREFIXES = ("qkv_bias_", "out_bias_", "fc_bias_", "proj_bias_", "bias_", "scale_")


def parameter_name(path) -> str:
  """The name of a parameter leaf: its last dict key or attribute in `path` (not `.value`)."""
  return [n for n in models.path_names(path) if isinstance(n, str) and n != "value"][-1]


def decays(name: str) -> bool:
  """Whether the parameter called `name` takes weight decay."""
  if name.startswith(DECAYED_PREFIXES):
    return True
  if name.startswith(NOT_DECAYED_PREFIXES):
    return False
  raise ValueError(f"parameter {name!r} is neither a weight nor a bias/LayerNorm name: add it to "
                   "optim.DECAYED_PREFIXES or NOT_DECAYED_PREFIXES")


def _decay_mask(params):
  """True for the parameters that take weight decay (`decays`), by name."""
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(parameter_name(path)), params)


def make_optimizer(o) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW whose learning rate is set per step (`set_learning_rate`)."""
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
      mask=_decay_mask)
  if o.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
  return optax.chain(optax.identity(), adamw)


def set_learning_rate(opt_state, lr):
  """Returns `opt_state` (from `make_optimizer`) with the learning rate of the next update."""
  clip_state, adamw_state = opt_state
  hyperparams = dict(adamw_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
  return (clip_state, adamw_state._replace(hyperparams=hyperparams))


def adam_nu_stats(opt_state) -> dict[str, jax.Array]:
  """The paper's Figure 1 statistics of Adam's variance state: l1 norm and max of sqrt(nu)."""
  nu = optax.tree_utils.tree_get(opt_state, "nu")
  roots = [jnp.sqrt(leaf) for leaf in jax.tree.leaves(nu)]
  return {
      "adam_nu_l1": sum(jnp.sum(r) for r in roots),
      "adam_nu_max": jnp.max(jnp.stack([jnp.max(r) for r in roots])),
  }
