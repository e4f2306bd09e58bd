"""model.qk_norm and optim.z_loss (issue 23): off by default, and where on, exact wherever the
rest of the step is exact (microbatches, padded buckets, scanned layers, remat: those cases
extend the tests of tests/test_models.py and tests/test_train_step.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import metric_rows
from slw_jax import config_diff, config_lib, convert, models, optim, resume, train_step, trainer


def _cfg(**overrides):
  return models.GPTConfig(vocab_size=259, n_layer=2, d_model=32, n_head=2, max_seqlen=32,
                          **overrides)


def _params(cfg):
  return nnx.state(nnx.jit(lambda: models.GPT(cfg, nnx.Rngs(0)))(), nnx.Param)


def _flat(state) -> dict:
  """{path: Param} of a Param state."""
  return dict(nnx.to_flat_state(state))


# ----- model.qk_norm ----------------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.slow
def test_qk_norm_parameters_exist_only_when_on(scan_layers):
  """With model.qk_norm each block's attention gains q_norm and k_norm: a float32 scale (ones)
  and bias (zeros) of [heads, head_dim] named ("heads", "kv"), stacked on a leading "layers"
  axis when scanned; every other parameter is the one the model has without it (the norms
  draw no random numbers), and without it there are none."""
  off = _flat(_params(_cfg(scan_layers=scan_layers)))
  on = _flat(_params(_cfg(scan_layers=scan_layers, qk_norm=True)))
  assert not any("q_norm" in path or "k_norm" in path for path in off)
  added = sorted(set(on) - set(off), key=str)
  assert set(off) <= set(on) and len(added) == 4 * (1 if scan_layers else 2)
  lead = (2,) if scan_layers else ()
  for path in added:
    name, variable = path[-1], on[path]
    assert path[-2] in ("q_norm", "k_norm") and path[-3] == "attn"
    assert variable.shape == lead + (2, 16) and variable.dtype == jnp.float32
    axes = variable.get_metadata()["out_sharding"]
    assert tuple(axes) == ((models.LAYERS_AXIS,) if scan_layers else ()) + ("heads", "kv")
    np.testing.assert_array_equal(variable[...], 1.0 if name == "scale_hk" else 0.0)
    assert not optim.decays(name)
  for path in off:
    np.testing.assert_array_equal(on[path][...], off[path][...])


@pytest.mark.slow
def test_head_layer_norm_normalizes_each_head_over_its_head_dim():
  """Per (position, head) over the head dim, statistics in float32, output in the compute
  dtype; the scale and bias apply per (head, head dim)."""
  cfg = _cfg(qk_norm=True, dtype="bfloat16")
  with nnx.use_eager_sharding(False):  # As models.GPT builds it.
    norm = models.HeadLayerNorm(cfg, nnx.Rngs(0))
  x = (3.0 + 5.0 * jax.random.normal(jax.random.key(0), (2, 8, 2, 16))).astype(jnp.bfloat16)
  x = x.at[:, :, 1].multiply(40.0)  # Heads of different scales: each is normalized alone.
  y = norm(x)
  assert y.dtype == jnp.bfloat16
  y32 = np.asarray(y, np.float32)
  np.testing.assert_allclose(y32.mean(-1), 0.0, atol=0.02)
  np.testing.assert_allclose(y32.std(-1), 1.0, atol=0.02)
  norm.scale_hk[...] = jnp.full((2, 16), 2.0).at[1].set(0.5)
  norm.bias_hk[...] = jnp.full((2, 16), 1.0)
  np.testing.assert_allclose(np.asarray(norm(x), np.float32),
                             y32 * np.array([2.0, 0.5])[:, None] + 1.0, atol=0.05)


@pytest.mark.slow
def test_qk_norm_changes_the_output_but_stays_finite():
  """The same parameters with and without the norms (they start as the identity affine map
  of a normalized vector, not the identity): other logits, all finite, in float32 and bf16;
  and the kernels CPUs run agree with it."""
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 259)
  forward = lambda cfg: nnx.jit(lambda: models.GPT(cfg, nnx.Rngs(0))(tokens))()  # noqa: E731
  normed = forward(_cfg(qk_norm=True, attention="blockwise"))
  assert bool(jnp.all(jnp.isfinite(normed)))
  assert float(jnp.abs(normed - forward(_cfg())).max()) > 1e-3
  half = forward(_cfg(qk_norm=True, dtype="bfloat16"))
  assert bool(jnp.all(jnp.isfinite(half)))
  np.testing.assert_allclose(half, normed, atol=0.05, rtol=0.05)
  for kernel in (dict(attention="dot_product"), dict(attention="blockwise", attention_block=8)):
    np.testing.assert_allclose(forward(_cfg(qk_norm=True, **kernel)), normed, rtol=1e-5,
                               atol=1e-5)


def test_qk_norm_never_changes_on_resume_and_z_loss_is_recipe(load_config):
  """model.qk_norm shapes the parameters (a resume refuses a change, even from a checkpoint
  saved before the field existed); optim.z_loss is the recipe (refused unless
  --allow_schedule_change)."""
  shaping = models.GPTConfig.param_shaping_fields()
  assert "qk_norm" in shaping
  assert resume.classify("model.qk_norm", shaping) == "never"
  assert resume.classify("optim.z_loss", shaping) == "schedule"
  saved = config_lib.validate(load_config("tiny")).to_dict()
  del saved["model"]["qk_norm"], saved["optim"]["z_loss"]  # From an older release.
  same = config_lib.validate(load_config("tiny")).to_dict()
  assert resume.check_config(config_diff.saved_defaults(saved), same, shaping, "w", False) == (
      [], [])
  with pytest.raises(resume.ResumeError, match=r"another model \(model.qk_norm=False there, "
                     r"True here\)"):
    resume.check_config(config_diff.saved_defaults(saved),
                        config_lib.validate(load_config("tiny", model__qk_norm=True)).to_dict(),
                        shaping, "w", True)
  with pytest.raises(resume.ResumeError, match=r"optim.z_loss=0.0 there, 0.001 here"):
    resume.check_config(config_diff.saved_defaults(saved),
                        config_lib.validate(load_config("tiny", optim__z_loss=1e-3)).to_dict(),
                        shaping, "w", False)


def test_the_converter_refuses_a_qk_norm_model_in_one_line():
  """Hugging Face's GPT-2 has nowhere to put q_norm/k_norm: export (and import into such a
  config) is a one-line error naming model.qk_norm, never a silent drop."""
  cfg = _cfg(qk_norm=True)
  abstract = nnx.state(nnx.eval_shape(lambda: models.GPT(cfg, nnx.Rngs(0))), nnx.Param)
  with pytest.raises(convert.ConvertError, match=r"^config.model.qk_norm=True: ") as info:
    convert.hf_from_params(nnx.to_pure_dict(abstract), cfg)
  assert "\n" not in str(info.value)
  with pytest.raises(convert.ConvertError, match=r"model.qk_norm"):
    convert.params_from_hf({}, cfg, "model.safetensors")
  plain = _cfg()
  assert "wte.weight" in convert.hf_from_params(nnx.to_pure_dict(_params(plain)), plain)


# ----- optim.z_loss -----------------------------------------------------------------------------

def _config(**overrides):
  return config_lib.validate(config_lib.load_config_file(
      "configs/tiny.py", {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2,
                          "model.max_seqlen": 32, "model.vocab_pad_multiple": 8,
                          "pacing.seqlen_start": 8, "pacing.multiple": 8, "batch_size": 4,
                          **overrides}))


def _setup(c):
  """(graphdef, params, batch): a fresh model and a 4 x 16 batch, some targets padded."""
  graphdef, _ = train_step.build_model(c)
  params = jax.jit(lambda: nnx.state(models.GPT(models.GPTConfig.from_config(c.model),
                                                nnx.Rngs(c.seed)), nnx.Param))()
  tokens = jax.random.randint(jax.random.key(4), (4, 17), 0, 259)
  targets = tokens[:, 1:].at[0, 9:].set(train_step.PAD_TARGET).at[3, 2:].set(
      train_step.PAD_TARGET)
  return graphdef, params, {"inputs": tokens[:, :-1], "targets": targets}


@pytest.mark.parametrize("head,microbatches", [("fused", 1), ("full", 2), ("fused", 4)])
@pytest.mark.slow
def test_z_loss_equals_a_hand_computation(head, microbatches):
  """optim.z_loss = c: the z_loss value is c times the mean over real tokens of log(Z)^2 (Z
  over the real vocabulary: the 5 padded rows add nothing), the loss stays the cross-entropy
  alone, and the gradients are those of their sum, with microbatches too."""
  z = 0.25
  c = _config(**{"optim.z_loss": z, "model.loss_head": head})
  graphdef, params, batch = _setup(c)
  real = np.asarray(batch["targets"]) != train_step.PAD_TARGET
  logits = np.asarray(nnx.merge(graphdef, params)(batch["inputs"]), np.float64)  # [B, L, 259]
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, np.where(real, batch["targets"], 0)[..., None], -1)[..., 0]
  losses, grads = jax.jit(train_step.make_loss_and_grads(c, graphdef, microbatches))(
      params, batch, 0)
  assert set(losses) == {"loss", "z_loss"}
  assert float(losses["z_loss"]) == pytest.approx(z * (lse ** 2)[real].mean(), rel=1e-5)
  assert float(losses["loss"]) == pytest.approx((lse - target)[real].mean(), rel=1e-5)

  def objective(p):  # By hand, from the logits the model returns (no padded rows).
    out = nnx.merge(graphdef, p)(batch["inputs"])
    mask = jnp.asarray(real)
    ce = optax.softmax_cross_entropy_with_integer_labels(out, jnp.where(mask, batch["targets"],
                                                                        0))
    lse2 = jnp.square(jax.nn.logsumexp(out, axis=-1))
    return jnp.sum(jnp.where(mask, ce + z * lse2, 0.0)) / mask.sum()

  expected = jax.jit(jax.grad(objective))(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    assert np.linalg.norm(np.asarray(a) - b) <= 1e-5 * np.linalg.norm(b) + 1e-9


@pytest.mark.parametrize("head", ["fused", "full"])
@pytest.mark.slow
def test_z_loss_off_leaves_the_step_bitwise_identical(head):
  """optim.z_loss=0 (the default): the loss and every gradient are, to the bit, those of the
  mean cross-entropy as the step computed it before z-loss existed, and the step's metrics
  hold no z_loss."""
  c = _config(**{"model.loss_head": head})
  assert c.optim.z_loss == 0.0
  graphdef, params, batch = _setup(c)

  def before(p, batch):  # make_loss_and_grads' loss before optim.z_loss, traced alike.
    model, key = nnx.merge(graphdef, p), jax.random.fold_in(jax.random.key(c.seed), 0)
    return train_step.loss_sum(model, batch["inputs"], batch["targets"],
                               rngs=nnx.Rngs(dropout=key)) / train_step.target_count(
                                   batch["targets"])

  loss, grads = jax.jit(jax.value_and_grad(before))(params, batch)
  losses, ours = jax.jit(train_step.make_loss_and_grads(c, graphdef, 1))(params, batch, 0)
  assert set(losses) == {"loss"}
  np.testing.assert_array_equal(losses["loss"], loss)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(a, b)
  optimizer = optim.make_optimizer(c.optim)
  state = train_step.state_from_params(params, optimizer)
  _, metrics = jax.jit(train_step.make_train_step(c, graphdef, optimizer, False))(
      state, batch, jnp.float32(1e-3))
  assert "z_loss" not in metrics


@pytest.mark.slow
def test_z_loss_and_qk_norm_train_and_log_z_loss_in_metrics_jsonl(make_config, tmp_path):
  """A run with optim.z_loss > 0 (and model.qk_norm, on the 8-device data x tensor mesh of
  the trainer tests: heads sharded) writes z_loss in every metrics.jsonl row beside the
  cross-entropy loss; evaluation reports the cross-entropy (val_loss) alone."""
  c = make_config(train_steps=3, pacing__kind="none", model__qk_norm=True,
                  optim__z_loss=0.01, checkpoint__every_steps=100)
  summary = trainer.Trainer(c, str(tmp_path)).run()
  assert summary["completed"]
  rows = metric_rows(tmp_path)
  assert [r["step"] for r in rows] == [0, 1, 2]
  for row in rows:  # 0.01 log(Z)^2 with log Z near log(259) = 5.6 at the start: about 0.3.
    assert 0.05 < row["z_loss"] < 2.0 and 4.0 < row["loss"] < 7.0
  evals = metric_rows(tmp_path, "val_loss")
  assert evals and all("z_loss" not in e for e in evals)
