"""Device meshes, the logical-axis rules table, sharded init and activation constraints.

Everything runs on JAX's own partitioner (GSPMD through `jax.jit` shardings): this module only
decides *where* arrays live. Modules name the logical axes of their parameters (`nnx.Param`
metadata `logical_axes`, e.g. ('vocab', 'embed')); one `ShardingRules` table maps logical axes to
the mesh axes ('data', 'fsdp', 'tensor'):

  logical axis   default mesh axes   what it splits
  batch          ('data', 'fsdp')    examples of a batch (activations, batches, the KV cache)
  length         -                   sequence positions
  embed          'fsdp'              D of every weight (FSDP / ZeRO-3: weights gathered per use)
  heads          'tensor'            N (query heads)          \
  kv_heads       'tensor'            K (key/value heads)       | tensor (Megatron) parallelism
  mlp            'tensor'            F (feed-forward hidden)   |
  vocab          'tensor'            V (embedding rows, logits)/
  head_dim       -                   H
  expert         'fsdp'              E of MoE expert weights: each device stores E / fsdp experts

A dimension that does not divide the product of its mesh axes is replicated (MQA has K = 1), and
a mesh axis is used at most once per array (the first dimension that claims it wins): an expert
weight (E, D, 2, F) with axes ('expert', 'embed', None, 'mlp') gives fsdp to E and keeps D whole,
unless E does not divide fsdp, in which case D takes it.

Typical use:
```
mesh = make_mesh(config.mesh)                       # {'data': 1, 'fsdp': -1, 'tensor': 1}
rules = ShardingRules.from_config(config.get('sharding_rules'))
model = create_sharded_model(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh, rules)
with use_mesh(mesh, rules):                          # enables `constrain` inside the model
  logits, _ = jax.jit(forward)(params, tokens)
```
A function that knows its mesh enters `tracing_under(mesh, rules)` in its own body instead, so it
is constrained the same whoever traces it: the trainer's steps do (gemma_jax.trainer).
Batches per process, gradient accumulation and multi-process start-up: gemma_jax/distributed.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
LOGICAL_AXES = ('batch', 'length', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'vocab',
                'expert')
MeshAxes = tuple[str, ...]  # one logical axis maps to zero or more mesh axes
ONE_DEVICE = jax.sharding.AbstractMesh((1, 1, 1), MESH_AXES)


# ---------------------------------------------------------------------------------------------
# Mesh.


def _as_dict(obj: Any, what: str) -> dict[str, Any]:
  """A plain dict from a Mapping, an ml_collections.ConfigDict or a dataclass (None: empty)."""
  if obj is None:
    return {}
  if hasattr(obj, 'to_dict'):  # ml_collections.ConfigDict / FrozenConfigDict
    return dict(obj.to_dict())
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return dataclasses.asdict(obj)
  if isinstance(obj, Mapping):
    return dict(obj)
  raise ValueError(f'{what}: expected a dict or ConfigDict, got {type(obj).__name__}.')


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes from a config with keys data/fsdp/tensor; one -1 fills the rest.

  Missing keys default to 1. Raises ValueError, naming the numbers, for unknown keys, more than
  one -1, sizes < 1, or a product that differs from `num_devices`.
  """
  cfg = _as_dict(mesh_config, 'config.mesh')
  unknown = sorted(set(cfg) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'config.mesh: unknown mesh axis name(s) {unknown}; the mesh axes are '
                     f'{list(MESH_AXES)} (e.g. --config.mesh.fsdp=8).')
  sizes = {}
  for name in MESH_AXES:
    value = cfg.get(name, 1)
    try:
      sizes[name] = int(value)
    except (TypeError, ValueError):
      raise ValueError(f'config.mesh.{name}={value!r} is not an integer.') from None
  shown = ', '.join(f'{n}={s}' for n, s in sizes.items())
  fill = [n for n, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f'config.mesh ({shown}): at most one axis may be -1, got {len(fill)} '
                     f'({", ".join(fill)}).')
  bad = [n for n, s in sizes.items() if s < 1 and s != -1]
  if bad:
    raise ValueError(f'config.mesh ({shown}): sizes must be >= 1 or -1; {bad[0]} is not.')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(f'config.mesh ({shown}): {num_devices} devices cannot be split evenly '
                       f'into {fixed} (the product of the fixed axes) x {fill[0]}.')
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f'config.mesh ({shown}): the product {fixed} does not equal the number of '
                     f'devices, {num_devices}. Use -1 on one axis to fill the remaining devices.')
  return sizes['data'], sizes['fsdp'], sizes['tensor']


