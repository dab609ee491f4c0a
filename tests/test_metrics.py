"""Properties of the training output: metrics.jsonl records, TensorBoard scalars, the progress
line (tokens/s and ETA after mark_start), truncation on resume, disabled writers, read_metric and
the loss-curve PNG."""

import json
import math
import os
import struct

import pytest

from gemma_jax import metrics
from gemma_jax.metrics import MetricsWriter, plot_loss_curve, read_metric


def _records(workdir):
  with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def _tb_scalars(workdir):
  """{(tag, step): value} of every scalar in WORKDIR/tensorboard (TFRecord framing, by hand)."""
  from tensorboardX.proto import event_pb2
  out = {}
  tb_dir = os.path.join(workdir, metrics.TB_DIR)
  for name in os.listdir(tb_dir):
    with open(os.path.join(tb_dir, name), 'rb') as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4  # length, its crc, payload, its crc
      for v in event.summary.value:
        out[(v.tag, event.step)] = v.simple_value
  return out


class _Clock:
  """A settable stand-in for the `time` module metrics.py reads."""

  def __init__(self, t=1000.0):
    self.t = t

  def time(self):
    return self.t


def test_writes_one_record_per_logged_step(tmp_path):
  """Each log_train / log_eval appends one JSON line with the step and float values."""
  w = MetricsWriter(str(tmp_path), total_steps=10)
  w.log_train(1, {'loss': 2.5, 'learning_rate': 1e-3, 'grad_norm': 0.5})
  w.log_train(2, {'loss': 2.0, 'learning_rate': 2e-3, 'grad_norm': 0.25})
  line = w.log_eval(2, {'loss': 1.75, 'accuracy': 0.5})
  w.close()
  assert _records(tmp_path) == [
      {'step': 1, 'loss': 2.5, 'learning_rate': 1e-3, 'grad_norm': 0.5},
      {'step': 2, 'loss': 2.0, 'learning_rate': 2e-3, 'grad_norm': 0.25},
      {'step': 2, 'eval_loss': 1.75, 'eval_accuracy': 0.5},
  ]
  assert line == 'eval @ step 2: loss 1.7500  accuracy 0.5000'


def test_writes_tensorboard_scalars(tmp_path):
  """With tensorboardX installed the same scalars land under train/ and eval/ tags."""
  pytest.importorskip('tensorboardX')
  w = MetricsWriter(str(tmp_path), total_steps=10)
  w.log_train(3, {'loss': 2.5, 'learning_rate': 1e-3})
  w.log_eval(3, {'loss': 1.5})
  w.close()
  scalars = _tb_scalars(tmp_path)
  assert scalars[('train/loss', 3)] == pytest.approx(2.5)
  assert scalars[('train/learning_rate', 3)] == pytest.approx(1e-3)
  assert scalars[('eval/loss', 3)] == pytest.approx(1.5)


def test_progress_line_with_throughput_and_eta(tmp_path, monkeypatch):
  """Before mark_start: step, loss, lr, grad_norm only; after: tokens/s and ETA from the clock."""
  clock = _Clock()
  monkeypatch.setattr(metrics, 'time', clock)
  w = MetricsWriter(str(tmp_path), total_steps=1000, tokens_per_step=4096)
  first = w.log_train(1, {'loss': 3.14159, 'learning_rate': 2.5e-4, 'grad_norm': 1.2345})
  assert first == 'step 1/1000  loss 3.1416  lr 2.50e-04  grad_norm 1.234'
  w.mark_start(1)
  clock.t += 4.0  # two steps in 4 s: 2 s/step, 2048 tokens/s, 997 steps left
  line = w.log_train(3, {'loss': 2.0, 'learning_rate': 3e-4, 'grad_norm': 0.5})
  assert line.startswith('step 3/1000  loss 2.0000  lr 3.00e-04  grad_norm 0.500')
  assert '2,048 tokens/s' in line and line.endswith('ETA 33:14')
  clock.t += 3600.0 * 2  # step 4 took two hours: the ETA uses the latest interval, h:mm:ss
  assert w.log_train(4, {'loss': 1.0}).endswith('ETA 1992:00:00')
  w.close()
  rec = _records(tmp_path)[1]
  assert rec['step_time_s'] == pytest.approx(2.0) and rec['tokens_per_s'] == pytest.approx(2048)
  assert 'tokens_per_s' not in _records(tmp_path)[0]


def test_progress_line_without_tokens_per_step_and_missing_values(tmp_path, monkeypatch):
  """No tokens_per_step: ETA only; lr and grad_norm absent print as nan."""
  clock = _Clock()
  monkeypatch.setattr(metrics, 'time', clock)
  w = MetricsWriter(str(tmp_path), total_steps=10)
  w.mark_start(0)
  clock.t += 30.0
  line = w.log_train(1, {'loss': 1.0})
  w.close()
  assert 'tokens/s' not in line and line.endswith('ETA 4:30')
  assert 'lr nan' in line and 'grad_norm nan' in line


def test_resume_drops_records_after_start_step(tmp_path):
  """A new writer at start_step 3 keeps records of steps <= 3 (train and eval) and appends."""
  w = MetricsWriter(str(tmp_path), total_steps=10)
  for step in range(1, 6):
    w.log_train(step, {'loss': 10.0 - step})
  w.log_eval(4, {'loss': 7.0})
  w.close()
  w = MetricsWriter(str(tmp_path), total_steps=10, start_step=3)
  assert [r['step'] for r in _records(tmp_path)] == [1, 2, 3]
  w.log_train(4, {'loss': 0.5})
  w.close()
  assert [(r['step'], r['loss']) for r in _records(tmp_path)] == [(1, 9.0), (2, 8.0), (3, 7.0),
                                                                  (4, 0.5)]


def test_disabled_writer_writes_nothing(tmp_path):
  """enabled=False (non-main processes) formats lines but creates no file or directory."""
  workdir = tmp_path / 'w'
  w = MetricsWriter(str(workdir), total_steps=10, enabled=False)
  assert w.log_train(1, {'loss': 1.0}).startswith('step 1/10  loss 1.0000')
  assert w.log_eval(1, {'loss': 2.0}) == 'eval @ step 1: loss 2.0000'
  w.close()
  assert not workdir.exists()


def test_read_metric(tmp_path):
  """The value of a key at a step; NaN for an absent step, key or file."""
  assert math.isnan(read_metric(str(tmp_path), 'loss', 1))
  w = MetricsWriter(str(tmp_path), total_steps=10)
  w.log_train(1, {'loss': 2.0})
  w.log_train(2, {'loss': 1.0})
  w.log_eval(2, {'loss': 1.5})
  w.close()
  assert read_metric(str(tmp_path), 'loss', 2) == 1.0
  assert read_metric(str(tmp_path), 'eval_loss', 2) == 1.5
  assert math.isnan(read_metric(str(tmp_path), 'loss', 3))
  assert math.isnan(read_metric(str(tmp_path), 'eval_loss', 1))


def test_plot_loss_curve_writes_a_png(tmp_path):
  """A PNG at WORKDIR/loss_curve.png from train and eval losses; None without metrics."""
  assert plot_loss_curve(str(tmp_path)) is None
  w = MetricsWriter(str(tmp_path), total_steps=10)
  for step in range(1, 6):
    w.log_train(step, {'loss': 5.0 / step})
  w.log_eval(5, {'loss': 1.2})
  w.close()
  out = plot_loss_curve(str(tmp_path))
  assert out == os.path.join(str(tmp_path), metrics.PLOT_FILE)
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
