"""Multi-process JAX: 2 CPU processes x 4 devices (jax.distributed on localhost) train exactly like
1 process x 8 devices.

Both runs execute tests/multiprocess_worker.py: two sharded AdamW steps of a tiny model on meshes
(2,2,2) (data split across the processes) and (1,8,1) (FSDP weights split across the processes),
each process feeding only its half of every batch.
"""

import pathlib
import sys

import numpy as np

from processes import finish, launch

_TESTS = pathlib.Path(__file__).resolve().parent
_WORKER = _TESTS / 'multiprocess_worker.py'
_MESHES = ['2,2,2', '1,8,1']


def _start(out_dir: pathlib.Path, processes: int, devices: int):
  logs = [out_dir / f'log{i}.txt' for i in range(processes)]
  return out_dir, logs, launch([sys.executable, str(_WORKER), str(out_dir), *_MESHES], logs,
                               devices)


def _results(out_dir, logs, procs) -> dict[str, np.ndarray]:
  codes, output = finish(procs, logs)
  assert codes == [0] * len(procs), f'worker failed:\n{output}'
  return dict(np.load(out_dir / 'results.npz'))


def test_two_processes_equal_one_process(tmp_path):
  multi, single = _start(tmp_path / 'multi', 2, 4), _start(tmp_path / 'single', 1, 8)
  got, want = _results(*multi), _results(*single)
  assert sorted(got) == sorted(want) and len(want) > 2 * len(_MESHES)
  for mesh in _MESHES:
    np.testing.assert_allclose(got[f'{mesh}/losses'], want[f'{mesh}/losses'], rtol=1e-5)
    assert want[f'{mesh}/losses'][1] < want[f'{mesh}/losses'][0]
  for key in want:
    a, b = got[key], want[key]
    assert a.shape == b.shape, key
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= 1e-5, f'{key}: relative difference {err:.2e}'
