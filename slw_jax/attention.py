"""Causal self-attention kernels and their dispatch (`model.attention`).

`resolve_attention` turns `model.attention` (auto, cudnn, splash, blockwise, xla) into the
kernel this backend and dtype run, or raises AttentionError before anything compiles;
`bucket_attention` picks per sequence length (splash needs whole blocks); `attend` calls it.
The kernels: cuDNN's fused attention on GPUs (with its own dropout), Pallas splash attention on
TPUs, blockwise einsums on CPUs (exact causal softmax per query block), XLA's otherwise.
Attention dropout (`AttentionDropout`) draws its masks from hashed (row, position) keys, so a
padded bucket keeps the real positions' masks. Inputs and outputs are [B, L, H, K].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from slw_jax import errors, pinned


HALF_DTYPES = ("bfloat16",)  # What cuDNN's fused kernel takes of config_lib.DTYPES.


class AttentionError(errors.ConfigError):
  """An attention kind this backend or dtype cannot run (raised before anything compiles)."""


def resolve_attention(attention: str, dtype: str, backend: str | None = None,
                      attention_dropout: float = 0.0) -> tuple[str, str]:
  """(kernel, why) for `model.attention` on `backend` (default: JAX's default backend).

  auto: cuDNN's fused kernel on a GPU computing in bf16/fp16 (cuDNN has no float32 flash
  attention: float32 falls back to XLA, said in `why`), the Pallas splash kernel on a TPU,
  blockwise einsums on a CPU, XLA's attention elsewhere. With `attention_dropout` > 0 the
  fused kernels are out (they do not expose the probabilities to drop): auto picks XLA-compiled
  attention that forms them (`dot_product`, one query block), blockwise on a CPU. An explicit
  kernel the backend (or the dropout) rules out raises AttentionError naming the value and what
  is allowed. An explicit `cudnn` with dropout runs cuDNN's fused kernel with its own dropout
  (`cudnn_attention_with_dropout`).
  """
  backend = backend or jax.default_backend()
  if attention_dropout > 0 and attention == "splash":
    raise AttentionError(
        f"config.model.attention='splash' is invalid with model.attention_dropout="
        f"{attention_dropout}: the splash kernel applies no dropout to the attention "
        "probabilities; use auto, dot_product or blockwise, or model.attention_dropout=0.0")
  if attention_dropout > 0 and attention == "auto" and backend != "cpu":
    return "dot_product", (f"auto: model.attention_dropout={attention_dropout} needs the "
                           "attention probabilities, which the fused kernels do not expose")
  if attention == "cudnn" and (backend != "gpu" or dtype not in HALF_DTYPES):
    raise AttentionError(
        f"config.model.attention='cudnn' is invalid here: cuDNN fused attention needs a GPU and "
        f"model.dtype=bfloat16 (backend {backend!r}, dtype {dtype!r}); use auto, dot_product "
        "or blockwise")
  if attention == "splash" and backend != "tpu":
    raise AttentionError(f"config.model.attention='splash' is invalid here: the Pallas splash "
                         f"kernel needs a TPU (backend {backend!r}); use auto, dot_product or "
                         "blockwise")
  if attention == "cudnn" and attention_dropout > 0:
    return "cudnn", ("set by model.attention, with cuDNN's own attention dropout: masks from "
                     "XLA's per-call RNG, not position-keyed (attention.CUDNN_DROPOUT_CAVEAT)")
  if attention != "auto":
    return attention, "set by model.attention"
  if backend == "gpu":
    if dtype in HALF_DTYPES:
      return "cudnn", f"auto: GPU computing in {dtype}"
    return "dot_product", ("auto: GPU computing in float32 falls back to XLA attention (cuDNN "
                           "fused attention needs model.dtype=bfloat16)")
  if backend == "tpu":
    return "splash", "auto: TPU"
  if backend == "cpu":
    return "blockwise", "auto: CPU (2-4x faster than XLA attention there)"
  return "dot_product", f"auto: backend {backend!r} has no fused kernel here"


def bucket_attention(attention: str, dtype: str, seqlen: int, head_dim: int,
                     backend: str | None = None,
                     attention_dropout: float = 0.0) -> tuple[str, str]:
  """The kernel a bucket of length `seqlen` runs, and why: the resolved kernel, unless its shape
  limits rule this bucket out, in which case XLA's attention (the reason says so)."""
  kernel, why = resolve_attention(attention, dtype, backend, attention_dropout)
  if kernel == "cudnn" and (head_dim % 8 or head_dim > 128):
    return "dot_product", f"cuDNN needs a head dim that is a multiple of 8 up to 128, not " \
        f"{head_dim}"
  if kernel == "splash" and seqlen % SPLASH_BLOCK:
    return "dot_product", f"splash needs a length that is a multiple of {SPLASH_BLOCK}"
  return kernel, why


