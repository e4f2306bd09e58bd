"""The output head and the cross-entropy fused, by token chunks (`model.loss_head=fused`).

The tied head turns features [B, L, D] into logits [B, L, V]; at GPT-2's V = 50,304 a batch of
64K tokens has 13 GB of float32 logits, and autodiff keeps two or three tensors of that size
alive at the start of the backward pass (logits, softmax, their gradient), which is what
pushed the GPT-2 117M step to the memory limit (../shared/docs/GPU-PERFORMANCE.md, suspect 3).
Autodiff also differentiates the float32-output matmul as float32 x float32 dots (TF32 on a
GPU; suspect 2).

Here the head and the loss run over chunks of `model.loss_chunk_tokens` tokens of each device
(whole rows of the batch, some positions: the batch stays sharded as it is), and the gradients are formed in
the same pass as the loss (Liger's fused linear cross-entropy): per chunk, logits in float32
(the matmul accumulates in float32), their log-sum-exp and the target's logit, then the
gradient of the chunk's loss sum with respect to the logits (softmax minus one-hot, float32),
cast to the compute dtype for the two gradient matmuls (bf16 x bf16 on accelerators, float32
accumulation). Only [chunk, V] tensors ever exist, and the head's matmuls are done once each:
no recomputation. The backward pass only scales the stored gradients by the incoming
cotangent. Without differentiation (evaluation) only the loss is computed, chunk by chunk.
With PaLM's z-loss (`optim.z_loss` > 0: `fused_losses`) each chunk also sums its log(Z)^2, and
the z-loss's gradient joins the logits' gradient in the same pass.

Numerics against the full head: the same loss up to float rounding; gradients the same up to
float rounding in float32, and to bf16 rounding of the logits' gradient in bf16 (the full head
rounds its weight gradient to bf16 instead). The weight gradient is accumulated across chunks
in float32.

Cost on a mesh: each chunk's weight gradient is summed over the batch's shards (XLA:CPU's
program reduces it inside the loop), so a data-parallel run may reduce a [V, D] float32
gradient once per chunk instead of once per step (8 chunks at 64K tokens per device with the
default 8192) unless XLA moves the reduction out of the loop; not measured on a GPU yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from slw_jax import pinned

PADDED_LOGIT = -1e30  # Logit of a padded vocabulary row: exp() of it is exactly 0.


def chunk_positions(batch: int, seqlen: int, chunk_tokens: int) -> int:
  """Positions per chunk: the largest divisor of `seqlen` whose chunk of `batch` whole rows
  holds at most `chunk_tokens` tokens (at least one position; 0 = all of them)."""
  if chunk_tokens <= 0:
    return seqlen
  fits = [d for d in range(1, seqlen + 1) if seqlen % d == 0 and batch * d <= chunk_tokens]
  return max(fits, default=1)


def _to_chunks(x_bl, positions: int):
  """[B, L, ...] -> [L / positions, B, positions, ...] (the batch axis stays where it was
  sharded)."""
  batch, seqlen = x_bl.shape[:2]
  chunked = x_bl.reshape(batch, seqlen // positions, positions, *x_bl.shape[2:])
  return jnp.moveaxis(chunked, 1, 0)


def _from_chunks(x_nbc, batch: int, seqlen: int):
  """Inverse of `_to_chunks`: [n, B, positions, ...] -> [B, L, ...]."""
  return jnp.moveaxis(x_nbc, 0, 1).reshape(batch, seqlen, *x_nbc.shape[3:])


def _chunk_logits(x_bcd, w_vd, vocab_size: int):
  """Float32 logits [B, c, V] of a chunk; padded vocabulary rows at PADDED_LOGIT."""
  logits_bcv = jnp.einsum("bcd,vd->bcv", x_bcd, w_vd, preferred_element_type=jnp.float32)
  if w_vd.shape[0] == vocab_size:
    return logits_bcv
  real_v = np.arange(w_vd.shape[0]) < vocab_size
  return jnp.where(real_v, logits_bcv, jnp.float32(PADDED_LOGIT))


def _chunk_loss(logits_bcv, targets_bc, real_bc):
  """(loss sum, log-sum-exp [B, c]) of a chunk; masked positions add nothing."""
  lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
  target_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(real_bc, lse_bc - target_bc, 0.0)), lse_bc


def _chunk_sums(logits_bcv, targets_bc, real_bc, z_loss: float):
  """(sums, log-sum-exp [B, c]) of a chunk: sums is (loss sum,), or with `z_loss` > 0
  (loss sum, z_loss * the sum of lse^2 over real positions)."""
  loss, lse_bc = _chunk_loss(logits_bcv, targets_bc, real_bc)
  if not z_loss:
    return (loss,), lse_bc
  return (loss, z_loss * jnp.sum(jnp.where(real_bc, lse_bc * lse_bc, 0.0))), lse_bc


def _chunk_loss_and_grads(x_bcd, w_vd, targets_bc, real_bc, vocab_size: int, z_loss: float):
  """(sums as `_chunk_sums`, d objective / d x [B, c, D] float32, d objective / d w [V, D]
  float32) of a chunk; the objective is the sum of `sums`."""
  logits_bcv = _chunk_logits(x_bcd, w_vd, vocab_size)
  sums, lse_bc = _chunk_sums(logits_bcv, targets_bc, real_bc, z_loss)
  onehot_bcv = jnp.arange(w_vd.shape[0], dtype=targets_bc.dtype) == targets_bc[..., None]
  softmax_bcv = jnp.exp(logits_bcv - lse_bc[..., None])
  if z_loss:  # d (z_loss * lse^2) / d logits = 2 z_loss lse softmax.
    softmax_bcv = softmax_bcv * (1.0 + 2.0 * z_loss * lse_bc)[..., None]
  dlogits_bcv = softmax_bcv - onehot_bcv
  # Cast before the matmuls: bf16 x bf16 dots with float32 accumulation (never TF32).
  dlogits_bcv = jnp.where(real_bc[..., None], dlogits_bcv, 0.0).astype(x_bcd.dtype)
  dx_bcd = jnp.einsum("bcv,vd->bcd", dlogits_bcv, w_vd, preferred_element_type=jnp.float32)
  dw_vd = jnp.einsum("bcv,bcd->vd", dlogits_bcv, x_bcd, preferred_element_type=jnp.float32)
  return sums, dx_bcd, dw_vd


def _scan_chunks(x_bld, w_vd, targets_bl, real_bl, chunk_tokens: int, vocab_size: int,
                 with_grads: bool, z_loss: float = 0.0):
  """Sums as `_chunk_sums`, over the chunks (and, `with_grads`, dx [B, L, D] and dw [V, D],
  float32, of their total)."""
  batch, seqlen = targets_bl.shape
  # Chunks hold `chunk_tokens` of each device's tokens: under a batch-sharded mesh each device
  # computes its own rows of every chunk.
  positions = chunk_positions(pinned.rows_per_device(batch, seqlen), seqlen, chunk_tokens)
  xs = tuple(_to_chunks(a, positions) for a in (x_bld, targets_bl, real_bl))
  safe = lambda t, r: jnp.where(r, t, 0)  # A padded target's id must index something.  # noqa
  add = lambda a, b: tuple(x + y for x, y in zip(a, b))  # noqa: E731
  zero_sums = (jnp.float32(0),) * (2 if z_loss else 1)

  if not with_grads:
    def add_loss(totals, chunk):
      x_bcd, t_bc, r_bc = chunk
      sums, _ = _chunk_sums(_chunk_logits(x_bcd, w_vd, vocab_size), safe(t_bc, r_bc), r_bc,
                            z_loss)
      return add(totals, sums), None
    totals, _ = jax.lax.scan(add_loss, zero_sums, xs)
    return totals

  def add_chunk(carry, chunk):
    totals, dw_vd = carry
    x_bcd, t_bc, r_bc = chunk
    sums, dx_bcd, dw_chunk = _chunk_loss_and_grads(x_bcd, w_vd, safe(t_bc, r_bc), r_bc,
                                                   vocab_size, z_loss)
    return (add(totals, sums), dw_vd + dw_chunk), dx_bcd

  zeros = jnp.zeros(w_vd.shape, jnp.float32)
  (totals, dw_vd), dx_nbcd = jax.lax.scan(add_chunk, (zero_sums, zeros), xs)
  return totals, _from_chunks(dx_nbcd, batch, seqlen), dw_vd


def _with_objective(totals):
  """(loss,) as it is; (loss, z) as (loss + z, loss, z): the objective first."""
  return totals if len(totals) == 1 else (totals[0] + totals[1], *totals)


def _fused_sums(x_bld, wte_vd, targets_bl, real_bl, vocab_size: int, compute_dtype,
                chunk_tokens: int, z_loss: float):
  """(loss sum,), or with `z_loss` > 0 (objective, loss sum, z sum). Differentiable in
  `x_bld` and `wte_vd` through the first only: the backward pass scales the stored gradients
  of the objective by its cotangent and ignores the others' (callers stop their gradients)."""
  x_dtype = x_bld.dtype

  @jax.custom_vjp
  def sums(x_bld, wte_vd, targets_bl, real_bl):
    w_vd = wte_vd.astype(compute_dtype)
    return _with_objective(_scan_chunks(x_bld, w_vd, targets_bl, real_bl, chunk_tokens,
                                        vocab_size, False, z_loss))

  def forward(x_bld, wte_vd, targets_bl, real_bl):
    w_vd = wte_vd.astype(compute_dtype)
    totals, dx_bld, dw_vd = _scan_chunks(x_bld, w_vd, targets_bl, real_bl, chunk_tokens,
                                         vocab_size, True, z_loss)
    return _with_objective(totals), (dx_bld, dw_vd)

  def backward(saved, g):  # The targets and the mask have no gradient.
    dx_bld, dw_vd = saved
    return (dx_bld * g[0]).astype(x_dtype), dw_vd * g[0], None, None

  sums.defvjp(forward, backward)
  return sums(x_bld, wte_vd, targets_bl, real_bl)


