"""Train-state checkpoints: sealed with manifests, damage found and skipped on resume, the last good
one never deleted before a newer one is sealed, and failed saves that lose nothing."""

import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_jax import train_checkpoints as tc
from gemma_jax import trainer
from test_trainer import small_config


def _state(step):
  return {'step': jnp.int32(step), 'params': {'w': jnp.full((64, 64), float(step))},
          'rng': jax.random.PRNGKey(step)}


def _save(ckpts, step, **kw):
  ckpts.save(step, _state(step), {'position': step}, {'steps': 8}, **kw)


def _restore(ckpts, step):
  abstract = jax.eval_shape(lambda: _state(0))
  one = NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ('x',)), P())
  state, data = ckpts.restore(step, abstract, jax.tree.map(lambda _: one, abstract))
  return int(state['step']), data['position']


def _biggest_file(directory):
  files = [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names
           if n != tc.MANIFEST_FILE]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _biggest_file(step_dir)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_bit(step_dir):
  path = _biggest_file(step_dir)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


def test_manifest_finds_truncation_bit_flips_and_missing_files(tmp_path):
  for name in ('a', 'b/c'):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(os.urandom(5000))
  assert 'no manifest' in tc.verify_manifest(str(tmp_path))
  tc.write_manifest(str(tmp_path))
  assert tc.verify_manifest(str(tmp_path)) is None
  data = (tmp_path / 'a').read_bytes()
  (tmp_path / 'a').write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  assert 'a fails its CRC-32 check' in tc.verify_manifest(str(tmp_path))
  (tmp_path / 'a').write_bytes(data[:100])
  assert 'a has 100 bytes, 5000 were written' in tc.verify_manifest(str(tmp_path))
  (tmp_path / 'a').write_bytes(data)
  os.remove(tmp_path / 'b' / 'c')
  assert 'b/c is missing' in tc.verify_manifest(str(tmp_path))
  (tmp_path / tc.MANIFEST_FILE).write_text('{"files": ')
  assert 'manifest is unreadable' in tc.verify_manifest(str(tmp_path))


@pytest.mark.parametrize('damage', [_truncate, _flip_bit])
def test_damaged_newest_is_reported_moved_aside_and_the_previous_restored(tmp_path, damage):
  said = []
  ckpts = tc.TrainCheckpoints(str(tmp_path), keep=3, say=said.append)
  for step in (2, 4, 6):
    _save(ckpts, step)
  ckpts.wait()
  assert ckpts.steps() == [2, 4, 6] and all(ckpts.sealed(s) for s in (2, 4, 6))
  damage(os.path.join(ckpts.directory, '6'))
  ckpts.close()

  ckpts = tc.TrainCheckpoints(str(tmp_path), keep=3, say=said.append)
  assert ckpts.restorable_step() == 4
  assert len(said) == 1 and said[0].startswith('Checkpoint at step 6 is damaged:'), said
  assert os.path.isdir(os.path.join(ckpts.directory, '6' + tc.DAMAGED_SUFFIX))
  assert ckpts.steps() == [2, 4] and _restore(ckpts, 4) == (4, 4)
  _save(ckpts, 6, wait=True)  # the job saves step 6 again, over nothing
  assert ckpts.restorable_step() == 6

  for step in (2, 4, 6):
    damage(os.path.join(ckpts.directory, str(step)))
  with pytest.raises(tc.CheckpointError, match='No usable checkpoint in .*every one is damaged'):
    tc.TrainCheckpoints(str(tmp_path), keep=3, say=said.append).restorable_step()


def test_keep_one_deletes_the_old_step_only_after_the_new_one_is_sealed(tmp_path, monkeypatch):
  ckpts = tc.TrainCheckpoints(str(tmp_path), keep=1, say=print)
  _save(ckpts, 2, wait=True)
  _save(ckpts, 4, wait=True)
  assert ckpts.steps() == [4]  # sealed 4, then deleted 2

  # Sealing step 6 fails (disk full while writing its manifest): step 4 must survive it.
  def disk_full(directory):
    raise OSError(errno.ENOSPC, 'No space left on device', directory)
  monkeypatch.setattr(tc, 'write_manifest', disk_full)
  with pytest.raises(tc.CheckpointSaveError,
                     match=r'step 6 .*No space left on device.*kept \(newest: step 4\)'):
    _save(ckpts, 6, wait=True)
  assert ckpts.latest() == 4 and tc.verify_manifest(os.path.join(ckpts.directory, '4')) is None
  monkeypatch.undo()
  assert tc.TrainCheckpoints(str(tmp_path), keep=1, say=print).restorable_step() == 4


def test_a_failed_save_stops_the_job_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
  """Disk full at the save of step 4: the job stops with CheckpointSaveError naming the step and
  the cause, step 2 stays intact, and the rerun resumes from it and finishes."""
  workdir = str(tmp_path / 'run')
  c = small_config(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=1, eval_every=0)
  real = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  with pytest.raises(tc.CheckpointSaveError,
                     match=r'step 4 .*No space left on device.*kept \(newest: step 2\)'):
    trainer.train(c, workdir)
  monkeypatch.undo()
  assert tc.TrainCheckpoints(workdir, keep=1).steps() == [2]
  capsys.readouterr()
  result = trainer.train(c, workdir)
  assert 'Resuming from the checkpoint at step 2' in capsys.readouterr().out
  assert np.isfinite(result['train']['loss'])
