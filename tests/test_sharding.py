"""Sharding on 8 simulated CPU devices: meshes agree with one device, layouts, clear errors."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from slw_jax import compiled_steps, config_lib, distributed, errors, sharding, train_step

# Two layers, 8 heads of 8, vocabulary padded to 264: every rule has something to split.
MODEL = {"model.n_layer": 2, "model.d_model": 64, "model.n_head": 8, "model.max_seqlen": 32,
         "model.vocab_pad_multiple": 8, "batch_size": 8, "train_tokens": None,
         "train_steps": 3, "optim.warmup_steps": 1}
SHAPES = [(8, 16), (8, 16), (8, 32)]  # Three steps through two buckets.


def _config(mesh, **overrides):
  values = {**MODEL, "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2],
            **overrides}
  return config_lib.validate(config_lib.load_config_file(str(REPO / "configs/tiny.py"), values))


def _three_steps(mesh, devices=None):
  c = _config(mesh)
  placed = train_step.on_mesh(c, devices)
  layout = placed.layout
  device = train_step.sharded_steps(c, placed, skip_bad=False, background=False)
  state, losses = device.init(), []
  for number, (batch_size, seqlen) in enumerate(SHAPES):
    tokens = np.random.default_rng(number).integers(0, 259, (batch_size, seqlen + 1))
    local = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
    state, metrics = device.executables.get((batch_size, seqlen))(
        state, layout.global_batch(local, batch_size), np.float32(1e-3))
    losses.append(float(sharding.fetch(metrics)["loss"]))
  return losses, state, layout, device.executables.num_compiled


@pytest.fixture(scope="module")
def single_device_losses():
  mesh = (1, 1, 1)
  return _three_steps(mesh, jax.devices()[:1])[0]


# mesh -> expected PartitionSpec of (MLP fc weight [d, f], token embedding [vocab, d], batch).
EXPECTED = {
    (8, 1, 1): ((None, None), (None, None), ("data", None)),
    (2, 4, 1): (("fsdp", None), (None, "fsdp"), (("data", "fsdp"), None)),
    (2, 2, 2): (("fsdp", "tensor"), ("tensor", "fsdp"), (("data", "fsdp"), None)),
    (1, 1, 8): ((None, "tensor"), ("tensor", None), (None, None)),
    (1, 8, 1): (("fsdp", None), (None, "fsdp"), ("fsdp", None)),
}


@pytest.mark.parametrize("mesh", list(EXPECTED), ids=lambda m: "x".join(map(str, m)))
@pytest.mark.slow
def test_mesh_matches_single_device_and_shards_as_ruled(mesh, single_device_losses):
  losses, state, layout, compiled = _three_steps(mesh)
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
  assert compiled == 2  # One executable per bucket, whatever the mesh.
  fc_spec, wte_spec, batch_spec = (jax.sharding.PartitionSpec(*s) for s in EXPECTED[mesh])
  params = state["params"]
  fc = params["blocks"][0]["mlp"]["fc_weight_df"][...]
  assert fc.sharding.spec == fc_spec and params["wte_vd"][...].sharding.spec == wte_spec
  assert layout.batch.spec == batch_spec
  # Adam's mu and nu of both layers' fc weights (the only [64, 256] leaves) are laid out alike.
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.shape == fc.shape]
  assert len(moments) == 4 and all(m.sharding.spec == fc_spec for m in moments)
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state))


def test_activations_are_pinned_at_block_boundaries():
  c = _config((2, 2, 2))
  placed = train_step.on_mesh(c)
  forward = placed.layout.traced(train_step.make_eval_step(placed.graphdef))
  text = jax.jit(forward).lower(placed.state_spec["params"],
                                compiled_steps.batch_spec(8, 16, placed.layout.batch)).as_text()
  pinned = [line for line in text.splitlines() if "sharding_constraint" in line]
  by_batch = [line for line in pinned if '[{"data", "fsdp"}, {}, {}]' in line]
  assert len(by_batch) == MODEL["model.n_layer"] + 1  # After the embedding and every block.
  assert any('tensor<264x64xf32>' in line and '[{"tensor"}, {}]' in line for line in pinned)
  # Without a layout (one device, plain jit) nothing is pinned.
  plain = jax.jit(train_step.make_eval_step(placed.graphdef)).lower(
      placed.state_spec["params"], compiled_steps.batch_spec(8, 16)).as_text()
  assert "sharding_constraint" not in plain


@pytest.mark.slow
def test_sharded_init_never_builds_the_state_on_one_device():
  c = _config((2, 2, 2))
  placed = train_step.on_mesh(c)
  device = train_step.sharded_steps(c, placed, skip_bad=False)
  compiled = device.init.lower().compile()
  # Each device's output holds only its shard: far less than the whole state.
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(placed.state_spec))
  memory = compiled.memory_analysis()
  assert memory.output_size_in_bytes + memory.temp_size_in_bytes < 0.6 * whole
  device.executables.close()


@pytest.mark.parametrize("mesh,message", [
    ((3, 1, 1), "data=3 x fsdp=1 x tensor=1 has 3 devices but 8 are available"),
    ((-1, 3, 1), "cannot fill 8 devices"),
    ((2, 2, 1), "has 4 devices but 8"),
])
def test_bad_mesh_is_a_clear_error(mesh, message):
  with pytest.raises(errors.ConfigError, match=message):
    train_step.on_mesh(_config(mesh))


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.data": -1, "mesh.fsdp": -1}, "at most one axis may be -1"),
    ({"mesh.tensor": 0}, "config.mesh.tensor=0"),
    ({"mesh.rules": (("embed", "model"),)}, "mesh axes must be among data, fsdp, tensor"),
    ({"mesh.rules": (("mlpp", "tensor"),)}, "the logical axis must be one of batch, embed"),
    ({"mesh.rules": (("mlp", "tensor"), ("mlp", None))}, "one rule only"),
    ({"mesh.rules": (("batch", ("data", "data")),)}, "a mesh axis may appear once per rule"),
])
def test_bad_mesh_config_fails_validation(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    _config((8, 1, 1), **overrides)


def test_indivisible_batch_is_a_clear_error():
  layout = train_step.on_mesh(_config((8, 1, 1))).layout
  with pytest.raises(errors.ConfigError,
                     match=r"config.batch_size is 12, not divisible by the data-parallel size 8 "
                     r"\(data=8\)"):
    sharding.check_batch_sizes(layout, {"config.batch_size": 12})
  sharding.check_batch_sizes(layout, {"config.batch_size": 16})


@pytest.mark.slow
def test_main_reports_a_bad_mesh_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "slw_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", "--config.mesh.data=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: config.mesh: data=3")


def test_indivisible_dims_are_an_error_naming_parameter_and_axis():
  c = _config((1, 1, 8), **{"model.vocab_pad_multiple": 1})
  with pytest.raises(errors.ConfigError, match=r"cannot shard parameter wte_vd: dim 0 \(259\) "
                     r"not divisible by mesh axis tensor=8: pad it .*allow_replicated=true"):
    train_step.on_mesh(c)


def test_uneven_dims_replicate_when_allowed_and_are_reported():
  c = _config((1, 1, 8), **{"model.vocab_pad_multiple": 1, "model.n_head": 4,
                            "mesh.allow_replicated": True})
  layout = train_step.on_mesh(c).layout
  assert any(n.startswith("wte_vd: dim 0 (259)") for n in layout.replicated_dims)
  assert any("attn/qkv_weight_dchk: dim 2 (4) not divisible by mesh axis tensor=8" in n
             for n in layout.replicated_dims)


def test_distributed_settings(monkeypatch):
  for env in list(distributed.ENV.values()) + [
      "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE",
      "SLURM_GPUS_ON_NODE", "TPU_WORKER_HOSTNAMES", "SLW_DISTRIBUTED", "JOB_COMPLETION_INDEX"]:
    monkeypatch.delenv(env, raising=False)
  assert distributed.initialize() == "single"
  assert distributed.initialize("127.0.0.1:1234", 1, 0) == "single"
  with pytest.raises(distributed.DistributedError, match="needs --num_processes"):
    distributed.initialize("127.0.0.1:1234", None, 0)
  with pytest.raises(distributed.DistributedError, match=r"--process_id=2 must be in \[0, "):
    distributed.initialize("127.0.0.1:1234", 2, 2)
  monkeypatch.setenv("SLW_NUM_PROCESSES", "two")
  monkeypatch.setenv("SLW_PROCESS_ID", "0")
  with pytest.raises(distributed.DistributedError, match="must be integers"):
    distributed.initialize("127.0.0.1:1234")
  with pytest.raises(distributed.DistributedError, match="must be HOST:PORT"):
    distributed.initialize("node0", 2, 0)
  monkeypatch.delenv("SLW_NUM_PROCESSES")
  monkeypatch.delenv("SLW_PROCESS_ID")
  monkeypatch.setenv("JOB_COMPLETION_INDEX", "5")  # A Kubernetes Indexed Job's pod.
  with pytest.raises(distributed.DistributedError, match=r"--process_id=5 must be in \[0, "):
    distributed.initialize("slw-jax-0.slw-jax:1234", 2)
  monkeypatch.delenv("JOB_COMPLETION_INDEX")
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "16")  # A 16-task allocation, but not inside srun.
  assert distributed.detected_cluster() is None
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
  assert distributed.detected_cluster() == "slurm"
  monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x16)")  # One process per node: all GPUs.
  assert distributed._slurm_local_devices() == list(range(8))  # pylint: disable=protected-access
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x2)")  # One per GPU: JAX's default.
  assert distributed._slurm_local_devices() is None  # pylint: disable=protected-access
