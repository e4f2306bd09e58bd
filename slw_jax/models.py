"""GPT-2/GPT-3 style decoder in Flax NNX.

Learned absolute position embeddings, pre-LayerNorm blocks, causal self-attention
(slw_jax.attention, one dispatch: cuDNN's fused kernel on GPUs, Pallas splash attention on TPUs,
blockwise einsums on CPUs, XLA's otherwise), a 4x GELU MLP, a final LayerNorm and an output head
tied to the token embedding; with `qk_norm`, a LayerNorm on each head's queries and keys. GPT-2
initialization: normal(0.02), residual output projections scaled by 1/sqrt(2 * n_layer).

Mixed precision: parameters are float32 and matmuls run in `dtype` (bfloat16 on accelerators).
Where precision matters the model computes in float32 whatever `dtype`: LayerNorm statistics,
attention scores and their softmax, and the output head, whose logits come out float32 (the
matmul accumulates in float32: `preferred_element_type`), so the loss never sees bf16 logits.

Axis letters in names: b batch, l sequence, d model width, h heads, k head dim, f MLP hidden,
v vocabulary, c the q/k/v triple. Every parameter carries logical axis names (`out_sharding`
metadata) that `sharding.py` maps to mesh axes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slw_jax import attention, pinned

LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon.

@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int
  n_layer: int
  d_model: int
  n_head: int
  max_seqlen: int
  dtype: str = "float32"
  dropout: float = 0.0
  attention_dropout: float = 0.0
  vocab_pad_multiple: int = 1
  attention: str = "auto"
  attention_block: int = 128
  remat: str = "none"
  scan_layers: bool = False
  loss_head: str = "fused"
  loss_chunk_tokens: int = 8192
  dropout_rng: str = "hash"
  qk_norm: bool = False

  # Fields that change how the model computes but not its parameters' shapes: a checkpoint
  # resumes under other values of these, and must match every other field.
  RUNTIME_FIELDS = ("dtype", "dropout", "attention_dropout", "attention", "attention_block",
                    "remat", "loss_head", "loss_chunk_tokens", "dropout_rng")
  # Fields that change how the parameters are laid out but not what they are: a checkpoint
  # resumes under the other value through `restack_blocks`.
  LAYOUT_FIELDS = ("scan_layers",)
  # Parameter-shaping fields added after checkpoints were first saved, whose default builds
  # the model those releases built: a saved config that lacks one takes the default.
  ADDED_FIELDS = ("qk_norm",)

  @classmethod
  def param_shaping_fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.name not in cls.RUNTIME_FIELDS + cls.LAYOUT_FIELDS)

  @classmethod
  def from_config(cls, model_cfg) -> "GPTConfig":
    """From `config.model`; fields a checkpoint of an older release lacks take their defaults
    (an older release never scanned its layers, nor normalized queries and keys)."""
    optional = cls.RUNTIME_FIELDS + cls.LAYOUT_FIELDS + cls.ADDED_FIELDS
    values = {f.name: model_cfg[f.name] for f in dataclasses.fields(cls)
              if f.name in model_cfg or f.name not in optional}
    return cls(**values)

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


def _param(rngs: nnx.Rngs, shape, axes, std: float | None) -> nnx.Param:
  """A float32 parameter: normal(std), or zeros when std is None; tagged with logical axes."""
  if std is None:
    value = jnp.zeros(shape, jnp.float32)
  else:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, out_sharding=axes)


class PositionKeyedDropout(nnx.Module):
  """Dropout on [B, L, D] whose mask at (b, l, d) does not depend on L, so a batch right-padded
  into a longer bucket (compile.pad_multiple) draws the masks of its real length, and padded
  training equals unpadded training with dropout on too.

  `rng="hash"` (model.dropout_rng, the default): the mask is a counter hash of (b, l, d) and a
  per-call seed (`attention.hash_keep`), a dozen integer operations per element fused into the
  surrounding elementwise work. `rng="threefry"`: JAX's partitionable threefry bits drawn
  position-major, [L, B, D], whose row-major index of each element is the same at any L (20
  rounds per pair of 32-bit words: GPU-PERFORMANCE.md suspect 5; the masks before 2026-12-03).
  """

  def __init__(self, rate: float, rng: str = "hash"):
    self.rate, self.rng = rate, rng

  def __call__(self, x_bld, *, deterministic: bool, rngs: nnx.Rngs | None):
    if deterministic or self.rate == 0.0:
      return x_bld
    if rngs is None:
      raise ValueError("dropout with deterministic=False needs rngs with a 'dropout' stream")
    batch, seqlen, width = x_bld.shape
    if self.rng == "hash":
      seed = jax.random.bits(rngs.dropout(), (2,), jnp.uint32)
      row_b11 = jnp.arange(batch, dtype=jnp.uint32).reshape(batch, 1, 1)
      position_1ld = (jnp.arange(seqlen, dtype=jnp.uint32)[None, :, None] * jnp.uint32(width)
                      + jnp.arange(width, dtype=jnp.uint32)[None, None, :])
      keep_bld = attention.hash_keep(seed, row_b11, position_1ld, self.rate)
    else:
      keep_lbd = jax.random.bernoulli(rngs.dropout(), 1.0 - self.rate, (seqlen, batch, width))
      keep_bld = jnp.swapaxes(keep_lbd, 0, 1)
    return jnp.where(keep_bld, x_bld / (1.0 - self.rate), 0).astype(x_bld.dtype)


def layer_norm(x, scale, bias, dtype):
  """LayerNorm over the last axis of `x`: statistics in float32, output in `dtype`."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return ((x - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias).astype(dtype)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the compute dtype."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.scale_d = nnx.Param(jnp.ones((cfg.d_model,), jnp.float32), out_sharding=("embed",))
    self.bias_d = _param(rngs, (cfg.d_model,), ("embed",), None)
    self.dtype = cfg.compute_dtype

  def __call__(self, x_bld):
    return layer_norm(x_bld, self.scale_d[...], self.bias_d[...], self.dtype)