def attention_lines(cfg, seqlens) -> list[str]:
  """Log lines: the kernel the config resolves to here, and the buckets that fall back."""
  kernel, why = resolve_attention(cfg.attention, cfg.dtype,
                                  attention_dropout=cfg.attention_dropout)
  lines, fallbacks = [f"attention: {kernel} ({why})"], {}
  for seqlen in seqlens:
    used = bucket_attention(cfg.attention, cfg.dtype, seqlen, cfg.head_dim,
                            attention_dropout=cfg.attention_dropout)
    if used[0] != kernel:
      fallbacks.setdefault(used, []).append(seqlen)
  for (used, reason), lengths in fallbacks.items():
    shown = ", ".join(map(str, lengths[:8])) + (", ..." if len(lengths) > 8 else "")
    lines.append(f"attention fallback: {len(lengths)} bucket(s) (seqlen {shown}) use {used}: "
                 f"{reason}")
  return lines


def attend(q_blhk, k_blhk, v_blhk, attention: str, block: int, dropout=None):
  """Causal self-attention [B, L, H, K] -> [B, L, H, K] by the kernel `bucket_attention` picks.

  Every kernel computes the scores and their softmax in float32. `dropout`: an
  `AttentionDropout` for the probabilities (training with model.attention_dropout > 0), or None.
  """
  seqlen, head_dim = q_blhk.shape[1], q_blhk.shape[3]
  rate = 0.0 if dropout is None else dropout.rate
  kernel, _ = bucket_attention(attention, str(q_blhk.dtype), seqlen, head_dim,
                               attention_dropout=rate)
  if kernel == "blockwise":
    return blockwise_causal_attention(q_blhk, k_blhk, v_blhk, block, dropout)
  if kernel == "cudnn" and dropout is not None:
    return cudnn_attention_with_dropout(q_blhk, k_blhk, v_blhk, dropout.rate, dropout.layer)
  if dropout is not None:  # dot_product with dropout: XLA's attention as one query block.
    return blockwise_causal_attention(q_blhk, k_blhk, v_blhk, seqlen, dropout)
  if kernel == "splash":
    return splash_causal_attention(q_blhk, k_blhk, v_blhk)
  implementation = "cudnn" if kernel == "cudnn" else "xla"
  return jax.nn.dot_product_attention(q_blhk, k_blhk, v_blhk, is_causal=True,
                                      implementation=implementation)


# What model.attention=cudnn with model.attention_dropout > 0 gives up against the hashed
# masks of every other kernel. Not verified on a device yet (benchmarks/gpu_ab.py, variant Rc).
CUDNN_DROPOUT_CAVEAT = (
    "cuDNN draws the masks from a seed fixed at compile time and an offset XLA's runtime "
    "advances per call, so they are not a function of (row, head, query, key): a padded bucket "
    "drops other probabilities than its real length, a resumed run other ones than an "
    "uninterrupted run, and every device of a data-parallel mesh may draw the same masks")


def cudnn_attention_with_dropout(q_blhk, k_blhk, v_blhk, rate: float, seed: int = 0):
  """Causal attention by cuDNN's fused kernel with its own dropout on the probabilities
  (JAX's private cuDNN API, which MaxText uses too; `jax.nn.dot_product_attention` has no
  dropout). See CUDNN_DROPOUT_CAVEAT."""
  # pylint: disable-next=g-import-not-at-top
  from jax._src.cudnn import fused_attention_stablehlo as fused
  scale = 1.0 / math.sqrt(q_blhk.shape[-1])
  return fused.dot_product_attention(q_blhk, k_blhk, v_blhk, scale=scale,
                                     mask_type=fused.MaskType.CAUSAL, dropout_rate=rate,
                                     seed=seed,
                                     qkv_layout="BTNH")


