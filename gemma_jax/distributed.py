"""Running on many devices and processes: each process's rows of a batch placed on the mesh,
gradient accumulation with one cross-replica reduction per step, `jax.distributed` start-up,
the main process, and barriers.

Where arrays live (meshes, the logical-axis rules, parameter and activation shardings) is
gemma_jax/sharding.py; this module uses its rules for batches and gradients.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemma_jax.sharding import ONE_DEVICE, ShardingRules, as_rules, partition_specs, use_rules

# ---------------------------------------------------------------------------------------------
# Batches.


def batch_spec(mesh: Any, rules: ShardingRules | Mapping | None = None, ndim: int = 2) -> P:
  """PartitionSpec of a [B, T, ...] batch array: B over rules.batch, T over rules.length."""
  rules = as_rules(rules)
  sizes = dict(mesh.shape)
  b = tuple(a for a in rules.batch if sizes[a] > 1)
  t = tuple(a for a in rules.length if sizes[a] > 1 and a not in b)
  spec = [b or None, t or None] + [None] * (ndim - 2)
  return P(*spec[:ndim])


def batch_sharding(mesh: Mesh, rules: ShardingRules | Mapping | None = None,
                   ndim: int = 2) -> NamedSharding:
  """NamedSharding of a [B, T] batch array (see `batch_spec`); never silently replicated."""
  return NamedSharding(mesh, batch_spec(mesh, rules, ndim))


def put_batch(batch: Mapping[str, Any], mesh: Mesh,
              rules: ShardingRules | Mapping | None = None) -> dict[str, jax.Array]:
  """Global jax.Arrays from this process's share of a batch (numpy arrays [B_local, T, ...]).

  Each process passes only its own rows: the global batch is B_local x jax.process_count(), laid
  out in process order. Raises ValueError (before any compilation) when a dimension does not
  divide over the mesh axes that shard it.
  """
  out = {}
  sizes = dict(mesh.shape)
  for key, value in batch.items():
    value = np.asarray(value)
    spec = batch_spec(mesh, rules, value.ndim)
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    for dim, (n, axes) in enumerate(zip(global_shape, spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      shards = math.prod(sizes[a] for a in axes)
      if n % shards:
        rows = (f' = {value.shape[0]} per process x {jax.process_count()} processes'
                if dim == 0 and jax.process_count() > 1 else '')
        raise ValueError(
            f"put_batch: batch[{key!r}] has size {n}{rows} on dimension {dim}, not divisible by "
            f"the {shards} shards of mesh axes {axes} (mesh {sizes}); make the global batch "
            f'size a multiple of {shards}.')
    out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value,
                                                      global_shape)
  return out


def accumulate_gradients(grad_fn: Callable[[Any, Any], tuple[Any, Any]], params: Any,
                         batch: Mapping[str, jax.Array], num_micro_batches: int,
                         mesh: Mesh | None = None,
                         rules: ShardingRules | Mapping | None = None) -> tuple[Any, Any]:
  """Sums `grad_fn(params, micro_batch) -> (aux, grads)` over micro-batches of `batch` [B, ...].

  Call it inside the jitted step. Micro-batch i holds rows i, i+k, i+2k, ... of each device's
  rows, so no row moves between devices. With a 'data' axis > 1 each micro-batch's gradient stays
  per data replica (a leading [data] dimension sharded over 'data': one param-sized shard per
  device) and the replicas are summed once after the loop: one data-axis all-reduce per step, not
  one per micro-batch. (FSDP's reduce-scatter still runs per micro-batch: it is what keeps the
  gradient sharded.) A `grad_fn` that cannot be vmapped (the MoE experts' `jax.lax.ragged_dot`)
  sums its replicas' gradients in every micro-batch instead. Returns (aux summed, grads summed
  and sharded like `params`). Without a mesh it is a plain loop over micro-batches.
  """
  rules = as_rules(rules)
  k = num_micro_batches
  specs = partition_specs(params, ONE_DEVICE if mesh is None else mesh, rules)
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
  data_free = all('data' not in jax.tree.leaves(tuple(s)) for s in flat_specs)
  n = mesh.shape['data'] if mesh is not None and 'data' in rules.batch and data_free else 1
  rows = len(next(iter(batch.values())))
  if rows % (n * k):
    raise ValueError(f'accumulate_gradients: batch of {rows} rows does not split into '
                     f'{k} micro-batches x {n} data replicas.')

  def plan(n):
    """(micro-batches [k, n, B / (n k), ...], rules inside the loop, gradient per replica)."""
    # Split without moving rows between devices.
    micro = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(n, rows // (n * k), k, *x.shape[1:]), 2, 0), dict(batch))
    if n == 1:  # no vmap, the same shapes
      def one(p, micro_batch):
        return jax.tree.map(lambda x: x[None], grad_fn(p, jax.tree.map(lambda x: x[0],
                                                                       micro_batch)))
      return micro, rules, one
    # Inside the vmap, 'data' is taken by the replica axis.
    inner = dataclasses.replace(rules, batch=tuple(a for a in rules.batch if a != 'data'))
    return micro, inner, jax.vmap(grad_fn, in_axes=(None, 0), spmd_axis_name='data')

  micro, loop_rules, per_replica = plan(n)
  try:
    with use_rules(loop_rules):
      abstract = jax.eval_shape(per_replica, params, jax.tree.map(lambda x: x[0], micro))
  except NotImplementedError:
    if n == 1:
      raise
    # jax.lax.ragged_dot (the MoE experts) has no batching rule for unbatched weights (JAX 0.10):
    # sum the replicas' gradients in each micro-batch instead (one data all-reduce per micro-batch).
    n = 1
    micro, loop_rules, per_replica = plan(n)
    with use_rules(loop_rules):
      abstract = jax.eval_shape(per_replica, params, jax.tree.map(lambda x: x[0], micro))

  def sharded(tree, replica_axis):
    if mesh is None:
      return tree
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, P(*replica_axis, *s)), specs)
    return jax.lax.with_sharding_constraint(tree, shardings)

  def body(acc, micro_batch):
    aux, grads = per_replica(params, micro_batch)
    grads = sharded(grads, ['data' if n > 1 else None])
    return jax.tree.map(jnp.add, acc, (aux, grads)), None

  with use_rules(loop_rules):  # what constrain() inside the model sees while the loop is traced
    # Sums in float32 at least (bfloat16 gradients would lose the small micro-batch terms).
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32)),
                         abstract)
    (aux, grads), _ = jax.lax.scan(body, zeros, micro)
  aux, grads = jax.tree.map(lambda x, a: x.sum(0).astype(a.dtype), (aux, grads), abstract)
  return aux, sharded(grads, [])


# ---------------------------------------------------------------------------------------------
# Processes.

_TRUE = ('1', 'true', 'yes', 'auto')


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment asks for it; returns whether
  this is a multi-process run. Call it first thing, before any other JAX call.

  Explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=n and JAX_PROCESS_ID=i (all
  three; JAX_COORDINATOR_BIND_ADDRESS is honoured). GEMMA_JAX_DISTRIBUTED=1 forces JAX's cluster
  auto-detection (TPU pod slices, Slurm, Open MPI, Kubernetes); =0 disables it. Without either,
  a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts), a Slurm job with several
  tasks or an Open MPI launch with several ranks is detected and initialised.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  flag = env.get('GEMMA_JAX_DISTRIBUTED', '').strip().lower()
  if flag in ('0', 'false', 'no'):
    return False
  explicit = {k: env.get(k) for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
                                      'JAX_PROCESS_ID')}
  given = [k for k, v in explicit.items() if v]
  if given and len(given) < 3:
    missing = [k for k in explicit if k not in given]
    raise ValueError(f'maybe_initialize_distributed: {given} set but {missing} missing; set all '
                     'three (or none, to let JAX auto-detect the cluster).')
  if given:
    try:
      num, pid = int(explicit['JAX_NUM_PROCESSES']), int(explicit['JAX_PROCESS_ID'])
    except ValueError:
      raise ValueError(f'maybe_initialize_distributed: JAX_NUM_PROCESSES and JAX_PROCESS_ID must '
                       f'be integers, got {explicit}.') from None
    if not 0 <= pid < num:
      raise ValueError(f'maybe_initialize_distributed: JAX_PROCESS_ID={pid} is not in [0, {num}).')
    jax.distributed.initialize(explicit['JAX_COORDINATOR_ADDRESS'], num, pid)
    return True
  detected = (flag in _TRUE
              or len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1
              or int(env.get('SLURM_NTASKS', '1') or 1) > 1
              or int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1)
  if detected:
    jax.distributed.initialize()
  return detected


def is_main_process() -> bool:
  """True on process 0: the one that logs, writes metrics and finalises checkpoints."""
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """A barrier across all JAX processes (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
