"""Configs saved in checkpoints: read with today's defaults, and compared with this run's.

A checkpoint records the whole config of the run that saved it (`checkpoint.record`). A later
release adds keys: `saved_defaults` fills them with their defaults (or with what that release
did, where the default changed), so that `differences` names only real changes; the resume
rules (slw_jax.resume) decide which of them a resume accepts. `on_one_device` is the saved
config as evaluation and conversion run it: one device, this machine's attention kernel.
"""

from __future__ import annotations

import json

from ml_collections import config_dict

from slw_jax import config_lib


def _with_defaults(saved: dict, defaults: dict) -> dict:
  """`saved` with the keys it lacks (added by later releases) taken from `defaults`."""
  merged = dict(defaults)
  for key, value in saved.items():
    merged[key] = (_with_defaults(value, defaults[key]) if isinstance(value, dict) and
                   isinstance(defaults.get(key), dict) else value)
  return merged


ACCELERATOR_KERNELS = ("cudnn", "splash")  # Attention kernels only a GPU / TPU compiles.


def flatten(tree: dict, prefix: str = "") -> dict:
  """A nested config dict as {"a.b": value}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
  """(field, saved value, current value) for every field (sorted) where two configs, nested or
  flat, differ after a JSON round trip (tuples and lists compare equal)."""
  there, here = (flatten(json.loads(json.dumps(d))) for d in (saved, current))
  return [(key, there.get(key), here.get(key)) for key in sorted(set(there) | set(here))
          if there.get(key) != here.get(key)]


def describe_difference(difference: tuple[str, object, object]) -> str:
  key, there, here = difference
  return f"{key}={there!r} there, {here!r} here"


def first_difference(saved: dict, current: dict) -> str:
  """"a.b=X there, Y here" for the first field (sorted) where two configs differ; "" when none
  does (see `differences`)."""
  found = differences(saved, current)
  return describe_difference(found[0]) if found else ""


def saved_defaults(config: dict) -> dict:
  """A config saved in a checkpoint, with the keys of later releases at their defaults, or at
  what that release did where the default differs from it."""
  # Keys whose default changed when they were added take the old behaviour, so that a resume
  # logs the change: unrolled blocks, threefry dropout masks, XLA:GPU's remat pass on.
  config = {**config, "model": {"scan_layers": False, "dropout_rng": "threefry",
                                **config.get("model", {})},
            "compile": {"xla_remat": True, **config.get("compile", {})}}
  config = _with_defaults(config, config_lib.base_config().to_dict())
  # Before 2026-11-28 a seqlen_start below pacing.multiple was allowed (rounded up to it).
  p = config["pacing"]
  if p["kind"] in ("linear", "root") and p["seqlen_start"] < p["multiple"]:
    config["pacing"] = {**p, "seqlen_start": p["multiple"]}
  return config


def on_one_device(config: dict) -> config_dict.FrozenConfigDict:
  """A run's config (as saved in its checkpoints) with a 1x1x1 mesh, validated: evaluation and
  conversion run on one device whatever mesh the run trained on, with the attention kernel
  this machine has (a run trained with cuDNN's or splash's is evaluated on a CPU too)."""
  config = config_dict.ConfigDict(saved_defaults(config))
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return with_local_attention(config)


def with_local_attention(config) -> config_dict.FrozenConfigDict:
  """`config` validated, with an accelerator-only attention kernel replaced by auto."""
  config = config_dict.ConfigDict(config.to_dict())
  if config.model.attention in ACCELERATOR_KERNELS:
    config.model.attention = "auto"
  return config_lib.validate(config)
