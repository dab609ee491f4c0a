"""train.py with test hooks, for tests that stop a training job the way a preemption does.

Usage: python tests/train_hooked.py [train.py flags]   (run from the repository root)

Environment:
  HOOK_STEP_SLEEP=seconds    sleep before each step (a slow step, so that a signal sent at a random
                             time lands mid-run)
  HOOK_SIGTERM_AT_STEP=n     this process sends itself SIGTERM while it feeds the n-th step of
                             this run (so the job stops after that step); in a multi-process job,
                             set it on one process only
Everything else is train.py's own code: the signal goes through gemma_jax.preemption.
"""

import os
import pathlib
import runpy
import signal
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemma_jax import distributed  # noqa: E402

_sleep = float(os.environ.get('HOOK_STEP_SLEEP', '0'))
_sigterm_at = int(os.environ.get('HOOK_SIGTERM_AT_STEP', '0'))
_put_batch = distributed.put_batch
_steps = 0


def put_batch(*args, **kwargs):
  global _steps
  _steps += 1
  if _steps == _sigterm_at:
    os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(_sleep)
  return _put_batch(*args, **kwargs)


distributed.put_batch = put_batch
sys.argv = [str(ROOT / 'train.py')] + sys.argv[1:]
runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
