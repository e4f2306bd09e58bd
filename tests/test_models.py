"""GPT model: published parameter counts, causality, bucket lengths, dtypes, axis names, init."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slw_jax import config_lib, models

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
def test_published_parameter_counts(load_config, name):
  assert models.num_params(_model_cfg(load_config, name)) == PUBLISHED[name]


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
def test_blockwise_attention_equals_dot_product_attention(seqlen, block):
  q, k, v = (jax.random.normal(jax.random.key(i), (2, seqlen, 3, 16)) for i in range(3))
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa
  blockwise = lambda q, k, v: models.blockwise_causal_attention(q, k, v, block)  # noqa
  np.testing.assert_allclose(blockwise(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
  grads = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)  # noqa
  for ours, theirs in zip(grads(blockwise), grads(reference)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_model_attention_kinds_agree():
  cfg = models.GPTConfig(vocab_size=259, n_layer=2, d_model=64, n_head=4, max_seqlen=64,
                         attention="dot_product")
  assert dataclasses.replace(cfg, attention="auto").attention_kind() == "blockwise"
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, 259)
  reference = forward(build(cfg), tokens)
  for block in (16, 128):
    blockwise = dataclasses.replace(cfg, attention="blockwise", attention_block=block)
    np.testing.assert_allclose(forward(build(blockwise), tokens), reference, rtol=1e-5,
                               atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  cfg = models.GPTConfig(vocab_size=259, n_layer=2, d_model=64, n_head=4, max_seqlen=32,
                         dtype="bfloat16")
  model = build(cfg)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  logits = forward(model, jnp.ones((2, 16), jnp.int32))
  assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))


def test_every_parameter_has_logical_axis_names(tiny_model):
  specs = nnx.get_partition_spec(nnx.state(tiny_model, nnx.Param))
  params = nnx.state(tiny_model, nnx.Param)
  for spec, value in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.P)),
                         jax.tree.leaves(params)):
    assert len(spec) == value.ndim
    assert any(axis is not None for axis in spec)


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


def test_dropout_is_off_when_deterministic():
  cfg = models.GPTConfig(vocab_size=259, n_layer=1, d_model=32, n_head=2, max_seqlen=16,
                         dropout=0.5)
  model = build(cfg)
  tokens = jnp.ones((2, 16), jnp.int32)
  np.testing.assert_array_equal(forward(model, tokens), forward(model, tokens))
  assert not np.allclose(forward(model, tokens, deterministic=False), forward(model, tokens))


def test_train_flops_per_token(load_config):
  cfg = _model_cfg(load_config, "gpt2_117m")
  flops = models.train_flops_per_token(cfg, 1024, PUBLISHED["gpt2_117m"])
  expected = 6 * (PUBLISHED["gpt2_117m"] - 1024 * 768) + 12 * 12 * 768 * 1024
  assert flops == expected
