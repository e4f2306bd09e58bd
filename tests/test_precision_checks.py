"""The attention kernels against a float64 reference, at tolerances tight enough to see a bug:
the CPU kernels (blockwise, XLA's dot_product, with or without the dropout path) in float32 and
bfloat16, and the TPU splash kernel (Pallas interpret mode) over 1, 2 and 3 of its blocks, in
both dtypes, alone and sharded. Leaving the scores unscaled by 1/sqrt(head_dim) moves almost
every output by hundreds of these tolerances; the bf16 model test's 0.05 does not see it."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharded import on_pinned_heads
from slw_jax import attention

# |ours - float64| <= tol * (1 + |float64|), elementwise. float32: rounding is ~1e-7 of the
# values. bfloat16: the inputs are rounded to bfloat16 before the reference sees them, and the
# kernels round the scaled q, the probabilities and the output to bfloat16 (8 significant bits:
# half an ulp each, 2^-9), so one bfloat16 epsilon (2^-7) bounds their sum; measured: at most
# 0.6 of it, while unscaled scores exceed it 250-fold.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2.0**-7}


def float64_attention(q_blhk, k_blhk, v_blhk) -> np.ndarray:
  """Causal softmax(q k^T / sqrt(K)) v in float64 numpy: the textbook formula."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_blhk, k_blhk, v_blhk))
  seqlen, head_dim = q.shape[1], q.shape[3]
  scores = np.einsum("blhk,bshk->bhls", q, k) / math.sqrt(head_dim)
  scores = np.where(np.tril(np.ones((seqlen, seqlen), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  return np.einsum("bhls,bshk->blhk", probs, v)


def _qkv(shape, dtype, seed=0):
  return [jax.random.normal(jax.random.key(seed + i), shape).astype(dtype) for i in range(3)]


def _assert_close_to_float64(out, q, k, v, dtype):
  expected = float64_attention(q, k, v)
  out = np.asarray(out, np.float64)
  tol = TOLERANCE[dtype]
  excess = np.abs(out - expected) / (tol * (1 + np.abs(expected)))
  assert out.shape == expected.shape and excess.max() <= 1.0, (
      f"{dtype}: off the float64 reference by up to {excess.max():.1f} x the tolerance "
      f"{tol:.2g} (at {(excess > 1).mean():.0%} of the outputs)")


def _no_rate_dropout(seqlen):
  """An AttentionDropout that drops nothing: the dropout path of `attend` (one query block of
  XLA attention for dot_product), with values that must equal the plain kernel's."""
  return attention.AttentionDropout(jnp.zeros(2, jnp.uint32), 0.0, seqlen)


CPU_KERNELS = {  # (q, k, v) -> out, as the model calls them on a CPU.
    "auto (blockwise, 4 query blocks)": lambda q, k, v: attention.attend(q, k, v, "auto", 16),
    "blockwise, 3 uneven query blocks": lambda q, k, v: attention.blockwise_causal_attention(
        q, k, v, 24),
    "dot_product": lambda q, k, v: attention.attend(q, k, v, "dot_product", 16),
    "dot_product, dropout path": lambda q, k, v: attention.attend(
        q, k, v, "dot_product", 16, _no_rate_dropout(q.shape[1])),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [16, 32])  # A scale of 1/4 (exact in bf16), and not.
@pytest.mark.parametrize("kernel", list(CPU_KERNELS))
def test_cpu_kernels_equal_float64_attention(kernel, head_dim, dtype):
  q, k, v = _qkv((2, 64, 2, head_dim), dtype)
  out = jax.jit(CPU_KERNELS[kernel])(q, k, v)
  assert out.dtype == jnp.dtype(dtype)
  _assert_close_to_float64(out, q, k, v, dtype)


def _splash(q, k, v):
  return attention.splash_causal_attention(q, k, v, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seqlen", [128, 256, 384])  # 1, 2 and 3 blocks of SPLASH_BLOCK.
def test_splash_equals_float64_attention_over_several_blocks(seqlen, dtype):
  """Past one block, the kernel's online softmax carries its running max and sum across key
  blocks, and the causal mask skips the blocks above the diagonal: a bug in either leaves one
  block right."""
  assert seqlen % attention.SPLASH_BLOCK == 0
  q, k, v = _qkv((2, seqlen, 2, 16), dtype, seed=seqlen)
  _assert_close_to_float64(jax.jit(_splash)(q, k, v), q, k, v, dtype)


@pytest.mark.slow
def test_splash_sharded_over_three_blocks_in_bfloat16():
  """Inside shard_map over (data=4, tensor=2), the layout the trainer pins: each device's
  rows and heads, over 3 blocks."""
  q, k, v = _qkv((4, 384, 2, 16), "bfloat16", seed=7)
  _assert_close_to_float64(on_pinned_heads(_splash, q, k, v), q, k, v, "bfloat16")


@pytest.mark.slow
def test_splash_gradients_over_two_blocks_equal_xla_attention():
  """The backward kernels (dq, dkv) over 2 blocks, against autodiff of XLA's attention."""
  q, k, v = _qkv((2, 256, 2, 16), "float32", seed=3)
  reference = functools.partial(jax.nn.dot_product_attention, is_causal=True)
  grads = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)  # noqa
  for ours, theirs in zip(grads(jax.jit(_splash)), grads(reference)):
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
