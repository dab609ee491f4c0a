"""One process of tests/test_multiprocess.py: two sharded AdamW steps per mesh, results to a file.

Usage: python tests/multiprocess_worker.py OUT_DIR MESH [MESH ...]   (MESH like 2,2,2)
Multi-process when JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are set (read by
gemma_jax.distributed.maybe_initialize_distributed); XLA_FLAGS sets the CPU device count. Each
process feeds only its own rows of every batch. Process 0 writes OUT_DIR/results.npz: per mesh,
the two losses and every updated parameter gathered from all processes.
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))        # tests/
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository

from gemma_jax import distributed as dist  # noqa: E402
from gemma_jax import sharding as sh  # noqa: E402

# Before any other JAX call: joins the other processes when the environment says so.
distributed = dist.maybe_initialize_distributed()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from _sharded_cases import run_training  # noqa: E402


def main(out_dir: str, meshes: list[str]) -> None:
  expected = int(os.environ.get('JAX_NUM_PROCESSES', '1'))
  assert jax.process_count() == expected, (jax.process_count(), expected)
  assert distributed == (expected > 1)
  assert jax.device_count() == 8, jax.device_count()
  results = {}
  for spec in meshes:
    shape = tuple(int(s) for s in spec.split(','))
    losses, params = run_training(sh.make_mesh(dict(zip(sh.MESH_AXES, shape))))
    results[f'{spec}/losses'] = np.asarray(losses)
    flat = {'.'.join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
    for name, value in multihost_utils.process_allgather(flat, tiled=True).items():
      results[f'{spec}/{name}'] = np.asarray(value)
  if dist.is_main_process():
    np.savez(pathlib.Path(out_dir) / 'results.npz', **results)
  multihost_utils.sync_global_devices('done')  # nobody exits while another still needs it


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
