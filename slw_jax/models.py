"""GPT-2/GPT-3 style decoder in Flax NNX.

Learned absolute position embeddings, pre-LayerNorm blocks, causal self-attention (through
`jax.nn.dot_product_attention`, or blockwise einsums on CPU), a 4x GELU MLP, a final LayerNorm and an output head tied to the
token embedding. GPT-2 initialization: normal(0.02), residual output projections scaled by
1/sqrt(2 * n_layer). Parameters are float32; matmuls run in `dtype`.

Axis letters in names: b batch, l sequence, d model width, h heads, k head dim, f MLP hidden,
v vocabulary, c the q/k/v triple. Every parameter carries logical axis names (`out_sharding`
metadata) that `sharding.py` maps to mesh axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon.

# Layouts pinned while a step is traced (set by `pinned_shardings`): "activation" for [B, L, D]
# activations at block boundaries, "embedding_lookup" for the token table as the lookup reads
# it. Empty, the default: no constraints (one device, or not under jit).
_PINNED = contextvars.ContextVar("pinned_shardings", default={})


@contextlib.contextmanager
def pinned_shardings(**shardings):
  """Within this context, traced models pin the named values to these shardings."""
  token = _PINNED.set(shardings)
  try:
    yield
  finally:
    _PINNED.reset(token)


def _constrain(x, name: str = "activation"):
  sharding = _PINNED.get().get(name)
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int
  n_layer: int
  d_model: int
  n_head: int
  max_seqlen: int
  dtype: str = "float32"
  dropout: float = 0.0
  vocab_pad_multiple: int = 1
  attention: str = "auto"
  attention_block: int = 128

  # Fields that change how the model computes but not its parameters' shapes: a checkpoint
  # resumes under other values of these, and must match every other field.
  RUNTIME_FIELDS = ("dtype", "dropout", "attention", "attention_block")

  @classmethod
  def param_shaping_fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.RUNTIME_FIELDS)

  @classmethod
  def from_config(cls, model_cfg) -> "GPTConfig":
    return cls(**{f.name: model_cfg[f.name] for f in dataclasses.fields(cls)})

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @property
  def padded_vocab(self) -> int:
    m = self.vocab_pad_multiple
    return -(-self.vocab_size // m) * m

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def attention_kind(self) -> str:
    """`auto` picks by the default backend when the model is built: blockwise on CPU."""
    if self.attention != "auto":
      return self.attention
    return "blockwise" if jax.default_backend() == "cpu" else "dot_product"


def _param(rngs: nnx.Rngs, shape, axes, std: float | None) -> nnx.Param:
  """A float32 parameter: normal(std), or zeros when std is None; tagged with logical axes."""
  if std is None:
    value = jnp.zeros(shape, jnp.float32)
  else:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, out_sharding=axes)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the compute dtype."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.scale_d = nnx.Param(jnp.ones((cfg.d_model,), jnp.float32), out_sharding=("embed",))
    self.bias_d = _param(rngs, (cfg.d_model,), ("embed",), None)
    self.dtype = cfg.compute_dtype

  def __call__(self, x_bld):
    x = x_bld.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + LN_EPS) * self.scale_d[...] + self.bias_d[...]
    return y.astype(self.dtype)


def blockwise_causal_attention(q_blhk, k_blhk, v_blhk, block: int):
  """Causal attention, same result as `jax.nn.dot_product_attention(..., is_causal=True)`.

  Queries go in blocks of `block` positions; each block scores only the keys up to its own end,
  so the masked-out upper triangle is mostly never computed (at 2 blocks, 25% less work than the
  full square; more blocks skip more). Batch-head-major layout, plain einsums and a float32
  softmax: on XLA:CPU this is 2-4x faster than `dot_product_attention`, which materializes and
  masks the full [B, H, L, L] scores (benchmarks/RESULTS.md).
  """
  seqlen, head_dim = q_blhk.shape[1], q_blhk.shape[3]
  q_bhlk = jnp.swapaxes(q_blhk, 1, 2) * jnp.asarray(1.0 / math.sqrt(head_dim), q_blhk.dtype)
  k_bhlk, v_bhlk = jnp.swapaxes(k_blhk, 1, 2), jnp.swapaxes(v_blhk, 1, 2)
  outs = []
  for start in range(0, seqlen, block):
    end = min(start + block, seqlen)
    s_bhqs = jnp.einsum("bhqk,bhsk->bhqs", q_bhlk[:, :, start:end], k_bhlk[:, :, :end])
    visible_qs = np.arange(end)[None, :] <= np.arange(start, end)[:, None]
    s_bhqs = jnp.where(visible_qs, s_bhqs.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    p_bhqs = jax.nn.softmax(s_bhqs, axis=-1).astype(v_bhlk.dtype)
    outs.append(jnp.einsum("bhqs,bhsk->bhqk", p_bhqs, v_bhlk[:, :, :end]))
  return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


class CausalSelfAttention(nnx.Module):

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d, h, k = cfg.d_model, cfg.n_head, cfg.head_dim
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    self.qkv_weight_dchk = _param(rngs, (d, 3, h, k), ("embed", None, "heads", "kv"), 0.02)
    self.qkv_bias_chk = _param(rngs, (3, h, k), (None, "heads", "kv"), None)
    self.out_weight_hkd = _param(rngs, (h, k, d), ("heads", "kv", "embed"), resid_std)
    self.out_bias_d = _param(rngs, (d,), ("embed",), None)
    self.dtype = cfg.compute_dtype
    self.kind, self.block = cfg.attention_kind(), cfg.attention_block

  def __call__(self, x_bld):
    w = self.qkv_weight_dchk[...].astype(self.dtype)
    qkv_blchk = jnp.einsum("bld,dchk->blchk", x_bld, w) + self.qkv_bias_chk[...].astype(self.dtype)
    q_blhk, k_blhk, v_blhk = qkv_blchk[:, :, 0], qkv_blchk[:, :, 1], qkv_blchk[:, :, 2]
    if self.kind == "blockwise":
      attn_blhk = blockwise_causal_attention(q_blhk, k_blhk, v_blhk, self.block)
    else:
      attn_blhk = jax.nn.dot_product_attention(q_blhk, k_blhk, v_blhk, is_causal=True)
    out_w = self.out_weight_hkd[...].astype(self.dtype)
    return jnp.einsum("blhk,hkd->bld", attn_blhk, out_w) + self.out_bias_d[...].astype(self.dtype)


class MLP(nnx.Module):

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d, f = cfg.d_model, 4 * cfg.d_model
    self.fc_weight_df = _param(rngs, (d, f), ("embed", "mlp"), 0.02)
    self.fc_bias_f = _param(rngs, (f,), ("mlp",), None)
    self.proj_weight_fd = _param(rngs, (f, d), ("mlp", "embed"), 0.02 / math.sqrt(2 * cfg.n_layer))
    self.proj_bias_d = _param(rngs, (d,), ("embed",), None)
    self.dtype = cfg.compute_dtype

  def __call__(self, x_bld):
    cast = lambda p: p[...].astype(self.dtype)
    h_blf = jax.nn.gelu(x_bld @ cast(self.fc_weight_df) + cast(self.fc_bias_f), approximate=True)
    return h_blf @ cast(self.proj_weight_fd) + cast(self.proj_bias_d)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.ln_1 = LayerNorm(cfg, rngs)
    self.attn = CausalSelfAttention(cfg, rngs)
    self.ln_2 = LayerNorm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_bld, deterministic: bool, rngs: nnx.Rngs | None):
    drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)  # noqa: E731
    x_bld = x_bld + drop(self.attn(self.ln_1(x_bld)))
    return x_bld + drop(self.mlp(self.ln_2(x_bld)))


class GPT(nnx.Module):
  """Token ids [B, L] -> logits [B, L, vocab_size] for any L <= max_seqlen."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    # Sharding is applied later, by jit out_shardings (never eagerly on one device).
    with nnx.use_eager_sharding(False):
      self.cfg = cfg
      self.wte_vd = _param(rngs, (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), 0.02)
      self.wpe_ld = _param(rngs, (cfg.max_seqlen, cfg.d_model), (None, "embed"), 0.02)
      self.drop = nnx.Dropout(cfg.dropout)  # Dropout keys come with each call (pure steps).
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
      self.ln_f = LayerNorm(cfg, rngs)

  def __call__(self, tokens_bl, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """Logits; with `deterministic=False` dropout draws from `rngs` (stream 'dropout')."""
    cfg = self.cfg
    seqlen = tokens_bl.shape[1]
    if seqlen > cfg.max_seqlen:
      raise ValueError(f"sequence length {seqlen} exceeds model.max_seqlen={cfg.max_seqlen}")
    wte_vd = self.wte_vd[...]
    # take() fills NaN for ids outside the table (plain indexing would clamp them silently):
    # corrupt data then shows up as a non-finite loss that the stability monitor acts on.
    # The lookup reads the table whole along d (gathered over fsdp once): a gather from a
    # d-sharded table would come out sharded along d, and XLA would replicate it to re-split it
    # by batch.
    lookup_vd = _constrain(wte_vd, "embedding_lookup")
    x_bld = jnp.take(lookup_vd, tokens_bl, axis=0) + self.wpe_ld[:seqlen]
    x_bld = x_bld.astype(cfg.compute_dtype)
    x_bld = _constrain(self.drop(x_bld, deterministic=deterministic, rngs=rngs))
    for block in self.blocks:
      x_bld = _constrain(block(x_bld, deterministic, rngs))
    x_bld = self.ln_f(x_bld)
    logits_blv = jnp.einsum("bld,vd->blv", x_bld, wte_vd.astype(cfg.compute_dtype))
    return logits_blv[..., :cfg.vocab_size]  # Padded vocabulary rows never score.


def num_params(cfg: GPTConfig) -> int:
  """Parameter count, from abstract shapes (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def train_flops_per_token(cfg: GPTConfig, seqlen: int, n_params: int) -> float:
  """Training FLOPs per token at `seqlen`: 6N for the matmul parameters plus attention.

  N excludes the position embedding (a lookup, no matmul); the tied token embedding counts
  because it is the output head. Attention (QK^T and AV, forward and backward) adds
  12 * n_layer * d_model * seqlen, without discounting the causal mask (PaLM appendix B).
  """
  matmul_params = n_params - cfg.max_seqlen * cfg.d_model
  return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.d_model * seqlen
