"""The pure train step: an exact AdamW update, Adam-nu metrics, skipping bad updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from slw_jax import compiled_steps, config_lib, errors, monitor, optim, train_step


@pytest.fixture(scope="module")
def setup():
  c = config_lib.validate(config_lib.load_config_file(
      "configs/tiny.py", {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2,
                          "model.max_seqlen": 32, "pacing.seqlen_start": 8,
                          "pacing.multiple": 8, "monitor.skip_ratio": 1.5}))
  optimizer = optim.make_optimizer(c.optim)
  graphdef, _ = train_step.build_model(c)
  state = jax.jit(train_step.make_init_fn(c, optimizer))()
  tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 259)
  batch = {"inputs": tokens[:, :16], "targets": tokens[:, 1:]}
  return c, optimizer, graphdef, state, batch


def _step(c, graphdef, optimizer, skip):
  return jax.jit(train_step.make_train_step(c, graphdef, optimizer, skip))


@pytest.mark.slow
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
  paths = [optim.parameter_name(path)
           for path, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]]
  for name, p, g, new in zip(paths, jax.tree.leaves(state["params"]), leaves,
                             jax.tree.leaves(new_state["params"])):
    g = g * scale
    m, v = (1 - o.b1) * g, (1 - o.b2) * g * g
    update = (m / (1 - o.b1)) / (np.sqrt(v / (1 - o.b2)) + o.eps)
    if name in ("wte_vd", "wpe_ld") or "_weight_" in name:  # Weight decay by name.
      update = update + o.weight_decay * np.asarray(p)
    expected = np.asarray(p) - lr * update
    # Where |g| is near eps (e.g. key biases: zero gradient in exact arithmetic) Adam amplifies
    # float32 noise; hold those to 0.1% of one lr-sized step, the rest to float32 precision.
    clear = np.abs(g) > 1e3 * o.eps
    np.testing.assert_allclose(np.asarray(new)[clear], expected[clear], rtol=2e-5, atol=1e-8)
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-3 * lr)
  assert int(new_state["step"]) == 1 and float(new_state["min_loss"]) == float(metrics["loss"])


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_skip_drops_an_update_whose_loss_is_finite_but_gradients_are_not(setup, monkeypatch):
  """A finite loss does not prove finite gradients: the step must look at the gradient norm."""
  c, optimizer, graphdef, state, batch = setup
  original = train_step.make_loss_and_grads

  def nan_gradients(*args):
    loss_and_grads = original(*args)

    def poisoned(params, batch, step):
      loss, grads = loss_and_grads(params, batch, step)
      return loss, jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    return poisoned
  monkeypatch.setattr(train_step, "make_loss_and_grads", nan_gradients)
  before = jax.tree.map(np.asarray, state)
  after, metrics = _step(c, graphdef, optimizer, True)(jax.tree.map(jnp.copy, state), batch,
                                                       jnp.float32(1e-3))
  assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
  assert bool(metrics["skipped"]) and int(after["skipped"]) == 1
  for old, new in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"])):
    np.testing.assert_array_equal(old, new)


@pytest.mark.slow
def test_skip_on_loss_ratio_above_threshold(setup):
  c, optimizer, graphdef, state, batch = setup
  state = dict(jax.tree.map(jnp.copy, state), min_loss=jnp.float32(1.0))  # Loss ~5.5: ratio 5.5.
  after, metrics = _step(c, graphdef, optimizer, True)(state, batch, jnp.float32(1e-3))
  assert float(metrics["loss_ratio"]) > 1.5 and bool(metrics["skipped"])


# (name, min_loss as a multiple of the first loss (None: inf, the first step), poisoned batch):
# ratios on both sides of monitor.skip_ratio (1.5 in `setup`), and a NaN loss.
JUDGED_STEPS = [("first_step", None, False), ("ratio_below", 1 / 1.49, False),
                ("ratio_above", 1 / 1.51, False), ("non_finite_loss", None, True)]


@pytest.mark.parametrize("name,min_loss,poison", JUDGED_STEPS, ids=[c[0] for c in JUDGED_STEPS])
def test_the_step_and_the_monitor_judge_each_step_alike(setup, name, min_loss, poison):
  """One bad-step rule (monitor.is_bad) in two places: the step on the device skips exactly the
  updates the monitor on the host, given the metrics it fetches, counts as bad (a change to
  either side's rule, e.g. `>=` for `>` or a dropped finiteness check, breaks it)."""
  c, optimizer, graphdef, state, batch = setup
  step = _step(c, graphdef, optimizer, True)
  first_loss = float(step(jax.tree.map(jnp.copy, state), batch, jnp.float32(1e-3))[1]["loss"])
  start = dict(jax.tree.map(jnp.copy, state), min_loss=jnp.float32(
      np.inf if min_loss is None else first_loss * min_loss))
  if poison:  # An out-of-vocabulary id: a NaN loss.
    batch = {"inputs": batch["inputs"].at[0, 3].set(10**6), "targets": batch["targets"]}
  after, metrics = step(start, batch, jnp.float32(1e-3))
  values = {k: float(v) for k, v in metrics.items()}
  on_device = bool(metrics["skipped"])
  on_host = bool(monitor.is_bad(values["loss"], values["grad_norm"], values["loss_ratio"],
                                c.monitor.skip_ratio))
  judged = monitor.StabilityMonitor(c.monitor)
  judged.observe(0, {**values, "skipped": on_device})
  assert on_device == on_host == (judged.summary()["bad_steps"] == 1)
  assert on_device == (name in ("ratio_above", "non_finite_loss"))
  unchanged = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start["params"]),
                                                        jax.tree.leaves(after["params"])))
  assert unchanged == on_device


