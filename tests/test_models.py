"""GPT model: published parameter counts, causality, bucket lengths, dtypes, axis names, init."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

from sharded import on_pinned_heads
from slw_jax import attention, config_lib, errors, models

def build(cfg, seed=0):
  """A concrete model, initialized under jit (eager NNX init dispatches op by op: slow)."""
  return nnx.jit(lambda: models.GPT(cfg, nnx.Rngs(seed)))()


@nnx.jit(static_argnames="deterministic")
def forward(model, tokens, deterministic=True):
  return model(tokens, deterministic=deterministic, rngs=nnx.Rngs(dropout=7))


PUBLISHED = {"gpt2_117m": 124_439_808, "gpt2_1p5b": 1_557_611_200, "gpt3_125m": 125_226_240}


def _model_cfg(load_config, name="tiny", **overrides):
  c = config_lib.validate(load_config(name, **overrides))
  return models.GPTConfig.from_config(c.model)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.slow
def test_published_parameter_counts(load_config, name):
  # Published counts are for the unpadded vocabulary (the configs pad it to 50304 rows).
  cfg = _model_cfg(load_config, name, model__vocab_pad_multiple=1)
  assert models.num_params(cfg) == PUBLISHED[name]
  padded = _model_cfg(load_config, name)
  assert padded.padded_vocab == 50304
  assert models.num_params(padded) == PUBLISHED[name] + 47 * padded.d_model


@pytest.mark.slow
def test_vocab_padding_adds_rows_but_not_logits(load_config):
  cfg = _model_cfg(load_config, "gpt2_117m", model__vocab_pad_multiple=128)
  assert cfg.padded_vocab == 50304
  assert models.num_params(cfg) == PUBLISHED["gpt2_117m"] + (50304 - 50257) * 768
  tiny = _model_cfg(load_config, model__vocab_pad_multiple=128)
  model = build(tiny)
  assert model.wte_vd.shape == (384, 128)
  assert forward(model, jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 259)


@pytest.fixture(scope="module")
def tiny_model():
  cfg = models.GPTConfig(vocab_size=259, n_layer=2, d_model=64, n_head=4, max_seqlen=64)
  return build(cfg)


@pytest.mark.slow
def test_causality(tiny_model):
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, 259)
  base = forward(tiny_model, tokens)
  for i in (0, 7, 30, 46):
    changed = tokens.at[:, i + 1:].set((tokens[:, i + 1:] + 17) % 259)
    out = forward(tiny_model, changed)
    np.testing.assert_allclose(out[:, :i + 1], base[:, :i + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[:, i + 1:], base[:, i + 1:])


@pytest.mark.parametrize("seqlen", [8, 16, 24, 40, 64])
def test_forward_at_bucket_lengths(tiny_model, seqlen):
  tokens = jnp.ones((3, seqlen), jnp.int32)
  logits = forward(tiny_model, tokens)
  assert logits.shape == (3, seqlen, 259) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_prefix_of_longer_sequence_gives_same_logits(tiny_model):
  tokens = jax.random.randint(jax.random.key(2), (2, 64), 0, 259)
  np.testing.assert_allclose(forward(tiny_model, tokens[:, :16]), forward(tiny_model, tokens)[:, :16],
                             atol=1e-5)


def test_too_long_sequence_is_a_clear_error(tiny_model):
  with pytest.raises(ValueError, match="exceeds model.max_seqlen=64"):
    tiny_model(jnp.zeros((1, 72), jnp.int32))


@pytest.mark.parametrize("seqlen,block", [(64, 16), (64, 24), (40, 128), (8, 8), (1, 4)])
@pytest.mark.slow
def test_blockwise_attention_equals_dot_product_attention(seqlen, block):
  q, k, v = (jax.random.normal(jax.random.key(i), (2, seqlen, 3, 16)) for i in range(3))
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa
  blockwise = lambda q, k, v: attention.blockwise_causal_attention(q, k, v, block)  # noqa
  np.testing.assert_allclose(blockwise(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
  grads = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)  # noqa
  for ours, theirs in zip(grads(blockwise), grads(reference)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_model_attention_kinds_agree():
  cfg = models.GPTConfig(vocab_size=259, n_layer=2, d_model=64, n_head=4, max_seqlen=64,
                         attention="dot_product")
  assert attention.resolve_attention("auto", "float32")[0] == "blockwise"  # The CPU backend.
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, 259)
  reference = forward(build(cfg), tokens)
  for block in (16, 128):
    blockwise = dataclasses.replace(cfg, attention="blockwise", attention_block=block)
    np.testing.assert_allclose(forward(build(blockwise), tokens), reference, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  cfg = models.GPTConfig(vocab_size=259, n_layer=2, d_model=64, n_head=4, max_seqlen=32,
                         dtype="bfloat16")
  model = build(cfg)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  logits = forward(model, jnp.ones((2, 16), jnp.int32))
  # The head accumulates in float32 and the logits stay float32 (the loss sees full mantissas).
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_every_parameter_has_logical_axis_names(tiny_model):
  specs = nnx.get_partition_spec(nnx.state(tiny_model, nnx.Param))
  params = nnx.state(tiny_model, nnx.Param)
  for spec, value in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.P)),
                         jax.tree.leaves(params)):
    assert len(spec) == value.ndim
    assert any(axis is not None for axis in spec)


@pytest.mark.slow
def test_gpt2_initialization_scales():
  cfg = models.GPTConfig(vocab_size=512, n_layer=8, d_model=256, n_head=4, max_seqlen=64)
  model = build(cfg, seed=3)
  block = model.blocks[0]
  resid = 0.02 / math.sqrt(2 * cfg.n_layer)
  assert float(jnp.std(model.wte_vd[...])) == pytest.approx(0.02, rel=0.05)
  assert float(jnp.std(block.attn.qkv_weight_dchk[...])) == pytest.approx(0.02, rel=0.05)
  assert float(jnp.std(block.attn.out_weight_hkd[...])) == pytest.approx(resid, rel=0.05)
  assert float(jnp.std(block.mlp.proj_weight_fd[...])) == pytest.approx(resid, rel=0.05)
  assert float(jnp.abs(block.mlp.fc_bias_f[...]).max()) == 0.0
  assert float(jnp.abs(block.ln_1.scale_d[...] - 1).max()) == 0.0


@pytest.mark.slow
def test_dropout_is_off_when_deterministic():
  cfg = models.GPTConfig(vocab_size=259, n_layer=1, d_model=32, n_head=2, max_seqlen=16,
                         dropout=0.5)
  model = build(cfg)
  tokens = jnp.ones((2, 16), jnp.int32)
  np.testing.assert_array_equal(forward(model, tokens), forward(model, tokens))
  assert not np.allclose(forward(model, tokens, deterministic=False), forward(model, tokens))


def _residual_keep(rng: str, key: int, shape=(8, 128, 64), rate: float = 0.1):
  """The keep mask of model.dropout (`rng`: hash | threefry) on ones of `shape`."""
  drop = models.PositionKeyedDropout(rate, rng)
  out = drop(jnp.ones(shape), deterministic=False, rngs=nnx.Rngs(dropout=key))
  return np.asarray(out) != 0, np.asarray(out)


@pytest.mark.parametrize("rng", ["hash", "threefry"])
def test_residual_dropout_drops_its_rate_uncorrelated_and_rescales(rng):
  """model.dropout_rng: both mask kinds drop `rate` of the elements, with no correlation
  between neighbouring rows, positions or features, nor between two keys (layers, steps)."""
  keep, out = _residual_keep(rng, 0)
  assert abs(keep.mean() - 0.9) < 0.005  # 65,536 draws: 5 sigma is 0.006; seeded, so fixed.
  for axis in (0, 1, 2):
    a, b = np.moveaxis(keep, axis, 0)[:-1].ravel(), np.moveaxis(keep, axis, 0)[1:].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
  other, _ = _residual_keep(rng, 1)
  assert abs(np.corrcoef(keep.ravel(), other.ravel())[0, 1]) < 0.02
  np.testing.assert_allclose(out[keep], 1 / 0.9, rtol=1e-6)


@pytest.mark.parametrize("rng", ["hash", "threefry"])
@pytest.mark.slow
def test_residual_dropout_masks_do_not_depend_on_the_length(rng):
  """A position's mask is the same at any length (padded buckets drop what the real length
  drops), for both mask kinds; the two kinds draw different masks."""
  long, _ = _residual_keep(rng, 3, (4, 48, 32), 0.3)
  short, _ = _residual_keep(rng, 3, (4, 20, 32), 0.3)
  np.testing.assert_array_equal(long[:, :20], short)
  other_kind, _ = _residual_keep("threefry" if rng == "hash" else "hash", 3, (4, 48, 32), 0.3)
  assert not np.array_equal(long, other_kind)


def test_attention_dropout_drops_its_rate_of_probabilities_and_rescales_the_rest():
  drop = attention.AttentionDropout.from_key(jax.random.key(0), 0.1, 128)
  keep = np.asarray(drop.keep(8, 4, (0, 128), 128))
  assert abs(keep.mean() - 0.9) < 0.005  # 524,288 draws: 5 sigma is 0.002.
  # Neighbouring positions, heads and rows are not correlated.
  for axis in (1, 2, 3):
    a, b = np.moveaxis(keep, axis, 0)[:-1].ravel(), np.moveaxis(keep, axis, 0)[1:].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01
  other = np.asarray(attention.AttentionDropout.from_key(jax.random.key(1), 0.1, 128).keep(
      8, 4, (0, 128), 128))
  assert abs(np.corrcoef(keep.ravel(), other.ravel())[0, 1]) < 0.01  # Another key, other masks.
  p = jnp.full((8, 4, 128, 128), 0.5)
  np.testing.assert_allclose(np.asarray(drop(p, (0, 128), 128)), np.where(keep, 0.5 / 0.9, 0.0),
                             rtol=1e-6)


@pytest.mark.slow
def test_attention_dropout_masks_do_not_depend_on_length_or_query_block():
  """A position's mask is the same in a padded bucket and in any query block: padded training
  stays exact with attention dropout on."""
  drop = attention.AttentionDropout.from_key(jax.random.key(2), 0.3, 64)
  q = jax.random.normal(jax.random.key(1), (2, 48, 3, 16))
  long = attention.blockwise_causal_attention(q, q, q, 16, drop)
  short = attention.blockwise_causal_attention(q[:, :32], q[:, :32], q[:, :32], 8, drop)
  np.testing.assert_allclose(np.asarray(long[:, :32]), np.asarray(short), rtol=1e-5, atol=1e-6)
  plain = attention.blockwise_causal_attention(q, q, q, 16)
  assert not np.allclose(np.asarray(long), np.asarray(plain))
  # One block: the accelerators' path.
  one_call = attention.attend(q, q, q, "dot_product", 16, drop)
  np.testing.assert_allclose(np.asarray(one_call), np.asarray(long), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_attention_dropout_leaves_the_fused_kernels_unless_cudnn_is_explicit():
  for backend in ("gpu", "tpu"):
    kernel, why = attention.resolve_attention("auto", "bfloat16", backend, attention_dropout=0.1)
    assert kernel == "dot_product" and "model.attention_dropout=0.1" in why
  assert attention.resolve_attention("auto", "bfloat16", "cpu", attention_dropout=0.1)[0] == \
      "blockwise"
  with pytest.raises(errors.ConfigError, match=r"config.model.attention='splash' is "
                     r"invalid with model.attention_dropout=0.1: the splash kernel applies no"):
    attention.resolve_attention("splash", "bfloat16", "tpu", attention_dropout=0.1)
  kernel, why = attention.resolve_attention("cudnn", "bfloat16", "gpu", attention_dropout=0.1)
  assert kernel == "cudnn" and "cuDNN's own attention dropout" in why
  for backend, dtype in (("cpu", "bfloat16"), ("gpu", "float32")):  # A cuDNN-dropout request
    with pytest.raises(errors.ConfigError, match=r"config.model.attention='cudnn' is "
                       r"invalid here"):  # on a device or dtype without it.
      attention.resolve_attention("cudnn", dtype, backend, attention_dropout=0.1)
  cfg = models.GPTConfig(vocab_size=259, n_layer=1, d_model=32, n_head=2, max_seqlen=16,
                         attention_dropout=0.5)
  model, tokens = build(cfg), jnp.ones((2, 16), jnp.int32)
  np.testing.assert_array_equal(forward(model, tokens), forward(model, tokens))
  assert not np.allclose(forward(model, tokens, deterministic=False), forward(model, tokens))


def test_train_flops_per_token(load_config):
  cfg = _model_cfg(load_config, "gpt2_117m")
  flops = models.train_flops_per_token(cfg, 1024, PUBLISHED["gpt2_117m"])
  expected = 6 * (PUBLISHED["gpt2_117m"] - 1024 * 768) + 12 * 12 * 768 * 1024
  assert flops == expected


# ----- attention dispatch, mixed precision, remat -----------------------------------------------

@pytest.mark.parametrize("backend,dtype,expected", [
    ("gpu", "bfloat16", "cudnn"), ("gpu", "float32", "dot_product"), ("tpu", "bfloat16", "splash"),
    ("tpu", "float32", "splash"), ("cpu", "bfloat16", "blockwise"), ("cpu", "float32", "blockwise"),
    ("rocm", "bfloat16", "dot_product")])
def test_auto_attention_resolves_per_backend_and_dtype(backend, dtype, expected):
  kernel, why = attention.resolve_attention("auto", dtype, backend)
  assert kernel == expected and why.startswith("auto")
  if (backend, dtype) == ("gpu", "float32"):
    assert "falls back" in why and "model.dtype=bfloat16" in why  # Said, not silent.


@pytest.mark.parametrize("kind,dtype,backend,message", [
    ("cudnn", "bfloat16", "cpu", "cuDNN fused attention needs a GPU"),
    ("cudnn", "float32", "gpu", "model.dtype=bfloat16"),
    ("splash", "bfloat16", "gpu", "needs a TPU"),
])
def test_kernels_a_backend_cannot_run_are_config_errors(kind, dtype, backend, message):
  with pytest.raises(errors.ConfigError, match=message) as info:
    attention.resolve_attention(kind, dtype, backend)
  assert f"config.model.attention='{kind}'" in str(info.value)


def test_cudnn_on_cpu_stops_before_anything_compiles(load_config):
  from slw_jax import train_step  # pylint: disable=g-import-not-at-top
  c = config_lib.validate(load_config("tiny", model__attention="cudnn", model__dtype="bfloat16"))
  with pytest.raises(errors.ConfigError, match="needs a GPU"):
    train_step.on_mesh(c, jax.devices()[:1])


def test_buckets_a_kernel_cannot_take_fall_back_and_are_logged():
  assert attention.bucket_attention("auto", "bfloat16", 120, 64, "tpu")[0] == "dot_product"
  assert attention.bucket_attention("auto", "bfloat16", 256, 64, "tpu")[0] == "splash"
  assert attention.bucket_attention("auto", "bfloat16", 64, 160, "gpu")[0] == "dot_product"
  cfg = models.GPTConfig(vocab_size=259, n_layer=1, d_model=128, n_head=2, max_seqlen=512,
                         dtype="bfloat16")
  lines = attention.attention_lines(cfg, [8, 64, 128, 256])
  assert lines == ["attention: blockwise (auto: CPU (2-4x faster than XLA attention there))"]


@pytest.mark.slow
def test_splash_kernel_equals_dot_product_attention_alone_and_sharded():
  """The TPU kernel, run in Pallas interpret mode on the CPU: values and gradients, one device
  and inside shard_map over a (data=4, tensor=2) mesh (the layout the trainer pins)."""
  q, k, v = (jax.random.normal(jax.random.key(i), (4, 128, 2, 16)) for i in range(3))
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa
  splash = lambda q, k, v: attention.splash_causal_attention(q, k, v, interpret=True)  # noqa
  np.testing.assert_allclose(jax.jit(splash)(q, k, v), reference(q, k, v), atol=2e-5)
  grads = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)  # noqa
  for ours, theirs in zip(grads(jax.jit(splash)), grads(reference)):
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
  np.testing.assert_allclose(on_pinned_heads(splash, q, k, v), reference(q, k, v), atol=2e-5)


def _lower_train_step_for_cuda(monkeypatch, load_config, remat, mesh, attention="auto",
                               attention_dropout=0.0, overrides=None):
  """(validated config, lowered step): the trainer's train step (on_mesh, the layout's traced
  step, jit as `train_step.sharded_steps` does) of configs/tiny.py in bf16 with attention=auto,
  then `overrides` (load_config keywords), lowered for CUDA on this CPU-only machine. Only the
  backend is faked: `resolve_attention` sees a GPU (models asks `jax.default_backend()`; JAX's
  own code asks xla_bridge, so the lowering still uses the CPU devices), and cuDNN's version
  check sees a cuDNN. Nothing compiles or runs."""
  import types  # pylint: disable=g-import-not-at-top
  from jax._src.cudnn import fused_attention_stablehlo as fused  # pylint: disable=all
  from slw_jax import compiled_steps, train_step  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fused, "cuda_versions",
                      types.SimpleNamespace(cudnn_get_version=lambda: 91000))
  monkeypatch.setattr(models.jax, "default_backend", lambda: "gpu")
  data, fsdp, tensor = mesh
  settings = dict(
      model__dtype="bfloat16", model__attention=attention, model__scan_layers=True,
      model__remat=remat, model__dropout=0.0, model__attention_dropout=attention_dropout,
      model__vocab_pad_multiple=8, optim__microbatches=2, mesh__data=data, mesh__fsdp=fsdp,
      mesh__tensor=tensor)
  c = config_lib.validate(load_config("tiny", **{**settings, **(overrides or {})}))
  assert c.model.d_model // c.model.n_head % 8 == 0  # A head dim cuDNN takes (32).
  placed = train_step.on_mesh(c, jax.devices()[:data * fsdp * tensor])
  layout = placed.layout
  step = jax.jit(layout.traced(train_step.make_train_step(
      c, placed.graphdef, placed.optimizer, skip_bad=False, microbatches=2)),
                 donate_argnums=0, out_shardings=(layout.state, layout.replicated))
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=layout.replicated)
  batch = compiled_steps.batch_spec(c.batch_size, 64, layout.batch)
  lowered = step.trace(placed.state_spec, batch, lr).lower(lowering_platforms=("cuda",))
  return c, lowered


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_train_step_attention_lowers_to_cudnn_on_one_device(monkeypatch, load_config, remat):
  """The whole train step (scanned, rematerialized, 2 microbatches) calls cuDNN's fused kernel
  forward and backward: a float32 leak into attention (XLA attention instead) fails here."""
  c, lowered = _lower_train_step_for_cuda(monkeypatch, load_config, remat, (1, 1, 1))
  text = lowered.as_text()
  forward_calls = text.count("custom_call @__cudnn$fmhaSoftmax(")
  backward_calls = text.count("custom_call @__cudnn$fmhaSoftmaxBackward(")
  # The scanned block appears once, not once per layer: its forward, the forward recomputed in
  # the backward scan (remat), its backward.
  assert 1 <= forward_calls <= 2 < c.model.n_layer and backward_calls == 1
  assert "CAUSAL" in text


def test_explicit_cudnn_with_attention_dropout_lowers_to_cudnn_dropout(monkeypatch,
                                                                       load_config):
  """model.attention=cudnn with model.attention_dropout > 0 (unrolled layers): cuDNN's fused
  kernel with its own dropout, forward and backward, in the whole train step, each layer with
  its own static seed (auto keeps XLA attention)."""
  c, lowered = _lower_train_step_for_cuda(monkeypatch, load_config, "block", (1, 1, 1),
                                          attention="cudnn", attention_dropout=0.1,
                                          overrides={"model__scan_layers": False})
  text = lowered.as_text()
  assert "custom_call @__cudnn$fmhaSoftmaxDropout(" in text
  assert "custom_call @__cudnn$fmhaSoftmaxDropoutBackward(" in text
  assert "custom_call @__cudnn$fmhaSoftmax(" not in text  # No dropout-free call slipped in.
  seeds = {int(x) for x in re.findall(r'\\22seed\\22: ?(\d+)', text)}
  assert seeds == set(range(c.model.n_layer)), seeds


def test_cudnn_attention_dropout_refuses_scanned_layers(load_config):
  with pytest.raises(errors.ConfigError, match=r"config.model.attention='cudnn' is invalid: "
                     r"cuDNN's attention dropout .* needs model.scan_layers=false"):
    config_lib.validate(load_config("tiny", model__attention="cudnn", model__dtype="bfloat16",
                                    model__attention_dropout=0.1, model__scan_layers=True))


@pytest.mark.parametrize("attention,attention_dropout,kernel", [
    ("auto", 0.0, "fmhaSoftmax"), ("cudnn", 0.1, "fmhaSoftmaxDropout")])
def test_qk_norm_train_step_still_lowers_to_cudnn(monkeypatch, load_config, attention,
                                                  attention_dropout, kernel):
  """model.qk_norm (with optim.z_loss): the normalized q and k stay bf16, so the train step
  still calls cuDNN's fused kernel forward and backward (a float32 q or k would make auto
  fall back to XLA attention, and an explicit cudnn refuse it)."""
  _, lowered = _lower_train_step_for_cuda(
      monkeypatch, load_config, "block", (1, 1, 1), attention, attention_dropout,
      overrides={"model__qk_norm": True, "optim__z_loss": 1e-4,
                 "model__scan_layers": attention_dropout == 0.0})
  text = lowered.as_text()
  assert f"custom_call @__cudnn${kernel}(" in text
  assert f"custom_call @__cudnn${kernel}Backward(" in text


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_sharded_train_step_attention_partitions_as_cudnn(monkeypatch, load_config, remat):
  """On the 2x2x2 (data, fsdp, tensor) mesh cuDNN's attention lowers to a custom-partitioning
  call (`CustomSPMDPartitioning`): the SPMD partitioner, at compile time on a GPU, asks JAX's
  callback for the per-device kernel. Each call's callback must be cuDNN's partitioner."""
  from jax._src import custom_partitioning  # pylint: disable=all
  from jax._src.cudnn import fused_attention_stablehlo as fused  # pylint: disable=all
  _, lowered = _lower_train_step_for_cuda(monkeypatch, load_config, remat, (2, 2, 2))
  text = lowered.as_text()  # `lowered` keeps the callbacks alive (weak values) while we look.
  keys = re.findall(r'custom_call @CustomSPMDPartitioning\(.*?backend_config = "(\d+)"', text)
  partitioners = {custom_partitioning._sharding_callbacks[k.encode()].partition for k in keys}
  assert partitioners == {fused._dot_product_attention_fwd_partition,
                          fused._dot_product_attention_bwd_partition}


def _dots(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for sub in jex_core.jaxprs_in_params(eqn.params):
      yield from _dots(sub)


def test_bfloat16_accumulates_scores_and_head_in_float32_and_stays_close():
  cfg = models.GPTConfig(vocab_size=259, n_layer=2, d_model=64, n_head=4, max_seqlen=64,
                         dtype="bfloat16")
  model = build(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, 259)
  graphdef, params = nnx.split(model, nnx.Param)
  apply = lambda p, t: nnx.merge(graphdef, p)(t)  # noqa: E731
  dots = list(_dots(jax.make_jaxpr(apply)(params, tokens).jaxpr))
  out_types = [eqn.outvars[0].aval.dtype for eqn in dots]
  head = dots[-1]  # The tied output head: [B, L, D] x [V, D].
  assert head.params["preferred_element_type"] == jnp.float32 and out_types[-1] == jnp.float32
  scores = [e for e in dots if e.outvars[0].aval.shape[-2:] == (48, 48)]
  assert scores and all(e.params["preferred_element_type"] == jnp.float32 for e in scores)
  full = nnx.merge(graphdef, params)
  reference = forward(build(dataclasses.replace(cfg, dtype="float32")), tokens)
  np.testing.assert_allclose(forward(full, tokens), reference, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("remat,dropout,qk_norm", [
    ("block", 0.0, False), ("dots", 0.0, False), ("block", 0.1, False), ("dots", 0.1, False),
    ("block", 0.1, True), ("dots", 0.0, True)])
@pytest.mark.slow
def test_remat_gives_the_same_gradients(remat, dropout, qk_norm):
  """Recomputation changes no value: with dropout on (residual and attention), the recomputed
  forward draws the same masks as the first one and as remat=none; with model.qk_norm too."""
  cfg = models.GPTConfig(vocab_size=259, n_layer=2, d_model=64, n_head=4, max_seqlen=32,
                         dropout=dropout, attention_dropout=dropout, qk_norm=qk_norm)
  tokens = jax.random.randint(jax.random.key(3), (2, 33), 0, 259)
  _, _, (loss, _), reference = loss_and_grads(cfg, tokens)
  graphdef, params, (loss_remat, _), ours = loss_and_grads(
      dataclasses.replace(cfg, remat=remat), tokens)
  assert float(loss_remat) == pytest.approx(float(loss), rel=1e-6)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  text = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens[:, :-1]))(params)
  marker = {"block": "custom_vjp_call", "dots": "remat"}[remat]
  assert str(text).count(marker) >= cfg.n_layer  # One rematerialized call per block.


def optax_ce(logits, targets):
  import optax  # pylint: disable=g-import-not-at-top
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def loss_and_grads(cfg, tokens):
  """(graphdef, params, (mean loss, logits), gradients) of a fresh model on `tokens`, dropout
  (if any) drawn from a fixed key."""
  graphdef, params = nnx.split(build(cfg), nnx.Param)

  def loss(p):
    deterministic = cfg.dropout == 0.0 and cfg.attention_dropout == 0.0
    logits = nnx.merge(graphdef, p)(tokens[:, :-1], deterministic=deterministic,
                                     rngs=nnx.Rngs(dropout=5))
    return optax_ce(logits, tokens[:, 1:]), logits

  return graphdef, params, *jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("remat,dropout,qk_norm", [
    ("none", 0.0, False), ("block", 0.1, False), ("dots", 0.0, False), ("none", 0.0, True)])
@pytest.mark.slow
def test_scanned_layers_equal_the_unrolled_model(remat, dropout, qk_norm):
  """model.scan_layers: the same initial parameters (stacked), logits and gradients within
  relative 1e-5 of the unrolled model, dropout masks included, and one scanned block; with
  model.qk_norm too (its parameters stacked like the others)."""
  cfg = models.GPTConfig(vocab_size=259, n_layer=3, d_model=64, n_head=4, max_seqlen=32,
                         dropout=dropout, remat=remat, qk_norm=qk_norm)
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  tokens = jax.random.randint(jax.random.key(3), (2, 33), 0, 259)
  _, unrolled, (loss, logits), grads = loss_and_grads(cfg, tokens)
  _, stacked, (loss_s, logits_s), grads_s = loss_and_grads(scanned_cfg, tokens)
  assert jax.tree.leaves(stacked)[0].shape[0] == 3
  for a, b in zip(jax.tree.leaves(models.restack_blocks(unrolled, stacked, 3)),
                  jax.tree.leaves(stacked)):
    np.testing.assert_array_equal(a, b)  # The same initialization, stacked.
  assert float(jnp.abs(logits_s - logits).max() / jnp.abs(logits).max()) < 1e-5
  assert float(loss_s) == pytest.approx(float(loss), rel=1e-5)
  for a, b in zip(jax.tree.leaves(models.restack_blocks(grads_s, grads, 3)),
                  jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  graphdef, params = nnx.split(build(scanned_cfg), nnx.Param)
  text = str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens[:, :-1]))(params))
  assert text.count("scan[") == 1 and "length=3" in text  # One block, applied 3 times.


def test_stacked_parameters_lead_with_an_unsharded_layers_axis():
  cfg = models.GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, max_seqlen=16,
                         scan_layers=True)
  abstract = nnx.eval_shape(lambda: models.GPT(cfg, nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
  assert tuple(specs["blocks"]["attn"]["qkv_weight_dchk"].get_value()) == (
      "layers", "embed", None, "heads", "kv")
  assert tuple(specs["wte_vd"].get_value()) == ("vocab", "embed")  # Only the blocks are stacked.
  from slw_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  rules = config_lib.base_config().mesh.rules
  shardings, _ = sharding.param_shardings(nnx.state(abstract, nnx.Param), rules, mesh)
  assert tuple(shardings["blocks"]["attn"]["qkv_weight_dchk"].get_value().spec) == (
      None, "fsdp", None, "tensor", None)
