"""StopSignals: SIGTERM and a first SIGINT are recorded, a second SIGINT interrupts, and the
previous handlers come back afterwards. (A whole job stopped by SIGTERM: tests/test_train_cli.py,
tests/test_elastic.py.)"""

import os
import signal

import pytest

from gemma_jax import preemption


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_recorded_instead_of_killing(sig):
  before = signal.getsignal(sig)
  with preemption.StopSignals() as signals:
    assert not signals.should_stop()
    os.kill(os.getpid(), sig)
    assert signals.should_stop() and signals.name == signal.Signals(sig).name
    os.kill(os.getpid(), signal.SIGTERM)  # a later SIGTERM changes nothing
    assert signals.received == sig
  assert signal.getsignal(sig) is before


def test_a_second_ctrl_c_interrupts_at_once():
  before = signal.getsignal(signal.SIGINT)  # (pytest-xdist's workers ignore SIGINT)
  with preemption.StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.should_stop()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      signal.sigtimedwait([], 0.1)  # a point where Python runs the handler
  assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_during_set_up_stops_before_the_first_step(tmp_path, monkeypatch):
  """A signal while the job loads its weights: Preempted before step 1, nothing saved, and the
  rerun starts from the beginning."""
  from gemma_jax import initial_weights, trainer
  from test_trainer import small_config
  real = initial_weights.model_and_tokenizer

  def loading(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  monkeypatch.setattr(initial_weights, 'model_and_tokenizer', loading)
  workdir = str(tmp_path / 'run')
  c = small_config(tmp_path, steps=2, eval_every=0)
  with pytest.raises(trainer.Preempted, match='SIGTERM before step 1; nothing new to save. '
                                              'Rerun the same command to resume from the start'):
    trainer.train(c, workdir)
  assert not os.listdir(os.path.join(workdir, 'checkpoints'))
