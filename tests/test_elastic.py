"""Preemption of a multi-process job and elastic resume: a job stopped by SIGTERM on 2 processes x
4 CPU devices resumes on the same slice (exactly the metrics of an uninterrupted run there), on 1
process x 4 devices and on 2 processes x 2 devices (the same global batch, the same examples at
every step, and the losses of the uninterrupted run up to float summation order).

Every run is `tests/train_hooked.py` (train.py with test hooks) in its own processes, with
XLA_FLAGS setting the CPU device count; the multi-process ones join through jax.distributed on
localhost.
"""

import json
import os
import pathlib
import shutil
import sys

import numpy as np

from gemma_jax import preemption
from processes import finish, launch

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / 'configs' / 'quickstart.py'
_STOP = 4


def _overrides(tmp_path, mesh):
  train = tmp_path / 'train.jsonl'
  if not train.exists():
    with open(ROOT / 'data' / 'quickstart_train.jsonl') as f:
      train.write_text(''.join(next(f) for _ in range(48)))
  data, fsdp = mesh
  return {'steps': 8, 'batch_size': 8, 'seq_len': 32, 'model.preset': 'tiny-gemma1',
          'checkpoint_every': 100, 'keep_checkpoints': 2, 'log_every': 1, 'eval_every': 0,
          'exact_match.examples': 0, 'data.path': str(train), 'optimizer.warmup_steps': 2,
          'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': 1}


def _launch(tmp_path, workdir, *, processes, devices, mesh, hooks=None):
  """Starts one run of train.py (with test hooks) on `processes` x `devices` CPU devices."""
  args = [f'--config={QUICKSTART}', f'--workdir={workdir}'] + [
      f'--config.{k}={v}' for k, v in _overrides(tmp_path, mesh).items()]
  logs = [pathlib.Path(f'{workdir}.log{i}') for i in range(processes)]
  env = [(hooks or {}).get(i, {}) for i in range(processes)]
  return logs, launch([sys.executable, 'tests/train_hooked.py', *args], logs, devices, env)


def _finish(run):
  return finish(run[1], run[0])


def _values(record):
  return {k: v for k, v in record.items() if k not in ('step_time_s', 'tokens_per_s')}


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if 'loss' in r]


def test_sigterm_on_one_process_stops_both_and_resumes_on_other_slices(tmp_path):
  mesh = (2, 4)
  straight = tmp_path / 'straight'
  preempted = tmp_path / 'preempted'
  runs = [_launch(tmp_path, straight, processes=2, devices=4, mesh=mesh),
          # Only process 1 receives SIGTERM, after step 4: both must stop there, saved.
          _launch(tmp_path, preempted, processes=2, devices=4, mesh=mesh,
                  hooks={1: {'HOOK_SIGTERM_AT_STEP': str(_STOP)}})]
  codes, logs = _finish(runs[0])
  assert codes == [0, 0], logs
  codes, logs = _finish(runs[1])
  assert codes == [preemption.EXIT_CODE] * 2, logs
  assert f'Stopped by SIGTERM after step {_STOP}' in logs
  entries = os.listdir(preempted / 'checkpoints')
  assert sorted(d for d in entries if d.isdigit()) == [str(_STOP)], entries

  # Resume copies of it on the same slice, on 4 devices (fsdp 4), and on 2 processes x 2 devices.
  resumes = {'2x4': dict(processes=2, devices=4, mesh=mesh),
             '1x4': dict(processes=1, devices=4, mesh=(1, 4)),
             '2x2': dict(processes=2, devices=2, mesh=(1, 4))}
  procs = {}
  for name, kw in resumes.items():
    shutil.copytree(preempted, tmp_path / name)
    procs[name] = _launch(tmp_path, tmp_path / name, **kw)
  want = _records(straight)
  assert [r['step'] for r in want] == list(range(1, 9))
  for name, run in procs.items():
    codes, logs = _finish(run)
    assert codes == [0] * len(codes), f'{name}:\n{logs}'
    assert f'Resuming from the checkpoint at step {_STOP}' in logs, logs
    got = _records(tmp_path / name)
    assert [r['step'] for r in got] == list(range(1, 9)), name
    # The same examples at every step, from the data iterator's own record.
    assert [r['batch_crc32'] for r in got] == [r['batch_crc32'] for r in want], name
    if name == '2x4':  # the slice of the uninterrupted run: exactly its metrics
      assert [_values(r) for r in got] == [_values(r) for r in want], name
    for g, w in zip(got, want):
      for key in ('loss', 'grad_norm', 'target_tokens'):
        np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f'{name} {g["step"]} {key}')


def test_a_batch_the_new_slice_cannot_split_fails_before_compute(tmp_path):
  """Resuming with batch_size 8 on 3 processes: a clear error before anything is built."""
  workdir = tmp_path / 'run'
  procs = _launch(tmp_path, workdir, processes=3, devices=1, mesh=(1, -1))
  codes, logs = _finish(procs)
  assert set(codes) == {1}, logs
  assert 'config.batch_size=8 does not split evenly over the 3 processes' in logs, logs
  assert 'Traceback' not in logs and not (workdir / 'checkpoints').exists()
