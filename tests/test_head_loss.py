"""The fused head (model.loss_head=fused): bf16 matmuls in its backward pass, no whole float32
[tokens, vocab] tensor, and the full head's numerics (values and gradients: test_train_step)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slw_jax import config_lib, head_loss, train_step

VOCAB = 16384  # Large against the model width, so the [T, V] tensors dominate memory.


def _loss_and_grads(load_config, head: str, dtype: str, chunk_tokens: int = 128):
  c = config_lib.validate(load_config(
      "tiny", model__loss_head=head, model__dtype=dtype, model__loss_chunk_tokens=chunk_tokens,
      model__vocab_size=VOCAB, model__max_seqlen=128, model__dropout=0.0, mesh__data=1,
      model__n_layer=1, model__d_model=32, model__n_head=2))
  graphdef, params = train_step.build_model(c)
  batch = {"inputs": jax.ShapeDtypeStruct((16, 128), jnp.int32),
           "targets": jax.ShapeDtypeStruct((16, 128), jnp.int32)}
  fn = jax.jit(train_step.make_loss_and_grads(c, graphdef, 1))
  return fn.trace(params, batch, jnp.int32(0)), 16 * 128


def _head_dots(stablehlo: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot_general with an operand of VOCAB rows/columns."""
  found = []
  for line in stablehlo.splitlines():
    if "dot_general" not in line:
      continue
    operands = re.search(r":\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)", line)
    if operands and any(f"{VOCAB}x" in t or f"x{VOCAB}x" in t for t in operands.groups()):
      found.append(tuple(t.rsplit("x", 1)[-1].rstrip(">") for t in operands.groups()))
  return found


@pytest.mark.parametrize("head,expect_f32", [("fused", False), ("full", True)])
def test_head_backward_dots_take_bf16_operands_when_lowered_for_cuda(load_config, head,
                                                                     expect_f32):
  """Lowered for CUDA on this CPU: every matmul of the fused head (forward and both gradient
  matmuls) multiplies bf16 by bf16; the full head's backward multiplies float32 by float32
  (TF32 on a GPU), which is what the fused head removes."""
  traced, _ = _loss_and_grads(load_config, head, "bfloat16")
  dots = _head_dots(traced.lower(lowering_platforms=("cuda",)).as_text())
  # The forward matmul and its two gradient matmuls; the fused head runs each exactly once.
  assert len(dots) == 3 if not expect_f32 else len(dots) >= 3, dots
  f32 = [d for d in dots if d == ("f32", "f32")]
  assert bool(f32) == expect_f32, dots
  if not expect_f32:
    assert all(d == ("bf16", "bf16") for d in dots), dots


@pytest.mark.slow
def test_fused_head_never_holds_a_whole_float32_logits_tensor(load_config):
  """CPU memory analysis of the loss and gradients: the full head's temporaries exceed one
  float32 [tokens, vocab] tensor, the fused head's stay below half of it (its chunks hold
  128 tokens of the 2048)."""
  whole_logits = None
  temps = {}
  for head in ("fused", "full"):
    traced, tokens = _loss_and_grads(load_config, head, "float32")
    stats = traced.lower().compile().memory_analysis()
    temps[head] = stats.temp_size_in_bytes
    whole_logits = tokens * VOCAB * 4
  assert temps["full"] > whole_logits, temps
  assert temps["fused"] < whole_logits / 2, (temps, whole_logits)


@pytest.mark.parametrize("batch,seqlen,chunk_tokens,expected", [
    (4, 128, 8192, 128), (64, 1024, 8192, 128), (512, 128, 8192, 16), (3, 7, 10, 1),
    (2, 24, 0, 24), (100, 8, 50, 1)])
def test_chunks_are_whole_rows_of_divisors_of_the_length(batch, seqlen, chunk_tokens, expected):
  assert head_loss.chunk_positions(batch, seqlen, chunk_tokens) == expected


def test_bf16_fused_head_stays_close_to_the_float32_head():
  """In bf16 the fused head's gradients differ from float32's only by bf16 rounding."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 64, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(264, 32)) * 0.1, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 259, (2, 64)), jnp.int32)
  real = jnp.ones((2, 64), bool).at[1, 40:].set(False)

  def loss(x, w, dtype):
    return head_loss.fused_loss_sum(x.astype(dtype), w, targets, real, vocab_size=259,
                                    compute_dtype=dtype, chunk_tokens=32)

  exact = jax.value_and_grad(loss, (0, 1))(x, w, jnp.float32)
  half = jax.value_and_grad(loss, (0, 1))(x, w, jnp.bfloat16)
  assert float(half[0]) == pytest.approx(float(exact[0]), rel=1e-2)
  for a, b in zip(half[1], exact[1]):
    assert a.dtype == b.dtype or a.dtype == jnp.bfloat16
    assert np.linalg.norm(np.asarray(a, np.float32) - b) <= 5e-3 * np.linalg.norm(b)
  assert half[1][1].dtype == jnp.float32  # The table's gradient stays float32.


def test_padded_positions_and_vocabulary_rows_get_no_gradient():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 10, (2, 8)), jnp.int32)
  real = jnp.ones((2, 8), bool).at[0, 3:].set(False)
  grad_x, grad_w = jax.grad(
      lambda x, w: head_loss.fused_loss_sum(x, w, targets, real, vocab_size=10,
                                            compute_dtype=jnp.float32, chunk_tokens=4),
      (0, 1))(x, w)
  assert np.all(np.asarray(grad_x)[0, 3:] == 0) and np.any(np.asarray(grad_x)[0, :3] != 0)
  assert np.all(np.asarray(grad_w)[10:] == 0) and np.any(np.asarray(grad_w)[:10] != 0)