def _mix32(x):
  """MurmurHash3's 32-bit finalizer: every input bit flips each output bit with probability
  about 1/2 (uint32 arithmetic wraps)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_keep(seed, row, position, rate: float):
  """Dropout keep mask (True with probability 1 - rate) from a counter hash of uint32 `row`
  and `position` ids (broadcast against each other) and a uint32 [2] `seed`: a pure function
  of the ids, so a mask never depends on the shape it is drawn in."""
  row_bits = _mix32(row * jnp.uint32(0x9E3779B9) + seed[0])
  bits = _mix32(_mix32(row_bits ^ position) + seed[1])
  threshold = np.uint32(min(round(rate * 2.0**32), 2**32 - 1))
  return bits >= threshold


@dataclasses.dataclass(frozen=True)
class AttentionDropout:
  """Dropout on attention probabilities whose mask at (b, h, query q, key s) is a hash of those
  indices and a per-step, per-layer seed: it does not depend on the sequence length, the query
  block or the padding, so a padded bucket drops exactly what the real length drops (the
  residual dropout's `PositionKeyedDropout` gives the same guarantee another way)."""
  seed: jax.Array  # uint32 [2], from the layer's dropout key.
  rate: float
  max_seqlen: int  # Positions are numbered q * max_seqlen + s: unique below max_seqlen.
  layer: int = 0  # The static seed of cuDNN's own dropout (model.attention=cudnn), which
  # ignores `seed`: its masks change per call through XLA's RNG offset instead.

  @classmethod
  def from_key(cls, key, rate: float, max_seqlen: int, layer: int = 0) -> "AttentionDropout":
    return cls(jax.random.bits(key, (2,), jnp.uint32), rate, max_seqlen, layer)

  def keep(self, batch: int, heads: int, queries: tuple[int, int], keys: int):
    """Keep mask [B, H, Q, S] for queries at positions range(*queries), keys at range(keys)."""
    # Iotas, not constants: a [Q, S] constant per query block would bloat the compiled program.
    bh = jnp.arange(batch * heads, dtype=jnp.uint32).reshape(batch, heads, 1, 1)
    position = (jnp.arange(*queries, dtype=jnp.uint32)[:, None] * jnp.uint32(self.max_seqlen)
                + jnp.arange(keys, dtype=jnp.uint32)[None, :])
    return hash_keep(self.seed, bh, position, self.rate)

  def __call__(self, p_bhqs, queries: tuple[int, int], keys: int):
    keep = self.keep(p_bhqs.shape[0], p_bhqs.shape[1], queries, keys)
    return jnp.where(keep, p_bhqs / (1.0 - self.rate), 0).astype(p_bhqs.dtype)


def blockwise_causal_attention(q_blhk, k_blhk, v_blhk, block: int, dropout=None):
  """Causal attention, same result as `jax.nn.dot_product_attention(..., is_causal=True)`
  (without `dropout`; with it, each probability is dropped by its `AttentionDropout` mask).

  Queries go in blocks of `block` positions; each block scores only the keys up to its own end,
  so the masked-out upper triangle is mostly never computed (at 2 blocks, 25% less work than the
  full square; more blocks skip more). Batch-head-major layout, plain einsums, scores
  accumulated and normalized in float32: on XLA:CPU this is 2-4x faster than XLA's
  `dot_product_attention`, which materializes and masks the full [B, H, L, L] scores
  (benchmarks/RESULTS.md).
  """
  seqlen, head_dim = q_blhk.shape[1], q_blhk.shape[3]
  q_bhlk = jnp.swapaxes(q_blhk, 1, 2) * jnp.asarray(1.0 / math.sqrt(head_dim), q_blhk.dtype)
  k_bhlk, v_bhlk = jnp.swapaxes(k_blhk, 1, 2), jnp.swapaxes(v_blhk, 1, 2)
  outs = []
  for start in range(0, seqlen, block):
    end = min(start + block, seqlen)
    s_bhqs = jnp.einsum("bhqk,bhsk->bhqs", q_bhlk[:, :, start:end], k_bhlk[:, :, :end],
                        preferred_element_type=jnp.float32)
    visible_qs = np.arange(end)[None, :] <= np.arange(start, end)[:, None]
    s_bhqs = jnp.where(visible_qs, s_bhqs, jnp.finfo(jnp.float32).min)
    p_bhqs = jax.nn.softmax(s_bhqs, axis=-1)
    if dropout is not None:
      p_bhqs = dropout(p_bhqs, (start, end), end)
    p_bhqs = p_bhqs.astype(v_bhlk.dtype)
    outs.append(jnp.einsum("bhqs,bhsk->bhqk", p_bhqs, v_bhlk[:, :, :end]))
  return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


SPLASH_BLOCK = 128  # Splash attention's query/key block; lengths must be multiples of it.


def splash_causal_attention(q_blhk, k_blhk, v_blhk, interpret: bool = False):
  """Causal attention by the Pallas splash kernel (TPU; `interpret` runs it anywhere, slowly).

  The kernel works on one example's [H, L, K] (vmapped over the batch), takes no scale (q is
  scaled first) and is a custom call that XLA cannot partition: under a mesh it runs inside
  `shard_map` on each device's own batch rows and heads (the "heads" layout pinned by
  `pinned_shardings`).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU-only module.
  seqlen, head_dim = q_blhk.shape[1], q_blhk.shape[3]

  def local(q, k, v):  # [b, L, h, K] of this device.
    mask = splash.MultiHeadMask([splash.CausalMask((seqlen, seqlen))] * q.shape[2])
    blocks = splash.BlockSizes(**{name: SPLASH_BLOCK for name in (
        "block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
        "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")})
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)
    q_bhlk = jnp.swapaxes(q, 1, 2) * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    out_bhlk = jax.vmap(kernel)(q_bhlk, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
    return jnp.swapaxes(out_bhlk, 1, 2)

  layout = pinned.layout("heads")
  if layout is None:
    return local(q_blhk, k_blhk, v_blhk)
  return jax.shard_map(local, mesh=layout.mesh, in_specs=(layout.spec,) * 3,
                       out_specs=layout.spec, check_vma=False)(q_blhk, k_blhk, v_blhk)


