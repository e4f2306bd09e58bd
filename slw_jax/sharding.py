"""Device mesh from the config, logical-axis rules, and the shardings of state and batches.

Mesh axes: `data` (replicas), `fsdp` (parameters and optimizer state split across devices,
ZeRO-3 style; the batch too) and `tensor` (heads, MLP hidden and vocabulary split). Every
parameter carries logical axis names (models.py); `mesh.rules` maps them to mesh axes, one short
table as in t5x. The batch is split by the `batch` rule ((data, fsdp) by default), and so are
the activations at block boundaries. Optimizer state is laid out like the parameters.

A dimension that its mesh axes do not divide (e.g. a 259-token vocabulary over tensor=2) is an
error naming the parameter and the axis: pad it (model.vocab_pad_multiple) or change the mesh.
With `mesh.allow_replicated=true` it is replicated instead, and reported in
`Layout.replicated_dims`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from slw_jax import config_lib, errors, pinned

MESH_AXES = config_lib.MESH_AXES


def mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes; -1 takes the devices the other axes leave."""
  sizes = [mesh_cfg[axis] for axis in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if device_count % fixed:
      raise errors.ConfigError(
          f"config.mesh: {_describe(sizes)} cannot fill {device_count} devices: the fixed axes' "
          f"product ({fixed}) must divide the device count")
    sizes[sizes.index(-1)] = device_count // fixed
  if math.prod(sizes) != device_count:
    raise errors.ConfigError(
        f"config.mesh: {_describe(sizes)} has {math.prod(sizes)} devices but {device_count} are "
        "available: make data x fsdp x tensor equal the device count (or set one axis to -1)")
  return tuple(sizes)


def _describe(sizes) -> str:
  return " x ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes))


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def _rule_table(rules) -> dict[str, tuple[str, ...]]:
  table = {}
  for logical, target in rules:
    table[logical] = tuple(n for n in config_lib.rule_axes(target) if n is not None)
  return table


def mesh_spec(logical_axes, shape, rules, mesh) -> tuple[P, list[tuple[int, str]]]:
  """PartitionSpec of an array with these logical axes, and the dims left replicated because
  their mesh axes do not divide them, as (dim, "axis=size") pairs. A mesh axis is used at most
  once per array."""
  table, used, spec, replicated = _rule_table(rules), set(), [], []
  for dim, (name, size) in enumerate(zip(logical_axes, shape)):
    axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes):
      replicated.append((dim, " x ".join(f"{a}={mesh.shape[a]}" for a in axes)))
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec), replicated


@dataclasses.dataclass
class Layout:
  """Where everything lives: the mesh, the train state's shardings, the batch's."""
  mesh: jax.sharding.Mesh
  state: object  # A pytree of NamedSharding, shaped like the train state.
  batch: NamedSharding  # [B, L] token arrays.
  activation: NamedSharding  # [B, L, D] activations at block boundaries.
  heads: NamedSharding  # [B, L, H, K] per-head activations (attention kernels in shard_map).
  embedding_lookup: NamedSharding  # The token table as the embedding lookup reads it.
  replicated_dims: list[str]  # "param path: dim d (size) over axes", for the log.

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def describe(self) -> list[str]:
    """The log lines of this layout: the mesh, this process's rows, what stays replicated."""
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
    return [f"mesh {mesh} over {self.mesh.size} devices in {jax.process_count()} process(es); "
            f"this one loads batch rows block {self.process_rows}",
            *(f"replicated, not sharded: {note}" for note in self.replicated_dims)]

  def abstract(self, state_spec):
    """The state's ShapeDtypeStructs with their shardings (restore and compile targets)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        state_spec, self.state)

  def traced(self, fn):
    """`fn` with block-boundary activations pinned to the batch layout while it is traced."""
    @functools.wraps(fn)  # Keeps the step's name in compile logs (jit(step_fn)).
    def wrapped(*args):
      with pinned.pinned_shardings(activation=self.activation, batch=self.batch,
                                   heads=self.heads, params=self.state["params"],
                                   embedding_lookup=self.embedding_lookup):
        return fn(*args)
    return wrapped

  @functools.cached_property
  def process_rows(self) -> tuple[int, int]:
    """(index, count): this process holds the index-th of `count` equal blocks of batch rows."""
    shards = self.batch_shards
    rows = sorted({idx[0].indices(shards)[:2] for idx in
                   self.batch.addressable_devices_indices_map((shards, 1)).values()})
    start, stop = rows[0][0], rows[-1][1]
    contiguous = all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    if not contiguous or shards % (stop - start) or start % (stop - start):
      raise errors.InputError(f"this process's devices hold batch rows {rows} of {shards}: not one "
                              "block of an even split; order the mesh so each process holds whole "
                              "data shards")
    return start // (stop - start), shards // (stop - start)

  def global_batch(self, local: dict, batch_size: int) -> dict:
    """This process's rows (numpy) -> global jax.Arrays laid out by `self.batch`."""
    return {k: jax.make_array_from_process_local_data(self.batch, v, (batch_size, v.shape[1]))
            for k, v in local.items()}

  @property
  def batch_shards(self) -> int:
    """How many ways every batch is split (the data-parallel size)."""
    return math.prod(self.mesh.shape[a] for a in _batch_axes(self.batch))


