"""benchmarks/cudnn_dropout_probe.py reads masks and checks gradients correctly: checked here
with stand-ins for cuDNN's kernel whose masks are known (the real kernel needs a GPU)."""

import importlib.util

import jax
import numpy as np
import pytest

from conftest import REPO
from slw_jax import attention

spec = importlib.util.spec_from_file_location(
    "cudnn_dropout_probe", REPO / "benchmarks" / "cudnn_dropout_probe.py")
probe_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe_module)


def _hashed_attention(key):
  """Attention with hashed dropout from `key`: the same mask at every call, forward and
  backward consistent (autodiff)."""
  def kernel(q, k, v, rate, seed=0):
    drop = attention.AttentionDropout.from_key(jax.random.fold_in(key, seed), rate, q.shape[1])
    return attention.blockwise_causal_attention(q, k, v, q.shape[1], drop)
  return kernel


KEYS = (jax.random.key(1), jax.random.key(2))  # Made outside any trace: closed over in VJPs.


def _inconsistent_attention(q, k, v, rate, seed=0):
  """A kernel whose backward pass drops other probabilities than its forward pass."""
  forward, backward = (lambda q, k, v, r, key=key: _hashed_attention(key)(q, k, v, r, seed)
                       for key in KEYS)

  @jax.custom_vjp
  def kernel(q, k, v):
    return forward(q, k, v, rate)

  def fwd(q, k, v):
    return kernel(q, k, v), (q, k, v)

  def bwd(saved, g):
    return jax.vjp(lambda q, k, v: backward(q, k, v, rate), *saved)[1](g)

  kernel.defvjp(fwd, bwd)
  return kernel(q, k, v)


def test_off_a_gpu_the_probe_says_it_is_not_available():
  result = probe_module.probe()
  assert set(result) == {"available", "why"} and result["available"] is False
  assert "needs a GPU" in result["why"]


@pytest.mark.parametrize("kernel,consistent", [("hashed", True), ("inconsistent", False)])
@pytest.mark.slow
def test_probe_reads_the_mask_and_catches_a_backward_with_another_mask(monkeypatch, kernel,
                                                                      consistent):
  monkeypatch.setattr(attention, "resolve_attention", lambda *a, **k: ("cudnn", "test"))
  stand_in = (_hashed_attention(jax.random.key(1)) if kernel == "hashed"
              else _inconsistent_attention)
  monkeypatch.setattr(attention, "cudnn_attention_with_dropout", stand_in)
  result = probe_module.probe(0.1)
  assert result["available"] and abs(result["kept_fraction"] - 0.9) < 0.02
  # A fixed key: the next call draws the same mask, which is what the probe must flag on a GPU.
  assert result["same_mask_next_call"] == 1.0
  assert abs(result["same_mask_other_layer"] - 0.82) < 0.03  # Its own seed: independent.
  errors = [result["dv_relative_error_vs_forward_mask"],
            *result["scanned_dv_relative_error_per_layer"]]
  assert len(errors) == 4 and all(np.isfinite(errors))
  assert all((e < 2e-2) if consistent else (e > 0.1) for e in errors), result
  assert result["scanned_same_mask_layers_0_1"] == 1.0  # One seed inside the scan (a fake).