@pytest.mark.slow
def test_bucketed_step_compiles_once_per_bucket(setup):
  c, optimizer, graphdef, state, _ = setup
  steps = compiled_steps.BucketedStep(
      lambda k: train_step.make_train_step(c, graphdef, optimizer, False, k),
      jax.eval_shape(lambda: state), background=True)
  steps.prefetch([(4, 8), (4, 16)])
  a = steps.get((4, 8))
  assert steps.get((4, 8)) is a and steps.get((4, 16)) is not a
  steps.get((2, 8))  # Not prefetched: compiled on demand.
  assert steps.num_compiled == 3
  assert steps.stats[(4, 16)].background and not steps.stats[(2, 8)].background
  assert all(s.memory_bytes > 0 and s.compile_s > 0 for s in steps.stats.values())
  steps.close()


# ----- microbatches -------------------------------------------------------------------------------

def _microbatch_config(**overrides):
  return config_lib.validate(config_lib.load_config_file(
      "configs/tiny.py", {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2,
                          "model.max_seqlen": 64, "pacing.seqlen_start": 8,
                          "pacing.multiple": 8, "batch_size": 16, **overrides}))


def _assert_same_step(a, b, before, unclear_atol=1e-2 * 3e-3):
  """Loss, gradient norm, Adam statistics and every parameter's update agree to relative 1e-5.

  Updates are compared per tensor in l2 over the elements whose Adam step is not dominated by
  eps: where |g| is within a few eps of 0, Adam's g / (|g| + eps) turns float32 noise of the
  summation order into visible differences (as in test_one_step_equals_hand_computed_adamw);
  those are held to 1% of an lr-sized step.
  """
  (state_a, metrics_a), (state_b, metrics_b) = a, b
  assert set(metrics_a) == set(metrics_b)
  for key in ("loss", "grad_norm", "adam_nu_l1", "adam_nu_max") + (
      ("z_loss",) if "z_loss" in metrics_b else ()):
    assert float(metrics_a[key]) == pytest.approx(float(metrics_b[key]), rel=1e-5), key
  nu = optax.tree_utils.tree_get(state_b["opt_state"], "nu")
  for x, y, p, v in zip(*(jax.tree.leaves(s["params"]) for s in (state_a, state_b, before)),
                        jax.tree.leaves(nu)):
    update_a, update_b = np.asarray(x) - np.asarray(p), np.asarray(y) - np.asarray(p)
    clear = np.sqrt(np.asarray(v) / 0.001) > 1e3 * 1e-8  # |g| from nu = (1 - b2) g^2.
    assert (np.linalg.norm((update_a - update_b)[clear]) <=
            1e-5 * np.linalg.norm(update_b[clear]) + 1e-12)
    if unclear_atol is not None:
      np.testing.assert_allclose(update_a, update_b, rtol=0, atol=unclear_atol)


@pytest.mark.parametrize("microbatches", [2, 4, 16])
@pytest.mark.slow
def test_microbatches_equal_one_pass(microbatches):
  c = _microbatch_config()
  optimizer = optim.make_optimizer(c.optim)
  graphdef, _ = train_step.build_model(c)
  state = jax.jit(train_step.make_init_fn(c, optimizer))()
  tokens = jax.random.randint(jax.random.key(5), (16, 49), 0, 259)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  run = lambda k: jax.jit(train_step.make_train_step(c, graphdef, optimizer, False, k))(  # noqa
      state, batch, jnp.float32(3e-3))
  _assert_same_step(run(microbatches), run(1), state)
  text = jax.jit(train_step.make_train_step(c, graphdef, optimizer, False, microbatches)).lower(
      state, batch, jnp.float32(3e-3)).as_text()
  assert "while" in text  # A lax.scan over the microbatches, not an unrolled Python loop.


