"""gemma_jax.distributed without a mesh: start-up from the environment, gradient accumulation.

Batches placed per process, accumulation on meshes and 2 processes x 4 devices are tested in
tests/_sharded_cases.py (via tests/test_sharding.py) and tests/test_multiprocess.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import distributed as dist


def test_maybe_initialize_distributed_reads_the_environment(monkeypatch):
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_NTASKS',
            'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES', 'GEMMA_JAX_DISTRIBUTED'):
    monkeypatch.delenv(k, raising=False)
  assert dist.maybe_initialize_distributed() is False  # plain single-process run
  assert dist.is_main_process()
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'localhost:1234')
  with pytest.raises(ValueError, match=r"\['JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'\] missing"):
    dist.maybe_initialize_distributed()
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '2')
  with pytest.raises(ValueError, match=r'JAX_PROCESS_ID=2 is not in \[0, 2\)'):
    dist.maybe_initialize_distributed()
  monkeypatch.setenv('GEMMA_JAX_DISTRIBUTED', '0')
  assert dist.maybe_initialize_distributed() is False


def test_accumulate_gradients_without_a_mesh_equals_the_full_batch():
  params = {'w': jax.random.normal(jax.random.key(0), (3, 5))}
  batch = {'x': jax.random.normal(jax.random.key(1), (8, 3)), 'y': jnp.arange(8.0)[:, None]}

  def grad_fn(p, b):  # loss normalised by the whole batch's 8 rows, as the trainer does
    return jax.value_and_grad(lambda p: jnp.sum((b['x'] @ p['w'] - b['y']) ** 2) / 8)(p)

  want_loss, want = grad_fn(params, batch)
  loss, grads = jax.jit(lambda p, b: dist.accumulate_gradients(grad_fn, p, b, 4))(params, batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grads['w'], want['w'], rtol=1e-5)
  with pytest.raises(ValueError, match=r'batch of 8 rows does not split into 3 micro-batches'):
    dist.accumulate_gradients(grad_fn, params, batch, 3)
