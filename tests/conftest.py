"""Test setup: the CPU backend with 8 simulated devices, set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


@pytest.fixture
def load_config():
  """load_config(name, **overrides) -> (unvalidated ConfigDict) from configs/<name>.py."""
  from slw_jax import config_lib

  def load(name, **overrides):
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    return config_lib.load_config_file(str(REPO / "configs" / f"{name}.py"), dotted)

  return load