@pytest.mark.slow
def test_microbatches_on_a_mesh_equal_one_pass_and_keep_rows_on_their_devices():
  from slw_jax import sharding  # pylint: disable=g-import-not-at-top
  c = _microbatch_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                            "model.vocab_pad_multiple": 8})
  placed = train_step.on_mesh(c)
  device = train_step.sharded_steps(c, placed, skip_bad=False, background=False)
  tokens = np.random.default_rng(0).integers(0, 259, (16, 33)).astype(np.int32)
  batch = placed.layout.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, 16)
  results, before = [], jax.tree.map(np.asarray, device.init())
  for k in (1, 4):
    device.executables.microbatches = lambda b, l, k=k: k  # noqa: E731
    executable, stats = device.executables.compile_with((16, 32), k)
    assert stats.microbatches == k
    state, metrics = executable(device.init(), batch, np.float32(3e-3))
    results.append((state, sharding.fetch(metrics)))
  _assert_same_step(*results, before)
  device.executables.close()


def test_microbatch_counts_keep_tokens_per_microbatch():
  policy = compiled_steps.Microbatching(largest=(16, 256), largest_count=4, batch_shards=2)
  assert policy.tokens_per_microbatch == 1024
  assert [policy.count(16, length) for length in (32, 64, 128, 192, 256)] == [1, 1, 2, 4, 4]
  assert policy.count(8, 256) == 2
  assert compiled_steps.microbatch_options(16, 2) == [1, 2, 4, 8]
  with pytest.raises(errors.ConfigError, match=r"config.optim.microbatches=3 is invalid: the "
                     r"largest bucket's batch of 16 rows over 2 data-parallel shard\(s\) splits "
                     r"into 1, 2, 4, 8 microbatches"):
    compiled_steps.check_microbatches(3, (16, 256), 2)


@pytest.mark.slow
def test_auto_microbatches_pick_the_fewest_that_fit():
  c = _microbatch_config()
  placed = train_step.on_mesh(c, jax.devices()[:1])
  steps = train_step.sharded_steps(c, placed, skip_bad=False, background=False).executables
  shape = (16, 64)
  need = {k: steps.compile_with(shape, k)[1].memory_bytes for k in (1, 2, 4)}
  assert need[1] > need[2] > need[4]
  policy, line = compiled_steps.choose_microbatches(steps, "auto", shape, 1, need[2] + 1)
  assert policy.largest_count == 2 and "auto: the fewest that fit" in line
  assert steps.stats[shape].microbatches == 2 and steps.num_compiled == 1  # Adopted, not redone.
  assert steps.microbatches(16, 32) == 1  # Half the tokens: one microbatch is enough.
  policy, line = compiled_steps.choose_microbatches(steps, "auto", shape, 1, None)
  assert policy.largest_count == 1 and "no memory limit" in line
  policy, line = compiled_steps.choose_microbatches(steps, "auto", shape, 1, 1000)
  assert policy.largest_count == 16 and "still too big" in line
  steps.close()


@pytest.mark.slow
def test_gpu_steps_compile_without_xla_remat_and_auto_says_so(monkeypatch):
  """On a GPU every train step compiles with XLA's rematerialization pass off (unless
  compile.xla_remat), so `auto` judges fit by the step's own need and says so; other backends
  and compile.xla_remat=true keep XLA's defaults."""
  assert compiled_steps.step_compiler_options(False, "gpu") == {
      "xla_disable_hlo_passes": "rematerialization"}
  assert compiled_steps.step_compiler_options(True, "gpu") is None
  assert compiled_steps.step_compiler_options(False, "cpu") is None
  merged = compiled_steps.merge_options(compiled_steps.CPU_MEMORY_ESTIMATE_OPTIONS,
                                        compiled_steps.step_compiler_options(False, "gpu"))
  assert merged["xla_disable_hlo_passes"] == "cse,cse_barrier_expander,rematerialization"
  assert compiled_steps.remat_pass_off(merged) and not compiled_steps.remat_pass_off(None)
  # Passes a user disabled in XLA_FLAGS stay disabled (an option would replace the list).
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                     "--xla_disable_hlo_passes=foo,bar")
  assert compiled_steps.merge_options(compiled_steps.step_compiler_options(False, "gpu")) == {
      "xla_disable_hlo_passes": "foo,bar,rematerialization"}
  monkeypatch.delenv("XLA_FLAGS")
  assert compiled_steps.merge_options(None, {"a": 1}) == {"a": 1}
  c = _microbatch_config()
  placed = train_step.on_mesh(c, jax.devices()[:1])
  monkeypatch.setattr(compiled_steps.jax, "default_backend", lambda: "gpu")
  steps = train_step.sharded_steps(c, placed, skip_bad=False, background=False).executables
  monkeypatch.undo()  # Compiles for the CPU that is here, with the GPU's options.
  assert compiled_steps.remat_pass_off(steps.compiler_options)
  _, line = compiled_steps.choose_microbatches(steps, "auto", (16, 64), 1, 10**12)
  assert "XLA's rematerialization pass off: the step's own need" in line
  steps.close()
  c = _microbatch_config(**{"compile.xla_remat": True})
  monkeypatch.setattr(compiled_steps.jax, "default_backend", lambda: "gpu")
  steps = train_step.sharded_steps(c, placed, skip_bad=False, background=False).executables
  monkeypatch.undo()
  assert steps.compiler_options is None
  _, line = compiled_steps.choose_microbatches(steps, "auto", (16, 64), 1, 10**12)
  assert "as compiled" in line
  steps.close()


