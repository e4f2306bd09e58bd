"""Does cuDNN's attention dropout (model.attention=cudnn with attention_dropout > 0) drop what
dropout should? Run on a GPU by benchmarks/gpu_ab.py before anyone trusts it.

cuDNN takes its dropout seed as a compile-time constant (JAX's private
`fused_attention_stablehlo` API); whether the masks change from call to call depends on an
offset XLA's runtime keeps, which no test off a GPU can see. This probe makes the mask
readable: with q = k = 0 every visible key gets probability 1 / (i + 1) at query i, and with
v = the identity (head dim = length), output[i, s] = keep(i, s) / ((i + 1) (1 - rate)), so the
mask is `output > 0`. It reports
- the kept fraction (should be 1 - rate),
- whether two calls of one executable (two training steps) and two layers' calls inside one
  program (their own static seeds, as the unrolled model passes) draw different masks (they
  must),
- whether the backward pass drops what its forward dropped: cuDNN's dV against the dV that the
  forward's own mask implies (they must agree to bf16 rounding, else the gradients are wrong),
  for one call and for three calls inside a `lax.scan` (one custom call run three times, as
  scanned layers compile; XLA keeps one RNG offset per call that advances each run, and the
  backward scan runs the layers in reverse: the config refuses scanned layers with cuDNN's
  dropout until this says they pair up).
Between devices it cannot say anything with one GPU (it says so).

  python3 benchmarks/cudnn_dropout_probe.py   # prints one JSON line; on a CPU: not available
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from slw_jax import attention  # noqa: E402

LENGTH = 128  # Also the head dim, so v can be the identity (cuDNN takes head dims <= 128).


def _inputs():
  zeros = jnp.zeros((1, LENGTH, 1, LENGTH), jnp.bfloat16)
  identity = jnp.eye(LENGTH, dtype=jnp.bfloat16)[None, :, None, :]
  cotangent = jax.random.normal(jax.random.key(0), (1, LENGTH, 1, LENGTH), jnp.float32)
  return zeros, identity, cotangent.astype(jnp.bfloat16)


def _masks_and_grads(rate: float):
  """A jitted function: (mask, mask of another layer's call (another seed) in the same program,
  out, dV)."""
  def probe(q, v, g):
    out, vjp = jax.vjp(lambda v: attention.cudnn_attention_with_dropout(q, q, v, rate, 0), v)
    (dv,) = vjp(g)
    other = attention.cudnn_attention_with_dropout(q, q, v + 0, rate, 1)  # The next layer's.
    return out[0, :, 0, :] > 0, other[0, :, 0, :] > 0, out, dv
  return jax.jit(probe)


def _scanned_masks_and_grads(rate: float, layers: int = 3):
  """A jitted function: (masks [layers, L, L], dV [layers, ...]) of `layers` calls inside one
  `lax.scan` (one custom call, as scanned layers compile) and their backward scan."""
  def probe(q, v, g):
    def body(_, v_layer):
      return None, attention.cudnn_attention_with_dropout(q, q, v_layer, rate, 0)
    vs = jnp.stack([v] * layers)
    outs, vjp = jax.vjp(lambda vs: jax.lax.scan(body, None, vs)[1], vs)
    (dvs,) = vjp(jnp.stack([g] * layers))
    return outs[:, 0, :, 0, :] > 0, dvs
  return jax.jit(probe)


def implied_dv(mask_ls, g_blhk, rate: float):
  """dV that dropout with `mask_ls` implies: P~^T g, P~[i, s] = mask / ((i + 1)(1 - rate))."""
  i = np.arange(LENGTH)[:, None]
  p = np.where(mask_ls & (np.arange(LENGTH)[None, :] <= i), 1.0 / ((i + 1) * (1 - rate)), 0.0)
  return p.T @ np.asarray(g_blhk[0, :, 0, :], np.float32)


def probe(rate: float = 0.1) -> dict:
  """The probe's findings as a dict (`available` False off a GPU, with the reason)."""
  try:
    attention.resolve_attention("cudnn", "bfloat16", jax.default_backend(), attention_dropout=rate)
  except attention.AttentionError as error:
    return {"available": False, "why": str(error)}
  q, v, g = _inputs()
  fn = _masks_and_grads(rate)
  first = [np.asarray(x) for x in fn(q, v, g)]
  again = [np.asarray(x) for x in fn(q, v, g)]
  visible = np.tril(np.ones((LENGTH, LENGTH), bool))
  mask, other_layer, dv = first[0], first[1], first[3]
  masks, dvs = (np.asarray(x) for x in _scanned_masks_and_grads(rate)(q, v, g))
  return {"available": True, "rate": rate, "devices": jax.device_count(),
          "kept_fraction": float(mask[visible].mean()),
          # Independent masks agree on (1 - rate)^2 + rate^2 of the positions, equal ones on 1.
          "same_mask_next_call": float((mask == again[0])[visible].mean()),
          "same_mask_other_layer": float((mask == other_layer)[visible].mean()),
          "dv_relative_error_vs_forward_mask": _dv_error(dv, mask, g, rate),
          "scanned_dv_relative_error_per_layer": [
              _dv_error(dvs[i], masks[i], g, rate) for i in range(len(masks))],
          "scanned_same_mask_layers_0_1": float((masks[0] == masks[1])[visible].mean()),
          "between_devices": ("not measurable with one device" if jax.device_count() == 1
                              else "not measured: run one probe per device")}


def _dv_error(dv, mask, g, rate: float) -> float:
  reference = implied_dv(mask, g, rate)
  error = np.linalg.norm(np.asarray(dv[0, :, 0, :], np.float32) - reference)
  return float(error / np.linalg.norm(reference))

if __name__ == "__main__":
  print(json.dumps(probe()), flush=True)
