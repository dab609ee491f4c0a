"""Preemption: SIGTERM (and a first SIGINT) ask a training job to stop cleanly at a step boundary.

Preemptible TPU VMs and spot GPUs send SIGTERM and give the process seconds to live. Inside
`StopSignals`, the first SIGTERM or SIGINT only records itself; the training loop asks
`should_stop()` after every step, and when it says so writes a checkpoint at that step, waits for
it, and exits with `EXIT_CODE`. Rerunning the same command resumes from that step. A second SIGINT
(Ctrl-C twice) interrupts at once, as Python normally does.

With several processes the stop must happen at the same step everywhere, or the checkpoint would
be incomplete: `should_stop()` then all-gathers every process's flag (one tiny cross-process
collective per step), so a signal that reached only some processes stops all of them at the step
where the first of them saw it.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": the job stopped on a
# signal after saving a checkpoint at the step it reached, and rerunning it resumes from there.
EXIT_CODE = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Context manager: while inside, SIGTERM and a first SIGINT set a flag instead of killing.

  Signal handlers can only be installed from the main thread; elsewhere (e.g. a job started from
  a worker thread) the signals keep their usual effect and `should_stop()` is False unless
  `request()` was called.
  """

  def __init__(self):
    self.received: int | None = None  # the first signal number received, None if none
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    if signum == signal.SIGINT and self.received is not None:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
    if self.received is None:
      self.received = signum

  def request(self, signum: int = signal.SIGTERM) -> None:
    """Records a stop request as if `signum` had arrived."""
    if self.received is None:
      self.received = signum

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received is not None else ''

  def should_stop(self) -> bool:
    """Whether this job stops after the current step: in a multi-process job, True in every
    process as soon as any process received a signal. Call it at the same step in every process
    (it is a collective there)."""
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.array(local, np.int32))
    return bool(np.any(flags))


class Preempted(Exception):
  """The job stopped on SIGTERM/SIGINT after saving a checkpoint at `step` (raised by
  trainer.train; train.py exits with EXIT_CODE). Rerunning resumes there."""

  def __init__(self, step: int, signal_name: str, directory: str, saved: bool = True):
    if saved:
      text = f'after step {step}; its checkpoint is saved in {directory}'
    else:  # before the first step of this run: nothing new to save
      text = f'before step {step + 1}; nothing new to save'
    super().__init__(f'Stopped by {signal_name} {text}. Rerun the same command to resume from '
                     f'{"step " + str(step) if step else "the start"}.')
    self.step = step
