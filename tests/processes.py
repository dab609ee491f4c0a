"""Starting JAX jobs as separate processes in tests: CPU device counts, jax.distributed on localhost.

    procs = launch([sys.executable, 'script.py', ...], logs=[path0, path1], devices=4)
    codes, output = finish(procs, logs)

`launch` starts one process per log path; with more than one they join one jax.distributed job
(a free localhost port; JAX_PROCESS_ID 0, 1, ..). Each sees `devices` simulated CPU devices,
compiled with XLA's cheap CPU settings (tests compile far more than they run).
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
from collections.abc import Mapping, Sequence

# Tests compile far more than they run: XLA's cheap CPU compile settings (tests/conftest.py sets
# them for the test processes too).
CHEAP_XLA = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(argv: Sequence[str], logs: Sequence[pathlib.Path], devices: int,
           env: Sequence[Mapping[str, str]] | None = None) -> list[subprocess.Popen]:
  """Starts len(logs) processes of `argv` (one jax.distributed job when more than one), each
  writing stdout and stderr to its log; `env[i]` adds variables to process i."""
  address = f'127.0.0.1:{free_port()}'
  procs = []
  for i, log in enumerate(logs):
    e = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {CHEAP_XLA}')
    for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
      e.pop(k, None)
    if len(logs) > 1:
      e.update(JAX_COORDINATOR_ADDRESS=address, JAX_COORDINATOR_BIND_ADDRESS=address,
               JAX_NUM_PROCESSES=str(len(logs)), JAX_PROCESS_ID=str(i))
    e.update((env or [{}] * len(logs))[i])
    pathlib.Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, 'w') as f:
      procs.append(subprocess.Popen(list(argv), cwd=ROOT, env=e, stdout=f,
                                    stderr=subprocess.STDOUT))
  return procs


def finish(procs: Sequence[subprocess.Popen], logs: Sequence[pathlib.Path],
           timeout: float = 600) -> tuple[list[int], str]:
  """Waits for every process (killing those still running after `timeout` seconds); returns
  their exit codes and the tails of their logs."""
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return ([p.returncode for p in procs],
          '\n'.join(pathlib.Path(log).read_text()[-3000:] for log in logs))
