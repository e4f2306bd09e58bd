"""The pure train step: an exact AdamW update, Adam-nu metrics, skipping bad updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from slw_jax import config_lib, schedules, train_step


@pytest.fixture(scope="module")
def setup():
  c = config_lib.validate(config_lib.load_config_file(
      "configs/tiny.py", {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2,
                          "model.max_seqlen": 32, "pacing.seqlen_start": 8,
                          "pacing.multiple": 8, "monitor.skip_ratio": 1.5}))
  optimizer = schedules.make_optimizer(c.optim)
  graphdef, _ = train_step.build_model(c)
  state = jax.jit(train_step.make_init_fn(c, optimizer))()
  tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 259)
  batch = {"inputs": tokens[:, :16], "targets": tokens[:, 1:]}
  return c, optimizer, graphdef, state, batch


def _step(c, graphdef, optimizer, skip):
  return jax.jit(train_step.make_train_step(c, graphdef, optimizer, skip))


def test_one_step_equals_hand_computed_adamw(setup):
  c, optimizer, graphdef, state, batch = setup
  o, lr = c.optim, 3e-3

  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(batch["inputs"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  new_state, metrics = _step(c, graphdef, optimizer, False)(state, batch, jnp.float32(lr))
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  norm = np.sqrt(sum((g * g).sum() for g in leaves))
  assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
  scale = min(1.0, o.clip_norm / norm)
  for p, g, new in zip(jax.tree.leaves(state["params"]), leaves,
                       jax.tree.leaves(new_state["params"])):
    g = g * scale
    m, v = (1 - o.b1) * g, (1 - o.b2) * g * g
    update = (m / (1 - o.b1)) / (np.sqrt(v / (1 - o.b2)) + o.eps)
    if p.ndim >= 2:
      update = update + o.weight_decay * np.asarray(p)
    expected = np.asarray(p) - lr * update
    # Where |g| is near eps (e.g. key biases: zero gradient in exact arithmetic) Adam amplifies
    # float32 noise; hold those to 0.1% of one lr-sized step, the rest to float32 precision.
    clear = np.abs(g) > 1e3 * o.eps
    np.testing.assert_allclose(np.asarray(new)[clear], expected[clear], rtol=2e-5, atol=1e-8)
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-3 * lr)
  assert int(new_state["step"]) == 1 and float(new_state["min_loss"]) == float(metrics["loss"])


def test_adam_nu_metrics_equal_numpy(setup):
  c, optimizer, graphdef, state, batch = setup
  state = jax.tree.map(jnp.copy, state)
  step = _step(c, graphdef, optimizer, False)
  for _ in range(2):
    state, metrics = step(state, batch, jnp.float32(1e-3))
  nu = optax.tree_utils.tree_get(state["opt_state"], "nu")
  roots = np.concatenate([np.sqrt(np.asarray(x, np.float64)).ravel() for x in jax.tree.leaves(nu)])
  assert float(metrics["adam_nu_l1"]) == pytest.approx(roots.sum(), rel=1e-5)
  assert float(metrics["adam_nu_max"]) == pytest.approx(roots.max(), rel=1e-6)


def test_skip_leaves_parameters_unchanged_on_a_nan_batch(setup):
  c, optimizer, graphdef, state, batch = setup
  step = _step(c, graphdef, optimizer, True)
  state, _ = step(jax.tree.map(jnp.copy, state), batch, jnp.float32(1e-3))
  before = jax.tree.map(np.asarray, state)
  poisoned = {"inputs": batch["inputs"].at[0, 3].set(10**6), "targets": batch["targets"]}
  after, metrics = step(state, poisoned, jnp.float32(1e-3))  # Out-of-vocabulary id: NaN loss.
  assert not np.isfinite(float(metrics["loss"])) and bool(metrics["skipped"])
  for old, new in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"])):
    np.testing.assert_array_equal(old, new)
  for old, new in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(after["opt_state"])):
    if np.asarray(old).dtype != np.float32 or np.asarray(old).ndim:  # lr hyperparam is reset.
      np.testing.assert_array_equal(old, new)
  assert int(after["skipped"]) == 1 and float(after["min_loss"]) == float(before["min_loss"])
  fine, metrics = step(after, batch, jnp.float32(1e-3))
  assert np.isfinite(float(metrics["loss"])) and not bool(metrics["skipped"])


def test_skip_on_loss_ratio_above_threshold(setup):
  c, optimizer, graphdef, state, batch = setup
  state = dict(jax.tree.map(jnp.copy, state), min_loss=jnp.float32(1.0))  # Loss ~5.5: ratio 5.5.
  after, metrics = _step(c, graphdef, optimizer, True)(state, batch, jnp.float32(1e-3))
  assert float(metrics["loss_ratio"]) > 1.5 and bool(metrics["skipped"])


def test_bucketed_step_compiles_once_per_bucket(setup):
  c, optimizer, graphdef, state, _ = setup
  steps = train_step.BucketedStep(train_step.make_train_step(c, graphdef, optimizer, False),
                                  jax.eval_shape(lambda: state), background=True)
  steps.prefetch([(4, 8), (4, 16)])
  a = steps.get((4, 8))
  assert steps.get((4, 8)) is a and steps.get((4, 16)) is not a
  steps.get((2, 8))  # Not prefetched: compiled on demand.
  assert steps.num_compiled == 3
  assert steps.stats[(4, 16)].background and not steps.stats[(2, 8)].background
  assert all(s.memory_bytes > 0 and s.compile_s > 0 for s in steps.stats.values())
  steps.close()
