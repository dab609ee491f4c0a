"""Multi-process JAX: 2 CPU processes x 4 devices (jax.distributed on localhost) train exactly like
1 process x 8 devices.

Both runs execute tests/multiprocess_worker.py: two sharded AdamW steps of a tiny model on meshes
(2,2,2) (data split across the processes) and (1,8,1) (FSDP weights split across the processes),
each process feeding only its half of every batch.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

_TESTS = pathlib.Path(__file__).resolve().parent
_WORKER = _TESTS / 'multiprocess_worker.py'
_MESHES = ['2,2,2', '1,8,1']
_XLA = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(out_dir: pathlib.Path, devices: int, extra_env: dict[str, str]) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {_XLA}', **extra_env)
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    if k not in extra_env:
      env.pop(k, None)
  out_dir.mkdir(parents=True, exist_ok=True)
  log = open(out_dir / f'log{extra_env.get("JAX_PROCESS_ID", "")}.txt', 'w')
  return subprocess.Popen([sys.executable, str(_WORKER), str(out_dir), *_MESHES], cwd=_TESTS.parent,
                          env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs, out_dir, timeout=600):
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = '\n'.join(f.read_text()[-3000:] for f in sorted(out_dir.glob('log*.txt')))
  assert all(p.returncode == 0 for p in procs), f'worker failed:\n{logs}'
  return dict(np.load(out_dir / 'results.npz'))


def test_two_processes_equal_one_process(tmp_path):
  port = _free_port()
  address = f'127.0.0.1:{port}'
  workers = [_launch(tmp_path / 'multi', 4, {'JAX_COORDINATOR_ADDRESS': address,
                                              'JAX_COORDINATOR_BIND_ADDRESS': address,
                                              'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)})
             for i in range(2)]
  single = _launch(tmp_path / 'single', 8, {})
  got = _wait(workers, tmp_path / 'multi')
  want = _wait([single], tmp_path / 'single')
  assert sorted(got) == sorted(want) and len(want) > 2 * len(_MESHES)
  for mesh in _MESHES:
    np.testing.assert_allclose(got[f'{mesh}/losses'], want[f'{mesh}/losses'], rtol=1e-5)
    assert want[f'{mesh}/losses'][1] < want[f'{mesh}/losses'][0]
  for key in want:
    a, b = got[key], want[key]
    assert a.shape == b.shape, key
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= 1e-5, f'{key}: relative difference {err:.2e}'
