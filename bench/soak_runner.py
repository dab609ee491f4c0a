"""train.py with a SIGKILL timed inside one of its checkpoint saves, for bench/soak.py.

  SOAK_KILL_PHASE=write SOAK_KILL_SAVE=2 SOAK_KILL_DELAY=0.05 \
      python bench/soak_runner.py [train.py flags]        (from the repository root)

Environment:
  SOAK_KILL_SAVE=k     the save to die in: the k-th `TrainCheckpoints.save` of this process
  SOAK_KILL_PHASE      where in that save:
    write    SOAK_KILL_DELAY seconds after the save started (Orbax is copying the state off the
             device or writing it in its background thread, or has just finished)
    seal     just before its manifest is written (its files are complete, the step unsealed)
    sealed   just after its manifest is written (before Orbax renames the step directory)
    prune    when the first older step is deleted after it was sealed
Before dying the process prints `soak_runner: SIGKILL <where>: step N (PHASE)` on stderr, N being
the step of the target save. Everything
else is train.py's own code, run with the same flags.
"""

import os
import pathlib
import runpy
import signal
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orbax.checkpoint as ocp  # noqa: E402

from gemma_jax import train_checkpoints  # noqa: E402

PHASES = ('write', 'seal', 'sealed', 'prune')
_phase = os.environ['SOAK_KILL_PHASE']
_target = int(os.environ['SOAK_KILL_SAVE'])
_delay = float(os.environ.get('SOAK_KILL_DELAY', '0'))
if _phase not in PHASES:
  sys.exit(f'soak_runner: SOAK_KILL_PHASE={_phase!r} is not one of {PHASES}')
_saves = 0
_armed = None  # the step of the target save, once it started


def _die(where: str) -> None:
  sys.stderr.write(f'soak_runner: SIGKILL {where}: step {_armed} ({_phase})\n')
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


_save = train_checkpoints.TrainCheckpoints.save


def save(self, step, *args, **kwargs):
  global _saves, _armed
  _saves += 1
  if _saves == _target and _armed is None:
    self.wait()  # the previous save finishes (and is sealed and pruned) before arming
    _armed = step
    if _phase == 'write':
      threading.Timer(_delay, _die, (f'{_delay:.3f}s after the save started',)).start()
  return _save(self, step, *args, **kwargs)


_write_manifest = train_checkpoints.write_manifest


def write_manifest(directory):
  if _armed is not None and _phase == 'seal':
    _die('before sealing')
  _write_manifest(directory)
  if _armed is not None and _phase == 'sealed':
    _die('after sealing')


_delete = ocp.CheckpointManager.delete


def delete(self, step):
  if _armed is not None and _phase == 'prune':
    _die(f'deleting step {step} after sealing')
  return _delete(self, step)


train_checkpoints.TrainCheckpoints.save = save
train_checkpoints.write_manifest = write_manifest
ocp.CheckpointManager.delete = delete
sys.argv = [str(ROOT / 'train.py')] + sys.argv[1:]
runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
