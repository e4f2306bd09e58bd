"""Running a function in the layout the trainer pins, on the 8 simulated test devices."""

import jax

from slw_jax import pinned


def on_pinned_heads(attention_fn, q, k, v):
  """attention_fn(q, k, v), jitted under the trainer's pinned head sharding over a
  (data=4, fsdp=1, tensor=2) mesh (each device's rows and heads), its inputs placed there."""
  mesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"))
  heads = jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor", None))

  @jax.jit
  def sharded(q, k, v):
    with pinned.pinned_shardings(heads=heads):
      return attention_fn(q, k, v)
  return sharded(*(jax.device_put(x, heads) for x in (q, k, v)))
