"""Training output: the progress line, `metrics.jsonl`, TensorBoard event files, the loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

from absl import logging

METRICS_FILE = 'metrics.jsonl'
PLOT_FILE = 'loss_curve.png'
TB_DIR = 'tensorboard'


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class MetricsWriter:
  """Writes one JSON object per logged step to WORKDIR/metrics.jsonl and the same scalars to
  TensorBoard (WORKDIR/tensorboard); prints the progress line.

  On resume from step `start_step`, records of later steps (written by the interrupted run after
  its last checkpoint) are dropped so that the file describes exactly one run.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, *,
               tokens_per_step: int = 0, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled  # False on processes other than the main one: format, write nothing
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = self._tb = None
    self._last_time = None
    self._last_step = start_step
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(start_step)
    self._file = open(self.path, 'a')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, TB_DIR))
    except ImportError:
      logging.warning('tensorboardX is not installed: no TensorBoard event files.')

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line).get('step', 0) <= step]
    with open(self.path, 'w') as f:
      f.writelines(kept)

  def mark_start(self, step: int) -> None:
    """Starts the clock for tokens/s and ETA (call after the first step compiled)."""
    self._last_time = time.time()
    self._last_step = step

  def log_train(self, step: int, metrics: Mapping[str, float]) -> str:
    """Records `metrics` of `step` (1-based: steps done) and returns the progress line."""
    now = time.time()
    record: dict[str, Any] = {'step': step, **{k: float(v) for k, v in metrics.items()}}
    line = (f'step {step}/{self.total_steps}  loss {record["loss"]:.4f}  '
            f'lr {record.get("learning_rate", float("nan")):.2e}  '
            f'grad_norm {record.get("grad_norm", float("nan")):.3f}')
    if 'reward' in record:  # an RL objective's headline
      line += f'  reward {record["reward"]:.3f}'
    if self._last_time is not None and step > self._last_step:
      dt = (now - self._last_time) / (step - self._last_step)
      record['step_time_s'] = dt
      if self.tokens_per_step:
        record['tokens_per_s'] = self.tokens_per_step / dt
        line += f'  {record["tokens_per_s"]:,.0f} tokens/s'
      line += f'  ETA {_fmt_duration(dt * (self.total_steps - step))}'
      self._last_time, self._last_step = now, step
    self._write(record, prefix='train')
    return line

  def log_eval(self, step: int, metrics: Mapping[str, float]) -> str:
    """Records held-out metrics of `step` (keys prefixed 'eval_') and returns a summary line."""
    record = {'step': step, **{f'eval_{k}': float(v) for k, v in metrics.items()}}
    self._write(record, prefix='eval')
    return f'eval @ step {step}: ' + '  '.join(f'{k} {float(v):.4f}' for k, v in metrics.items())

  def _write(self, record: Mapping[str, Any], prefix: str) -> None:
    if self._file is None:
      return
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ('step', 'batch_crc32'):  # the batch's checksum is a record, not a curve
          self._tb.add_scalar(f'{prefix}/{k.removeprefix("eval_")}', v, record['step'])
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metric(workdir: str, key: str, step: int) -> float:
  """The value of `key` recorded at `step` in metrics.jsonl (NaN when absent)."""
  path = os.path.join(workdir, METRICS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if r.get('step') == step and key in r:
          return float(r[key])
  return float('nan')


def plot_loss_curve(workdir: str) -> str | None:
  """Draws train (and eval) loss against step from metrics.jsonl into WORKDIR/loss_curve.png (for
  an RL objective, whose loss is no measure of progress, the mean reward instead)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  with open(path) as f:
    records = [json.loads(line) for line in f]
  key = 'reward' if any('reward' in r for r in records) else 'loss'
  train = [(r['step'], r[key]) for r in records if key in r]
  evals = [(r['step'], r[f'eval_{key}']) for r in records if f'eval_{key}' in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label=f'train {key}')
  if evals:
    ax.plot(*zip(*evals), 'o-', label=f'eval {key}')
  ax.set_xlabel('step')
  if key == 'loss':
    ax.set_ylabel('loss (cross-entropy: nats / target token)')
  else:
    ax.set_ylabel('mean reward')
  if all(v > 0 for _, v in train + evals):
    ax.set_yscale('log')
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  out = os.path.join(workdir, PLOT_FILE)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
