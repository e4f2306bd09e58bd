"""Learning-rate schedule at its boundaries, the optax optimizer and Adam-nu statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slw_jax import config_lib, optim, pacing, train_step


def _lrs(load_config, **overrides):
  c = config_lib.validate(load_config("tiny", **overrides))
  s = pacing.run_schedule(c)
  return c, s, optim.learning_rates(c, s)


def _cosine(c, progress):
  o = c.optim
  return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_step_warmup_then_token_cosine(load_config):
  c, s, lr = _lrs(load_config)  # warmup_steps=30, decay_tokens = train_tokens.
  peak = c.optim.lr
  assert lr[0] == pytest.approx(peak / 30)
  assert lr[14] == pytest.approx(peak * 15 / 30)
  assert lr[29] == pytest.approx(peak)  # Last warmup step reaches the peak.
  end = pacing.warmup_end(c)
  assert end.tokens == s.tokens_before[30]
  assert lr[30] == pytest.approx(peak)  # Decay starts from the peak, by tokens.
  mid = int(np.searchsorted(s.tokens_before, (end.tokens + c.optim.decay_tokens) / 2))
  progress = (s.tokens_before[mid] - end.tokens) / (c.optim.decay_tokens - end.tokens)
  assert lr[mid] == pytest.approx(_cosine(c, progress))
  assert lr[mid] == pytest.approx((peak + c.optim.min_lr) / 2, rel=0.02)
  last = s.num_steps - 1
  assert lr[last] == pytest.approx(_cosine(c, (s.tokens_before[last] - end.tokens) /
                                           (c.optim.decay_tokens - end.tokens)))
  assert np.all(np.diff(lr[30:]) <= 0) and np.all(lr[30:] >= c.optim.min_lr)


def test_floor_after_decay_tokens(load_config):
  c, s, lr = _lrs(load_config, optim__decay_tokens=100_000)
  after = s.tokens_before[:-1] >= 100_000
  assert after.any()
  np.testing.assert_allclose(lr[after], c.optim.min_lr)


def test_token_warmup(load_config):
  c, s, lr = _lrs(load_config, optim__warmup_steps=0, optim__warmup_tokens=10_000)
  through = s.tokens_before[1:]
  assert lr[0] == pytest.approx(c.optim.lr * through[0] / 10_000)
  end = pacing.warmup_end(c)
  assert lr[end.step - 1] == pytest.approx(c.optim.lr)  # The step that crosses 10K tokens.
  progress = (s.tokens_before[end.step] - 10_000) / (c.optim.decay_tokens - 10_000)
  assert lr[end.step] == pytest.approx(_cosine(c, progress))


def test_step_based_cosine_baseline(load_config):
  c, s, lr = _lrs(load_config, train_tokens=None, train_steps=200, optim__warmup_steps=10)
  assert c.optim.decay_steps == 200 and c.optim.decay_tokens is None
  assert lr[10] == pytest.approx(c.optim.lr)
  assert lr[105] == pytest.approx(_cosine(c, 95 / 190))
  assert lr[199] == pytest.approx(_cosine(c, 189 / 190))


def test_no_warmup(load_config):
  c, _, lr = _lrs(load_config, optim__warmup_steps=0)
  assert lr[0] == pytest.approx(c.optim.lr)


def _tiny_params():
  return {"fc_weight_df": jnp.array([[1.0, -2.0], [3.0, 0.5]]),
          "fc_bias_f": jnp.array([0.1, -0.2])}


@pytest.mark.slow
def test_optimizer_equals_hand_written_adamw_with_clipping(load_config):
  """Three updates of clip-then-AdamW against numpy, each at its own learning rate: gradients
  of global norm 5 (clipped to 1), 0.5 (left as is), then 10 (clipped). Adam's first update
  cancels any scale of the gradient, so one update would pass with clipping off; from the
  second on, the moments mix gradients of other scales, which clipping changes (by 25% here)."""
  c = config_lib.validate(load_config("tiny", optim__clip_norm=1.0))
  o = c.optim
  opt = optim.make_optimizer(o)
  params = _tiny_params()
  direction = {"fc_weight_df": np.array([[0.4, 0.0], [0.0, 0.8]]),  # Global norm 1.
               "fc_bias_f": np.array([0.4, -0.2])}
  norms_and_lrs = [(5.0, 0.01), (0.5, 0.02), (10.0, 0.005)]
  state = opt.init(params)
  expected = {name: np.asarray(p, np.float64) for name, p in params.items()}
  m = {name: np.zeros_like(p) for name, p in expected.items()}
  v = {name: np.zeros_like(p) for name, p in expected.items()}
  for t, (norm, lr) in enumerate(norms_and_lrs, start=1):
    grads = {name: jnp.asarray(norm * g, jnp.float32) for name, g in direction.items()}
    state = optim.set_learning_rate(state, lr)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    clip = min(1.0, o.clip_norm / norm)
    for name, decay in (("fc_weight_df", True), ("fc_bias_f", False)):
      g = np.asarray(grads[name], np.float64) * clip
      m[name] = o.b1 * m[name] + (1 - o.b1) * g
      v[name] = o.b2 * v[name] + (1 - o.b2) * g * g
      step = (m[name] / (1 - o.b1**t)) / (np.sqrt(v[name] / (1 - o.b2**t)) + o.eps)
      if decay:
        step = step + o.weight_decay * expected[name]
      expected[name] = expected[name] - lr * step
    for name in expected:
      np.testing.assert_allclose(params[name], expected[name], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{name} after update {t}")


def test_adam_nu_stats_equal_numpy(load_config):
  o = config_lib.validate(load_config("tiny")).optim
  opt = optim.make_optimizer(o)
  params = _tiny_params()
  state = opt.init(params)
  for scale in (1.0, -3.0):
    grads = jax.tree.map(lambda p: scale * p + 0.3, params)
    _, state = opt.update(grads, state, params)
  nu = optax.tree_utils.tree_get(state, "nu")
  roots = np.concatenate([np.sqrt(np.asarray(x)).ravel() for x in jax.tree.leaves(nu)])
  stats = optim.adam_nu_stats(state)
  assert float(stats["adam_nu_l1"]) == pytest.approx(roots.sum(), rel=1e-6)
  assert float(stats["adam_nu_max"]) == pytest.approx(roots.max(), rel=1e-6)


# Written out, not derived: every parameter of the model that takes weight decay.
DECAYED = {"wte_vd", "wpe_ld", "qkv_weight_dchk", "out_weight_hkd", "fc_weight_df",
           "proj_weight_fd"}
NOT_DECAYED = {"qkv_bias_chk", "out_bias_d", "fc_bias_f", "proj_bias_d", "bias_d", "scale_d"}
QK_NORM = {"scale_hk", "bias_hk"}  # model.qk_norm's per-head LayerNorm: never decayed.


@pytest.mark.parametrize("scan_layers,qk_norm", [(False, False), (True, False), (True, True)])
def test_weight_decay_goes_to_weights_and_embeddings_by_name(load_config, scan_layers, qk_norm):
  """By name, never by rank: the [3, H, K] QKV bias, a scanned model's stacked [layers, D]
  LayerNorm parameters and biases, and model.qk_norm's [H, K] ones take none."""
  c = config_lib.validate(load_config("tiny", model__scan_layers=scan_layers,
                                      model__qk_norm=qk_norm))
  _, params = train_step.build_model(c)
  mask = optim._decay_mask(params)
  decayed, plain = set(), set()
  for path, flag in jax.tree_util.tree_flatten_with_path(mask)[0]:
    (decayed if flag else plain).add(optim.parameter_name(path))
  assert decayed == DECAYED and plain == NOT_DECAYED | (QK_NORM if qk_norm else set())


def test_a_parameter_name_in_neither_list_is_refused():
  with pytest.raises(ValueError, match="parameter 'gate_df' is neither a weight nor a bias"):
    optim.decays("gate_df")


@pytest.mark.slow
def test_weight_decay_reaches_exactly_the_decayed_names(load_config):
  """One AdamW update with zero gradients moves only the decayed parameters (model.qk_norm's
  included among those that stay)."""
  c = config_lib.validate(load_config("tiny", model__scan_layers=True, optim__weight_decay=0.5,
                                      model__qk_norm=True))
  _, abstract = train_step.build_model(c)
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), abstract)
  opt = optim.make_optimizer(c.optim)
  state = optim.set_learning_rate(opt.init(params), 0.1)
  updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), state, params)
  for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
    moved = bool(jnp.any(update != 0))
    assert moved == (optim.parameter_name(path) in DECAYED), jax.tree_util.keystr(path)