@pytest.mark.parametrize("seqlen,pad,chunk_tokens", [(24, 1, 8192), (200, 8, 128), (21, 8, 10),
                                                    (24, 8, 0)])
@pytest.mark.slow
def test_fused_head_equals_the_full_head(seqlen, pad, chunk_tokens):
  """model.loss_head=fused (token chunks, gradients in the forward pass) equals the full
  head's loss and gradients, for one chunk, several, chunks of one position (odd lengths) and
  the whole batch at once, with and without vocabulary padding."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from slw_jax import models  # pylint: disable=g-import-not-at-top
  cfg = models.GPTConfig(vocab_size=259, n_layer=1, d_model=32, n_head=2, max_seqlen=256,
                         vocab_pad_multiple=pad, loss_chunk_tokens=chunk_tokens)
  graphdef, params = nnx.split(nnx.jit(lambda: models.GPT(cfg, nnx.Rngs(0)))(), nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (2, seqlen + 1), 0, 259)

  def loss(p, head):
    model = nnx.merge(graphdef, p)
    return train_step.loss_sum(model, tokens[:, :-1], tokens[:, 1:], loss_head=head)

  whole, grads_whole = jax.jit(jax.value_and_grad(lambda p: loss(p, "full")))(params)
  fused, grads_fused = jax.jit(jax.value_and_grad(lambda p: loss(p, "fused")))(params)
  logits = nnx.merge(graphdef, params)(tokens[:, :-1])
  reference = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).sum()
  assert float(fused) == pytest.approx(float(whole), rel=1e-6)
  assert float(jax.jit(lambda p: loss(p, "fused"))(params)) == pytest.approx(float(whole),
                                                                              rel=1e-6)
  assert float(whole) == pytest.approx(float(reference), rel=1e-6)
  for a, b in zip(jax.tree.leaves(grads_fused), jax.tree.leaves(grads_whole)):
    # Per tensor, in l2: the chunks sum the tokens' contributions in another order.
    assert np.linalg.norm(np.asarray(a) - b) <= 1e-5 * np.linalg.norm(b) + 1e-9


@pytest.mark.parametrize("pad,chunk_tokens", [(8, 10), (1, 0)])
@pytest.mark.slow
def test_fused_head_equals_the_full_head_with_z_loss(pad, chunk_tokens):
  """optim.z_loss: the fused head's objective, loss and z sums and the objective's gradients
  (the z-loss's formed in the same pass) equal the full head's under autodiff, with padded
  positions and vocabulary rows; the z-loss's share of the gradients is large here, so a
  fused head that dropped or misscaled it would fail."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from slw_jax import models  # pylint: disable=g-import-not-at-top
  cfg = models.GPTConfig(vocab_size=259, n_layer=1, d_model=32, n_head=2, max_seqlen=64,
                         vocab_pad_multiple=pad, loss_chunk_tokens=chunk_tokens)
  graphdef, params = nnx.split(nnx.jit(lambda: models.GPT(cfg, nnx.Rngs(0)))(), nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (2, 25), 0, 259)
  targets = tokens[:, 1:].at[0, 17:].set(train_step.PAD_TARGET)

  def sums(p, head, z_loss=0.5):
    model = nnx.merge(graphdef, p)
    objective, *values = train_step.loss_sums(model, tokens[:, :-1], targets, z_loss,
                                              loss_head=head)
    return objective, values

  grad = lambda head, **kw: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p: sums(p, head, **kw), has_aux=True))(params)
  (obj_full, values_full), grads_full = grad("full")
  (obj_fused, values_fused), grads_fused = grad("fused")
  evaluated, values_eval = jax.jit(lambda p: sums(p, "fused"))(params)  # No backward pass.
  for a, b in zip([obj_fused, evaluated, *values_fused, *values_eval],
                  [obj_full, obj_full, *values_full, *values_full]):
    assert float(a) == pytest.approx(float(b), rel=1e-6)
  _, grads_ce = grad("full", z_loss=0.0)
  for a, b, ce in zip(*(jax.tree.leaves(g) for g in (grads_fused, grads_full, grads_ce))):
    assert np.linalg.norm(np.asarray(a) - b) <= 1e-5 * np.linalg.norm(b) + 1e-9
  share = [np.linalg.norm(b - ce) / np.linalg.norm(b)
           for b, ce in zip(jax.tree.leaves(grads_full), jax.tree.leaves(grads_ce))
           if np.linalg.norm(b) > 0]
  assert max(share) > 0.1