def _batch_axes(sharding: NamedSharding) -> tuple[str, ...]:
  first = sharding.spec[0] if sharding.spec else None
  return () if first is None else (first,) if isinstance(first, str) else tuple(first)


def param_shardings(abstract_params, rules, mesh):
  """NamedShardings shaped like the Param state, and the dims that had to stay replicated."""
  logical = nnx.get_partition_spec(abstract_params)
  notes = []

  def one(path, names, x):
    spec, replicated = mesh_spec(tuple(names) or (None,) * x.ndim, x.shape, rules, mesh)
    keys = (str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    name = "/".join(k for k in keys if k not in (".value", "value"))
    notes.extend(f"{name}: dim {d} ({x.shape[d]}) not divisible by mesh axis {axes}"
                 for d, axes in replicated)
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(one, logical, abstract_params,
                                               is_leaf=lambda s: isinstance(s, P))
  return shardings, notes


def make_layout(c, state_spec, abstract_params, optimizer, devices=None) -> Layout:
  """Shardings of the whole train state (optimizer state like the params) and the batch."""
  mesh = make_mesh(c.mesh, devices)
  params, notes = param_shardings(abstract_params, c.mesh.rules, mesh)
  if notes and not c.mesh.allow_replicated:
    raise errors.ConfigError(
        f"config.mesh cannot shard parameter {notes[0]}: pad it (model.vocab_pad_multiple=128 "
        "for the vocabulary), choose mesh sizes that divide it, or set "
        "config.mesh.allow_replicated=true to keep it whole on every device")
  replicated = NamedSharding(mesh, P())
  opt_state = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, state_spec["opt_state"], params,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  state = {k: replicated for k in state_spec}
  state.update(params=params, opt_state=opt_state)
  batch_spec, _ = mesh_spec(("batch", None), (0, 0), c.mesh.rules, mesh)
  activation_spec = P(*batch_spec, None)
  heads_spec, _ = mesh_spec(("batch", None, "heads", "kv"), (0, 0, c.model.n_head, 0),
                            c.mesh.rules, mesh)
  table = jax.tree.leaves(params["wte_vd"])[0].spec
  lookup = NamedSharding(mesh, P(table[0] if table else None, None))
  return Layout(mesh, state, NamedSharding(mesh, batch_spec),
                NamedSharding(mesh, activation_spec), NamedSharding(mesh, heads_spec), lookup,
                notes)


def check_batch_sizes(layout: Layout, sizes: dict[str, int]):
  """Every batch must split evenly over the batch shards; one clear error naming the value.

  `sizes` maps a description of where the size comes from (e.g. "config.batch_size") to it.
  """
  shards = layout.batch_shards
  for name, size in sizes.items():
    if size % shards:
      axes = " x ".join(f"{a}={layout.mesh.shape[a]}" for a in _batch_axes(layout.batch))
      raise errors.ConfigError(
          f"{name} is {size}, not divisible by the data-parallel size {shards} ({axes}): use a "
          "batch size that is a multiple of it, or change config.mesh")


def fetch(tree):
  """Host (numpy) values of replicated arrays: reads this process's first shard, so it works
  when other processes hold devices too (where jax.device_get would refuse). One batched
  transfer for the whole tree."""
  leaves, treedef = jax.tree.flatten(tree)
  local = [x.addressable_data(0) if isinstance(x, jax.Array) else x for x in leaves]
  return jax.tree.unflatten(treedef, [np.asarray(x) for x in jax.device_get(local)])