def make_mesh(mesh_config: Any = None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'tensor') over all processes' devices.

  mesh_config: dict/ConfigDict with data/fsdp/tensor sizes (one may be -1; default: all devices
  on fsdp). Device order comes from `jax.make_mesh` (topology-aware on TPU: the last axis,
  'tensor', gets the fastest links). Axes are Auto: jit partitions from the given shardings.
  """
  devices = list(jax.devices() if devices is None else devices)
  if mesh_config is None:
    mesh_config = {'fsdp': -1}
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


# ---------------------------------------------------------------------------------------------
# Rules table.


def _mesh_axes(value: Any, where: str) -> MeshAxes:
  """Normalises a rule value: None / '' / 'none' / 'fsdp' / 'data,fsdp' / a sequence -> tuple."""
  if value is None:
    return ()
  if isinstance(value, str):
    value = [] if value.strip().lower() in ('', 'none') else value.split(',')
  axes = tuple(str(a).strip() for a in value)
  unknown = [a for a in axes if a not in MESH_AXES]
  if unknown:
    raise ValueError(f'{where}: unknown mesh axis {unknown[0]!r}; choose from {list(MESH_AXES)}.')
  if len(set(axes)) != len(axes):
    raise ValueError(f'{where}: mesh axis repeated in {axes}.')
  return axes


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis -> mesh axes. Each field is a tuple of mesh axis names (empty: replicated).

  Construct with strings too: `ShardingRules(embed='fsdp', batch=('data', 'fsdp'), mlp=None)`.
  `no_sharding()` replicates everything; `from_config(d)` overrides the defaults per key.
  """

  batch: MeshAxes = ('data', 'fsdp')
  length: MeshAxes = ()
  embed: MeshAxes = ('fsdp',)
  heads: MeshAxes = ('tensor',)
  kv_heads: MeshAxes = ('tensor',)
  head_dim: MeshAxes = ()
  mlp: MeshAxes = ('tensor',)
  vocab: MeshAxes = ('tensor',)
  expert: MeshAxes = ('fsdp',)

  def __post_init__(self):
    for f in dataclasses.fields(self):
      object.__setattr__(self, f.name, _mesh_axes(getattr(self, f.name), f'ShardingRules.{f.name}'))

  @classmethod
  def no_sharding(cls) -> ShardingRules:
    """Every array replicated: single-device semantics on any mesh (a reference for tests)."""
    return cls(**{name: () for name in LOGICAL_AXES})

  @classmethod
  def from_config(cls, overrides: Any = None) -> ShardingRules:
    """Defaults with `overrides` (dict/ConfigDict, e.g. {'embed': 'fsdp,tensor', 'mlp': None})."""
    d = _as_dict(overrides, 'config.sharding_rules')
    unknown = sorted(set(d) - set(LOGICAL_AXES))
    if unknown:
      raise ValueError(f'config.sharding_rules: unknown logical axis name(s) {unknown}; known: '
                       f'{list(LOGICAL_AXES)}.')
    return cls(**{k: _mesh_axes(v, f'config.sharding_rules.{k}') for k, v in d.items()})

  def to_config(self) -> dict[str, str]:
    """{'batch': 'data,fsdp', 'length': '', ...}: flag-friendly strings for `from_config`."""
    return {name: ','.join(getattr(self, name)) for name in LOGICAL_AXES}

  def mesh_axes(self, logical: str) -> MeshAxes:
    """The mesh axes of one logical axis name."""
    if logical not in LOGICAL_AXES:
      raise ValueError(f'Unknown logical axis {logical!r}; known: {list(LOGICAL_AXES)}.')
    return getattr(self, logical)