def fused_loss_sum(x_bld, wte_vd, targets_bl, real_bl, *, vocab_size: int, compute_dtype,
                   chunk_tokens: int):
  """Sum over real positions of the token losses of features [B, L, D] under the tied head
  `wte_vd` (the float32 table, cast to `compute_dtype` for the matmuls; its gradient comes
  back float32). `real_bl`: positions that count; `targets_bl` may hold anything elsewhere.
  Differentiable in `x_bld` and `wte_vd`."""
  (total,) = _fused_sums(x_bld, wte_vd, targets_bl, real_bl, vocab_size, compute_dtype,
                         chunk_tokens, 0.0)
  return total


def fused_losses(x_bld, wte_vd, targets_bl, real_bl, *, vocab_size: int, compute_dtype,
                 chunk_tokens: int, z_loss: float):
  """(objective, loss sum, z sum) of `fused_loss_sum`'s inputs with PaLM's z-loss
  (`optim.z_loss` > 0). The z sum is `z_loss` times the sum over real positions of
  log(Z)^2, Z the softmax normalizer over the real vocabulary; the objective is loss sum +
  z sum, and only it is differentiable: its gradient per logit, softmax * (1 + 2 z_loss
  log Z) - onehot, is formed in the same pass as the loss. The two sums are values only."""
  objective, loss, z = _fused_sums(x_bld, wte_vd, targets_bl, real_bl, vocab_size,
                                   compute_dtype, chunk_tokens, z_loss)
  return objective, jax.lax.stop_gradient(loss), jax.lax.stop_gradient(z)
