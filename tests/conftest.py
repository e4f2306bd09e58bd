"""Test setup: the CPU backend with 8 simulated devices, set before JAX is imported."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Unless a process started by a test chose its own count (tests/faults/driver.py).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))

# Test tiers (markers registered in pyproject.toml; `make test` runs every tier, `make
# test-fast` only the unmarked unit tier). `slow` is set on the tests themselves (over about
# 3 s each on a 2-core machine); the other two follow from where a test lives.
MULTIPROCESS_FILES = ("test_multihost.py", "test_multiprocess_faults.py")


def pytest_collection_modifyitems(items):
  """Every test under tests/faults/ is a `fault` test (injected crashes, full disks, bad
  input end to end); every test that starts several JAX processes is `multiprocess`."""
  for item in items:
    path = pathlib.Path(str(item.fspath))
    if path.parent.name == "faults":
      item.add_marker(pytest.mark.fault)
    if path.name in MULTIPROCESS_FILES:
      item.add_marker(pytest.mark.multiprocess)


@pytest.fixture
def load_config():
  """load_config(name, **overrides) -> (unvalidated ConfigDict) from configs/<name>.py."""
  from slw_jax import config_lib

  def load(name, **overrides):
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    return config_lib.load_config_file(str(REPO / "configs" / f"{name}.py"), dotted)

  return load


# A 1-layer, 32-wide run of configs/tiny.py: 12 steps through 4 buckets (seqlen 8..32), on all
# 8 test devices (data=4 x tensor=2), so every trainer test also runs the sharded path.
TEST_RUN = {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.max_seqlen": 32,
            "model.vocab_pad_multiple": 8,
            "batch_size": 4, "train_tokens": None, "train_steps": 12, "mesh.data": 4,
            "mesh.tensor": 2, "pacing.seqlen_start": 8, "pacing.multiple": 8,
            "pacing.duration_steps": 6, "optim.warmup_steps": 2, "optim.lr": 3e-3,
            "eval.every_steps": 6, "eval.batches": 2, "checkpoint.every_steps": 4,
            "log.print_every_steps": 1, "data.val_fraction": 0.1, "hardware.peak_flops": 1e11}


def metric_rows(workdir, key="loss"):
  """The metrics.jsonl rows of a run that have `key` (a partial last line, from a run still
  writing, is not a row yet)."""
  from slw_jax import report  # pylint: disable=g-import-not-at-top
  return [r for r in report.read_metrics(os.path.join(workdir, "metrics.jsonl")) if key in r]


def poison(batch_at):
  """`Loader.batch_at` with an out-of-vocabulary id (a NaN loss) in the batches starting at
  the loader positions of `poison.positions` (a set the caller fills)."""
  def poisoned(self, at, batch_size, seqlen):
    batch = batch_at(self, at, batch_size, seqlen)
    if at in poisoned.positions:
      batch.inputs[0, 0] = 10**6
    return batch
  poisoned.positions = set()
  return poisoned


def poison_position(monkeypatch, *positions):
  """The batches starting at these loader positions get a NaN loss (4 windows per test step
  in truncate mode: step k starts at 4 k)."""
  from slw_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  poisoned = poison(input_pipeline.Loader.batch_at)
  poisoned.positions.update(positions)
  monkeypatch.setattr(input_pipeline.Loader, "batch_at", poisoned)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
  """A small prepared corpus: 40 standard-library files, byte vocabulary."""
  from slw_jax import prepare  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("corpus")
  for path in prepare.stdlib_files()[:40]:
    (root / (os.path.basename(path) + ".txt")).write_bytes(open(path, "rb").read())
  return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))  # Shared: later runs reuse executables.


@pytest.fixture(scope="session")
def session_config(corpus_dir, cache_dir, tmp_path_factory):
  """session_config(**overrides) -> the validated test-run config (TEST_RUN + data + cache),
  for fixtures shared by a module or the session; tests use `make_config`."""
  from slw_jax import config_lib  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.getbasetemp() / "prepared")

  def make(**overrides):
    values = {**TEST_RUN, "data.source": f"files:{corpus_dir}/*.txt", "data.dir": data_dir,
              "compile.cache_dir": cache_dir}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config_lib.validate(config_lib.load_config_file(str(REPO / "configs/tiny.py"),
                                                           values))
  return make


@pytest.fixture
def make_config(session_config):
  """make_config(**overrides) -> the validated test-run config (TEST_RUN + data + cache)."""
  return session_config