class HeadLayerNorm(nnx.Module):
  """model.qk_norm: LayerNorm of each head's query (or key) over the head dim, with a scale
  and bias per (head, head dim). Bounded q and k keep the attention logits from growing
  without limit (Dehghani et al. 2023; Wortsman et al. 2023). Statistics in float32;
  the output stays in the compute dtype, so the fused kernels still get bf16. Drawing nothing
  from `rngs`, it leaves every other parameter's initialization as it is."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    shape, axes = (cfg.n_head, cfg.head_dim), ("heads", "kv")
    self.scale_hk = nnx.Param(jnp.ones(shape, jnp.float32), out_sharding=axes)
    self.bias_hk = _param(rngs, shape, axes, None)
    self.dtype = cfg.compute_dtype

  def __call__(self, x_blhk):
    return layer_norm(x_blhk, self.scale_hk[...], self.bias_hk[...], self.dtype)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention; with model.qk_norm, queries and keys are normalized per
  head (`HeadLayerNorm`) before the scores, whatever the kernel."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs, layer: int = 0):
    d, h, k = cfg.d_model, cfg.n_head, cfg.head_dim
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    self.layer = layer  # cuDNN's dropout seed (static): each unrolled layer its own masks.
    self.qkv_weight_dchk = _param(rngs, (d, 3, h, k), ("embed", None, "heads", "kv"), 0.02)
    self.qkv_bias_chk = _param(rngs, (3, h, k), (None, "heads", "kv"), None)
    self.out_weight_hkd = _param(rngs, (h, k, d), ("heads", "kv", "embed"), resid_std)
    self.out_bias_d = _param(rngs, (d,), ("embed",), None)
    self.dtype = cfg.compute_dtype
    self.attention, self.block = cfg.attention, cfg.attention_block
    self.dropout_rate, self.max_seqlen = cfg.attention_dropout, cfg.max_seqlen
    self.qk_norm = cfg.qk_norm
    if cfg.qk_norm:  # Only then: a model without it has the parameters it always had.
      self.q_norm, self.k_norm = HeadLayerNorm(cfg, rngs), HeadLayerNorm(cfg, rngs)

  def __call__(self, x_bld, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    w = self.qkv_weight_dchk[...].astype(self.dtype)
    qkv_blchk = jnp.einsum("bld,dchk->blchk", x_bld, w) + self.qkv_bias_chk[...].astype(self.dtype)
    q_blhk, k_blhk, v_blhk = qkv_blchk[:, :, 0], qkv_blchk[:, :, 1], qkv_blchk[:, :, 2]
    if self.qk_norm:
      q_blhk, k_blhk = self.q_norm(q_blhk), self.k_norm(k_blhk)
    dropout = None
    if not deterministic and self.dropout_rate > 0:
      if rngs is None:
        raise ValueError("attention dropout with deterministic=False needs rngs with a 'dropout' "
                         "stream")
      dropout = attention.AttentionDropout.from_key(rngs.dropout(), self.dropout_rate,
                                                    self.max_seqlen, self.layer)
    attn_blhk = attention.attend(q_blhk, k_blhk, v_blhk, self.attention, self.block, dropout)
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

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs, layer: int = 0):
    self.ln_1 = LayerNorm(cfg, rngs)
    self.attn = CausalSelfAttention(cfg, rngs, layer)
    self.ln_2 = LayerNorm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    self.dropout = PositionKeyedDropout(cfg.dropout, cfg.dropout_rng)

  def __call__(self, x_bld, deterministic: bool, rngs: nnx.Rngs | None):
    drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)  # noqa: E731
    x_bld = x_bld + drop(self.attn(self.ln_1(x_bld), deterministic, rngs))
    return x_bld + drop(self.mlp(self.ln_2(x_bld)))


class GPT(nnx.Module):
  """Token ids [B, L] -> logits [B, L, vocab_size] for any L <= max_seqlen."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    # Sharding is applied later, by jit out_shardings (never eagerly on one device).
    with nnx.use_eager_sharding(False):
      self.cfg = cfg
      self.wte_vd = _param(rngs, (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), 0.02)
      self.wpe_ld = _param(rngs, (cfg.max_seqlen, cfg.d_model), (None, "embed"), 0.02)
      # Dropout keys come with each call (pure steps).
      self.drop = PositionKeyedDropout(cfg.dropout, cfg.dropout_rng)
      blocks = [Block(cfg, rngs, layer) for layer in range(cfg.n_layer)]
      # Scanned: one Block whose parameters carry a leading "layers" axis, initialized exactly
      # as the unrolled blocks are (the same parameters whatever the setting).
      self.blocks = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
      self.ln_f = LayerNorm(cfg, rngs)

  def __call__(self, tokens_bl, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """Logits; with `deterministic=False` dropout draws from `rngs` (stream 'dropout')."""
    return self.head(self.features(tokens_bl, deterministic=deterministic, rngs=rngs))

  def head(self, x_bld, keep_padding: bool = False):
    """Final features [B, L, D] -> float32 logits [B, L, vocab_size] (the tied output head);
    see `head_logits` for `keep_padding`."""
    return head_logits(x_bld, self.wte_vd[...], self.cfg, keep_padding)

  def features(self, tokens_bl, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """Token ids [B, L] -> the final LayerNorm's output [B, L, D], in the compute dtype."""
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
    lookup_vd = pinned.constrain(wte_vd, "embedding_lookup")
    x_bld = jnp.take(lookup_vd, tokens_bl, axis=0) + self.wpe_ld[:seqlen]
    x_bld = x_bld.astype(cfg.compute_dtype)
    x_bld = pinned.constrain(self.drop(x_bld, deterministic=deterministic, rngs=rngs))
    # Each block draws its dropout masks from its own key, whatever model.remat and
    # model.scan_layers: the same masks with and without recomputation or scanning.
    keys = [None if deterministic or rngs is None else rngs.dropout()
            for _ in range(cfg.n_layer)]
    if cfg.scan_layers:
      return self.ln_f(_scan_blocks(cfg.remat, self.blocks, x_bld, deterministic, keys))
    for block, key in zip(self.blocks, keys):
      x_bld = pinned.constrain(_apply_block(cfg.remat, block, x_bld, deterministic, key))
    return self.ln_f(x_bld)


def head_logits(x_bld, wte_vd, cfg: GPTConfig, keep_padding: bool = False):
  """The tied output head: features [B, L, D] -> float32 logits [B, L, vocab_size].

  It accumulates in float32 and returns float32 logits: bf16 logits would leave the loss 8 bits
  of mantissa over a 50K-way softmax. Padded vocabulary rows never score: they are cut off, or
  with `keep_padding` (the loss) set to a huge negative logit, which keeps the padded width that
  the mesh divides (cutting a tensor-sharded vocabulary to 50257 would make XLA reshard).
  """
  logits_blv = jnp.einsum("bld,vd->blv", x_bld, wte_vd.astype(cfg.compute_dtype),
                          preferred_element_type=jnp.float32)
  if not keep_padding or cfg.padded_vocab == cfg.vocab_size:
    return logits_blv[..., :cfg.vocab_size]
  real = np.arange(cfg.padded_vocab) < cfg.vocab_size
  return jnp.where(real, logits_blv, jnp.float32(-1e30))


# ----- scanned layers (model.scan_layers) -------------------------------------------------------
# The blocks' parameters stacked on a leading "layers" axis (no mesh rule maps it: never
# sharded) and applied by `jax.lax.scan`: XLA compiles one block, whatever the depth.

LAYERS_AXIS = "layers"  # Logical name of the stacked blocks' leading axis.


def stack_blocks(blocks: list[Block]) -> Block:
  """One Block whose every parameter stacks the blocks' on a new leading axis."""
  graphdef, _ = nnx.split(blocks[0])

  def stack(*variables):
    axes = variables[0].get_metadata().get("out_sharding") or (None,) * variables[0].ndim
    return variables[0].replace(jnp.stack([v[...] for v in variables]),
                                out_sharding=(LAYERS_AXIS, *axes))

  states = [nnx.state(block) for block in blocks]
  return nnx.merge(graphdef, jax.tree.map(stack, *states,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _scan_blocks(remat: str, stacked: Block, x_bld, deterministic: bool, keys):
  """The stacked blocks applied in order by `lax.scan`; block i draws dropout from keys[i]."""
  graphdef, state = nnx.split(stacked)

  def body(x_bld, layer):
    layer_state, key = layer
    block = nnx.merge(graphdef, layer_state)
    return pinned.constrain(_apply_block(remat, block, x_bld, deterministic, key)), None

  keys = None if keys[0] is None else jnp.stack(keys)
  x_bld, _ = jax.lax.scan(body, x_bld, (state, keys))
  return x_bld


def path_names(path) -> tuple:
  """A pytree key path as plain names and indices (dict keys, attributes, list indices)."""
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def restack_blocks(source, target, n_layer: int):
  """`source`, a pytree holding the model's parameters (params, optimizer state, or a pure
  dict) with unrolled or stacked blocks, rearranged like `target` (arrays or
  ShapeDtypeStructs, with the other setting): "blocks/i/x" <-> row i of "blocks/x"."""
  flat = {path_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(source)[0]}
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  leaves = []
  for path, _ in paths:
    names = path_names(path)
    if names in flat:
      leaves.append(flat[names])
      continue
    at = names.index("blocks") + 1
    if isinstance(names[at], int):  # Unrolled target, stacked source.
      leaves.append(flat[names[:at] + names[at + 1:]][names[at]])
    else:
      leaves.append(jnp.stack([flat[names[:at] + (i,) + names[at:]] for i in range(n_layer)]))
  return jax.tree.unflatten(treedef, leaves)


# ----- rematerialization (model.remat) ---------------------------------------------------------
# "block" keeps only each block's input and recomputes the rest in the backward pass (the least
# memory, one extra forward); "dots" keeps the outputs of the weight matmuls and recomputes the
# cheap elementwise work and attention (MaxText's "minimal"), through `nnx.remat`.


def _apply_block(remat: str, block: Block, x_bld, deterministic: bool, key):
  """`block` on `x_bld` under `model.remat`; dropout (if any) draws from `key`."""
  if remat == "none":
    return _block_forward(block, x_bld, deterministic, key)
  if remat == "dots":  # Static arg 2: `deterministic` picks the code path.
    saved = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nnx.remat(_block_forward, policy=saved, static_argnums=2)(
        block, x_bld, deterministic, key)
  graphdef, state = nnx.split(block)
  return _recomputed_block(graphdef, deterministic)(state, x_bld, key)


def _block_forward(block: Block, x_bld, deterministic: bool, key):
  return block(x_bld, deterministic, None if key is None else nnx.Rngs(dropout=key))


def _recomputed_block(graphdef, deterministic: bool):
  """A block whose backward pass recomputes its forward from the saved input, once the gradient
  from the blocks after it has arrived: an optimization barrier ties the recomputation to that
  gradient, so no compiler can hoist it earlier and keep every block's activations alive at
  once (XLA:CPU does that with `jax.checkpoint`: benchmarks/RESULTS.md). Dropout draws from
  `key`, the same in the forward pass and its recomputation."""
  def forward(state, x_bld, key):
    return _block_forward(nnx.merge(graphdef, state), x_bld, deterministic, key)

  @jax.custom_vjp
  def block(state, x_bld, key):
    return forward(state, x_bld, key)

  def block_forward(state, x_bld, key):
    return forward(state, x_bld, key), (state, x_bld, key)

  def block_backward(saved, grad_bld):
    state, x_bld, key, grad_bld = jax.lax.optimization_barrier((*saved, grad_bld))
    _, vjp = jax.vjp(lambda s, x: forward(s, x, key), state, x_bld)
    return (*vjp(grad_bld), None)

  block.defvjp(block_forward, block_backward)
  return block


def num_params(cfg: GPTConfig) -> int:
  """Parameter count, from abstract shapes (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def padding_params(cfg: GPTConfig) -> int:
  """Parameters in the token table's padded rows (model.vocab_pad_multiple): counted by
  `num_params`, not by a published count (GPT-2 117M: 47 rows x 768 = 36,096)."""
  return (cfg.padded_vocab - cfg.vocab_size) * cfg.d_model


def train_flops_per_token(cfg: GPTConfig, seqlen: int, n_params: int) -> float:
  """Training FLOPs per token at `seqlen`: 6N for the matmul parameters plus attention.

  N excludes the position embedding (a lookup, no matmul); the tied token embedding counts
  because it is the output head. Attention (QK^T and AV, forward and backward) adds
  12 * n_layer * d_model * seqlen, without discounting the causal mask (PaLM appendix B).
  """
  matmul_params = n_params - cfg.max_seqlen * cfg.d_model
  return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.d_model * seqlen