def as_rules(rules: ShardingRules | Mapping[str, Any] | None) -> ShardingRules:
  """None -> the defaults, `ShardingRules()`; a mapping -> `ShardingRules.from_config`; rules
  pass through."""
  if rules is None:
    return ShardingRules()
  if isinstance(rules, ShardingRules):
    return rules
  return ShardingRules.from_config(rules)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Any,
                    rules: ShardingRules | Mapping[str, Any] | None = None) -> P:
  """PartitionSpec of an array with the given logical axes and shape on `mesh`.

  `mesh` is a Mesh or an AbstractMesh (only its axis sizes are read). A dimension whose size does
  not divide the product of its (unused, size > 1) mesh axes is replicated; a mesh axis already
  claimed by an earlier dimension is skipped.
  """
  rules = as_rules(rules)
  if len(axes) != len(shape):
    raise ValueError(f'logical axes {tuple(axes)} do not match shape {tuple(shape)}.')
  sizes = dict(mesh.shape)
  used: set[str] = set()
  spec = []
  for logical, dim in zip(axes, shape):
    if logical is None:
      spec.append(None)
      continue
    missing = [a for a in rules.mesh_axes(logical) if a not in sizes]
    if missing:
      raise ValueError(f'Rule {logical}->{missing[0]!r}: the mesh has no such axis '
                       f'(its axes: {list(sizes)}).')
    mesh_axes = tuple(a for a in rules.mesh_axes(logical) if a not in used and sizes[a] > 1)
    if not mesh_axes or dim % math.prod(sizes[a] for a in mesh_axes):
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


# ---------------------------------------------------------------------------------------------
# Parameters and state.


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _leaf_spec(x: Any, mesh: Any, rules: ShardingRules) -> P:
  if isinstance(x, nnx.Variable):
    axes = x.get_metadata().get('logical_axes')
    shape = np.shape(x.get_value())
    # Optimiser statistics of another rank than their parameter (Adafactor's factored moments)
    # carry the parameter's metadata: they are small, replicate them.
    if axes is None or len(axes) != len(shape):
      return P()
    return logical_to_spec(axes, shape, mesh, rules)
  return P()


def partition_specs(tree: Any, mesh: Any, rules: ShardingRules | Mapping | None = None) -> Any:
  """`tree` with every Variable's value replaced by its PartitionSpec; other leaves get P().

  `tree`: an nnx.Module (its `nnx.state`), an nnx.State, or any pytree holding Variables, such
  as a train state whose optax moments mirror the params (they keep the Variables' metadata).
  """
  rules = as_rules(rules)
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)

  def f(x):
    spec = _leaf_spec(x, mesh, rules)
    return x.replace(spec) if isinstance(x, nnx.Variable) else spec

  return jax.tree.map(f, tree, is_leaf=_is_variable)