# ----- padded buckets ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,microbatches", [
    ({}, 1), ({"model.remat": "block"}, 2), ({"model.scan_layers": True}, 4),
    ({"model.dropout": 0.1}, 1),
    ({"model.dropout": 0.1, "model.attention_dropout": 0.1, "model.scan_layers": True,
      "model.remat": "block"}, 2),
    ({"model.qk_norm": True, "optim.z_loss": 0.1, "model.scan_layers": True,
      "model.remat": "dots", "model.dropout": 0.1}, 2)])
@pytest.mark.slow
def test_a_padded_bucket_trains_exactly_like_the_real_length(overrides, microbatches):
  """compile.pad_multiple: a length-20 batch right-padded to 32 (targets PAD_TARGET, inputs
  token 0) gives the loss, gradient norm, Adam statistics and updates of the length-20 step;
  with dropout on, the real positions draw the same masks (models.PositionKeyedDropout,
  attention.AttentionDropout); with model.qk_norm and optim.z_loss, the padded positions add
  no z-loss (value or gradient) and leave the count alone."""
  c = _microbatch_config(**overrides)
  optimizer = optim.make_optimizer(c.optim)
  graphdef, _ = train_step.build_model(c)
  state = jax.jit(train_step.make_init_fn(c, optimizer))()
  tokens = np.asarray(jax.random.randint(jax.random.key(5), (16, 21), 0, 259), np.int32)
  real = train_step.padded_batch(_Batch(tokens[:, :-1], tokens[:, 1:]), 20)
  padded = train_step.padded_batch(_Batch(tokens[:, :-1], tokens[:, 1:]), 32)
  assert padded["inputs"].shape == (16, 32) and np.all(padded["targets"][:, 20:] == -1)
  grads = jax.jit(train_step.make_loss_and_grads(c, graphdef, microbatches))
  (losses_p, grads_p), (losses_r, grads_r) = (grads(state["params"], b, 0)
                                               for b in (padded, real))
  assert set(losses_p) == set(losses_r) == ({"loss", "z_loss"} if c.optim.z_loss else {"loss"})
  for key in losses_r:
    assert float(losses_p[key]) == pytest.approx(float(losses_r[key]), rel=1e-5), key
  for x, y in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_r)):
    # 1e-9: the key norm's bias (model.qk_norm) has no gradient in exact arithmetic (softmax
    # ignores a shift shared by all keys); what it gets is float noise, about 1e-10.
    assert np.linalg.norm(x - y) <= 1e-5 * np.linalg.norm(y) + 1e-9
  step = jax.jit(train_step.make_train_step(c, graphdef, optimizer, False, microbatches))
  # Elements whose gradient is ~1e-9 (float noise of the summation order, as with
  # microbatches) get Adam updates anywhere in [-lr, lr]: only the clear ones are compared.
  _assert_same_step(step(state, padded, jnp.float32(3e-3)), step(state, real, jnp.float32(3e-3)),
                    state, unclear_atol=None)


class _Batch:
  def __init__(self, inputs, targets):
    self.inputs, self.targets = inputs, targets


@pytest.mark.slow
def test_padded_targets_carry_no_loss_and_are_not_counted():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 7))
  targets = jnp.array([[1, 2, -1, -1], [3, -1, -1, -1]])
  losses = train_step.token_losses(logits, targets)
  assert float(train_step.target_count(targets)) == 3.0
  np.testing.assert_array_equal(np.asarray(losses)[np.asarray(targets) < 0], 0.0)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits[0, :2], targets[0, :2])
  np.testing.assert_allclose(losses[0, :2], expected, rtol=1e-6)
