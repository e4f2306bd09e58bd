"""Layouts pinned while a step is traced: models read them to constrain their values.

Set by `sharding.Layout.traced` through `pinned_shardings`; read by the model
(`constrain`), the fused head (`rows_per_device`) and the kernels XLA cannot partition
(`layout`: attention runs on each device's part of the "heads" layout).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

# Layouts pinned while a step is traced (set by `pinned_shardings`): "activation" for [B, L, D]
# activations at block boundaries, "embedding_lookup" for the token table as the lookup reads
# it, "batch" for [B, L] token microbatches, "heads" for [B, L, H, K] per-head activations
# (kernels that XLA cannot partition run on each device's part of this layout), "params" for
# trees laid out like the parameters (gradient accumulators). Empty, the
# default: no constraints (one device, or not under jit).
_PINNED = contextvars.ContextVar("pinned_shardings", default={})


@contextlib.contextmanager
def pinned_shardings(**shardings):
  """Within this context, traced models pin the named values to these shardings."""
  token = _PINNED.set(shardings)
  try:
    yield
  finally:
    _PINNED.reset(token)


def rows_per_device(batch: int, seqlen: int) -> int:
  """Rows of a [batch, seqlen] token batch each device holds under the pinned "batch" layout
  (all of them when none is pinned: one device, or not under jit)."""
  sharding = _PINNED.get().get("batch")
  return batch if sharding is None else sharding.shard_shape((batch, seqlen))[0]


def constrain(x, name: str = "activation"):
  """`x` pinned to the sharding named `name` by `pinned_shardings`, if any."""
  sharding = _PINNED.get().get(name)
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def layout(name: str):
  """The sharding pinned as `name`, or None."""
  return _PINNED.get().get(name)