def param_shardings(tree: Any, mesh: Mesh, rules: ShardingRules | Mapping | None = None) -> Any:
  """NamedShardings shaped like `nnx.state(model)` (or like any state pytree; see
  `partition_specs`); usable as `jax.jit(out_shardings=...)` and `jax.device_put` targets."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def create_sharded_model(make_model: Callable[[], nnx.Module], mesh: Mesh,
                         rules: ShardingRules | Mapping | None = None) -> nnx.Module:
  """`make_model()` with every parameter created directly in its sharding.

  The model is first built abstractly (`nnx.eval_shape`, no memory), then its init runs inside
  `jax.jit` with `out_shardings`, so each device only ever holds its own shards: a 7B model never
  materialises whole on one device or host. Values equal an unsharded `make_model()`
  (threefry random numbers are partitionable).
  """
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def cache_shardings(cache: Any, mesh: Mesh, rules: ShardingRules | Mapping | None = None) -> Any:
  """Shardings (jit in/out) for `Transformer.init_cache(...)`: k/v [B,S,K,H] and an int8 cache's
  scales [B,S,K] over (batch, -, kv_heads), pos [B,S] over batch, end_index replicated."""
  rules = as_rules(rules)

  def f(path, x):
    name = getattr(path[-1], 'key', None)
    if name in ('k', 'v'):
      axes = ('batch', 'length', 'kv_heads', 'head_dim')
    elif name in ('k_scale', 'v_scale'):
      axes = ('batch', 'length', 'kv_heads')
    elif name == 'pos':
      axes = ('batch', 'length')
    else:
      axes = (None,) * np.ndim(x)
    return NamedSharding(mesh, logical_to_spec(axes, np.shape(x), mesh, rules))

  return jax.tree_util.tree_map_with_path(f, cache)


def per_device_bytes(tree: Any, mesh: Any, rules: ShardingRules | Mapping | None = None) -> int:
  """Bytes one device holds for `tree` (abstract or concrete; Variables sharded by their
  logical axes, other leaves replicated). `mesh` may be an AbstractMesh of any size."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)
  specs = partition_specs(tree, mesh, rules)
  total = 0
  for x, spec in zip(jax.tree.leaves(tree),
                     jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
    shard = NamedSharding(mesh, spec).shard_shape(tuple(np.shape(x)))
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total


# ---------------------------------------------------------------------------------------------
# Activations: sharding constraints by logical name.

_RULES: contextvars.ContextVar[ShardingRules] = contextvars.ContextVar(
    'gemma_jax_sharding_rules', default=ShardingRules())


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: ShardingRules | Mapping | None = None) -> Iterator[Mesh]:
  """Context in which `constrain` is active: sets JAX's mesh (`jax.set_mesh`) and the rules.

  Trace (call) jitted steps inside it; outside it `constrain` does nothing.
  """
  token = _RULES.set(as_rules(rules))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _RULES.reset(token)


@contextlib.contextmanager
def tracing_under(mesh: Mesh | None,
                  rules: ShardingRules | Mapping | None = None) -> Iterator[None]:
  """What `constrain` reads while a function is traced: `mesh` (its abstract form: allowed inside
  jit) and `rules`. A jitted step enters it in its own body, so its activation constraints are
  the same whoever traces it, inside `use_mesh` or not. `mesh` None changes nothing."""
  if mesh is None:
    yield
    return
  with use_rules(as_rules(rules)), \
      jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


@contextlib.contextmanager
def use_rules(rules: ShardingRules | Mapping[str, Any]) -> Iterator[ShardingRules]:
  """The rules `constrain` follows while tracing inside the block (the mesh stays as it is)."""
  token = _RULES.set(as_rules(rules))
  try:
    yield as_rules(rules)
  finally:
    _RULES.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical axes, e.g. constrain(x_BTD, ('batch', 'length',
  'embed')); a no-op unless called under a mesh (`use_mesh` or `jax.set_mesh`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, _RULES.get()))


def current_spec(axes: Sequence[str | None], shape: Sequence[int]) -> P | None:
  """The PartitionSpec `constrain` would give an array with these logical axes and shape under
  the current mesh and rules; None without a mesh. For code that splits work per shard
  (`jax.shard_map`), such as the MoE dispatch."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  return logical_to_spec(axes, shape, mesh, _RULES.get())


def shard_count(axis: str, dim: int) -> int:
  """Into how many shards `constrain` splits a dimension of size `dim` with logical axis `axis`
  under the current mesh and rules (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  entry = logical_to_spec((axis,), (dim,), mesh, _RULES.get())[0]
  names = () if entry is None else (entry,) if isinstance(entry, str) else entry
  return math.prod(dict(mesh.shape)[a] for a in names)
