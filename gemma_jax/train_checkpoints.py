"""Train-state checkpoints a job can trust: WORKDIR/checkpoints, sealed, verified, never lost.

Each saved step is one Orbax step directory holding the train state (step, params, optimiser
state, rng; not a LoRA job's frozen base nor a reference copy: both are the initial weights, read
from model.init again on resume), the data-iterator state and the config. On top of Orbax:

- **Sealing.** When a save's files are all written, the main process writes a manifest into the
  step directory: every file's size and CRC-32 (`MANIFEST_FILE`). It is written from Orbax's
  post-finalization callback, in the background thread of the asynchronous save, so training
  does not wait for it. A step whose save never finished has no manifest.
- **Verification.** Before a rerun resumes, the newest step is checked against its manifest (a
  missing, truncated or changed file fails); a damaged one is reported by step and reason, moved
  aside to `STEP.damaged` (kept for inspection, never restored) and the next older one is tried.
  With none left, `CheckpointError` says what was found. CRC-32 catches damage (truncation, bit
  rot, a partial copy), not deliberate tampering. Checkpoints written before manifests existed
  (none in the directory has one) are restored unverified, with a warning.
- **Keeping.** Orbax deletes nothing itself (`max_to_keep=None`): old steps are deleted only
  after a newer one is sealed, keeping the newest `keep` sealed steps, so the last good
  checkpoint survives any failure of a newer save, even with `keep=1`.
- **Failures.** A save that fails (disk full, unwritable directory, ...) raises
  `CheckpointSaveError` naming the step and the cause; the previous checkpoints are untouched.

The manifest is read and written with local file operations, so WORKDIR must be a local or
mounted file system (as for the rest of the trainer's outputs).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from gemma_jax.distributed import is_main_process, sync_processes

TRAIN_CHECKPOINT_DIR = 'checkpoints'  # under a training job's workdir
MANIFEST_FILE = 'manifest.gemma_jax.json'
# Orbax's step bookkeeping, rewritten when the step directory is committed (after the manifest):
# not part of the manifest. The items' own files (state/, data/, config/) all are.
_BOOKKEEPING = ('_CHECKPOINT_METADATA', 'commit_success.txt')
DAMAGED_SUFFIX = '.damaged'
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
  """No checkpoint in the directory can be restored (each is named with what is wrong)."""


class CheckpointSaveError(RuntimeError):
  """A save failed; the checkpoints saved before it are kept."""


# ---------------------------------------------------------------------------------------------
# Manifests.


def _crc32(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(directory: str) -> list[str]:
  out = []
  for root, _, names in os.walk(directory):
    out += [os.path.relpath(os.path.join(root, n), directory) for n in names]
  return sorted(f for f in out if f != MANIFEST_FILE and f not in _BOOKKEEPING)


def write_manifest(directory: str) -> None:
  """Seals `directory`: writes MANIFEST_FILE with the size and CRC-32 of every other file in it
  (atomically: a partial manifest is never seen)."""
  files = {}
  for rel in _files(directory):
    path = os.path.join(directory, rel)
    files[rel] = {'bytes': os.path.getsize(path), 'crc32': _crc32(path)}
  tmp = os.path.join(directory, MANIFEST_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump({'format': 1, 'files': files}, f, indent=0)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, MANIFEST_FILE))


def verify_manifest(directory: str) -> str | None:
  """None when every file listed in `directory`'s manifest is there, whole and unchanged;
  otherwise what is wrong, in words."""
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.exists(path):
    return 'it has no manifest: its save never finished'
  try:
    with open(path) as f:
      files = json.load(f)['files']
    items = sorted((str(k), int(v['bytes']), int(v['crc32'])) for k, v in files.items())
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f'its manifest is unreadable ({type(e).__name__}: {e})'
  for rel, size, crc in items:
    full = os.path.join(directory, rel)
    if not os.path.isfile(full):
      return f'{rel} is missing'
    actual = os.path.getsize(full)
    if actual != size:
      return f'{rel} has {actual} bytes, {size} were written'
    if _crc32(full) != crc:
      return f'{rel} fails its CRC-32 check (its bytes changed since it was written)'
  return None


# ---------------------------------------------------------------------------------------------
# The job's checkpoints.


def _saved(state: Mapping[str, Any]) -> dict[str, Any]:
  """The checkpointed part of a train state: not the initial weights a job re-reads."""
  return {k: v for k, v in state.items() if k not in ('frozen', 'reference')}


class TrainCheckpoints:
  """WORKDIR/checkpoints of one training job (see the module docstring).

  Every process constructs it and calls its methods at the same points (Orbax's saves and
  deletions are collective); only the main process writes manifests and prints.
  """

  def __init__(self, workdir: str, keep: int, say: Callable[[str], None] = print):
    self.directory = os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINT_DIR)
    self.keep = keep
    self._say = say
    self._saving: int | None = None  # the step whose asynchronous save may be in flight
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_saving))
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """Steps saved completely (by Orbax), oldest first; sealed or not."""
    return sorted(self._manager.all_steps())

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def sealed(self, step: int) -> bool:
    return os.path.exists(os.path.join(self._path(step), MANIFEST_FILE))

  def latest(self) -> int | None:
    """The newest sealed step (None if none)."""
    sealed = [s for s in self.steps() if self.sealed(s)]
    return sealed[-1] if sealed else None

  def _seal_saving(self) -> None:
    """Orbax's post-finalization callback (main process, background thread): seals the step
    being saved, in its temporary directory when Orbax has not renamed it yet."""
    step = self._saving
    if step is None:
      return
    tmp = [n for n in os.listdir(self.directory)
           if n.startswith(f'{step}.orbax-checkpoint-tmp')]
    write_manifest(os.path.join(self.directory, tmp[0]) if tmp else self._path(step))

  def _failed(self, step: int | None, e: Exception) -> CheckpointSaveError:
    kept = self.latest()
    return CheckpointSaveError(
        f'Saving the checkpoint of step {step} in {self.directory} failed: {type(e).__name__}: '
        f'{e}. The checkpoints saved before it are kept (newest: '
        f'{"step " + str(kept) if kept is not None else "none"}); free disk space or fix the '
        'directory, then rerun the same command to resume.')

  def save(self, step: int, state: Mapping[str, Any], data_state: Any,
           config: Mapping[str, Any], *, wait: bool = False) -> None:
    """Saves `state` (without 'frozen'), the data-iterator state and the config (a plain dict)
    at `step`, asynchronously unless `wait`. Waits for the previous save first."""
    self.wait()
    self._saving = step
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_saved(state)),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(dict(config))))
    except Exception as e:  # pylint: disable=broad-except
      self._saving = None
      raise self._failed(step, e) from e
    if wait:
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight is written and sealed, then deletes the steps older than
    the newest `keep` sealed ones."""
    step = self._saving
    try:
      self._manager.wait_until_finished()
      if step is not None and is_main_process() and not self.sealed(step):
        write_manifest(self._path(step))  # Orbax versions that skip the callback
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from e
    finally:
      self._saving = None
    sync_processes('train_checkpoints:sealed')
    sealed = [s for s in self.steps() if self.sealed(s)]
    if len(sealed) > self.keep:
      for old in [s for s in self.steps() if s < sealed[-self.keep]]:
        self._manager.delete(old)

  def restorable_step(self) -> int | None:
    """The newest step that verifies against its manifest (None: nothing saved yet). Damaged
    steps are reported, moved aside to STEP.damaged and skipped; raises CheckpointError when
    there are checkpoints but none is good."""
    chosen = -1
    if is_main_process():
      chosen = self._verify_newest()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
      sync_processes('train_checkpoints:verified')
      self._manager.reload()
    if chosen == -2:
      raise CheckpointError(f'No usable checkpoint in {self.directory}: every one is damaged '
                            '(see above; they were moved aside to STEP.damaged). Restore them '
                            'from a copy, or remove the directory to start over.')
    return None if chosen < 0 else chosen

  def _verify_newest(self) -> int:
    """Main process: the step to restore, -1 when nothing was saved, -2 when all are damaged."""
    steps = self.steps()
    if not steps:
      return -1
    if not any(self.sealed(s) for s in steps):
      self._say(f'Warning: the checkpoints in {self.directory} have no manifests (written before '
                f'gemma_jax sealed them); restoring step {steps[-1]} unverified.')
      return steps[-1]
    for step in reversed(steps):
      problem = verify_manifest(self._path(step))
      if problem is None:
        return step
      self._say(f'Checkpoint at step {step} is damaged: {problem}. Moved aside to '
                f'{self._path(step)}{DAMAGED_SUFFIX}; trying the previous one.')
      target = self._path(step) + DAMAGED_SUFFIX
      if os.path.exists(target):
        shutil.rmtree(target)
      os.replace(self._path(step), target)
      self._manager.reload()
    return -2

  def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[dict[str, Any], Any]:
    """(train state placed on `shardings`, whatever mesh saved it; data-iterator state) of
    `step`, without 'frozen'."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          _saved(abstract_state), _saved(shardings))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def close(self) -> None:
    self._manager.close()
