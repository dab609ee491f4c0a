"""SFT input pipeline: chat formatting, loss masks, packing, batching, each process's rows.

    ds = make_dataset(config.data, tokenizer, seq_len=512, batch_size=8, seed=0)
    it = iter(ds)                  # a grain DatasetIterator
    batch = next(it)               # dict of numpy [B, T] arrays, see below
    state = it.get_state()         # JSON-serialisable; it.set_state(state) resumes exactly
    it.stats                       # {'examples': .., 'truncated': .., 'dropped': ..} for logging

Sources (JSONL or TFDS records, and their checks): gemma_jax/data_sources.py.

Formatting. `Tokenizer.encode_chat` turns the messages into ids (BOS first) and a target mask that
is True on model-turn tokens only. An example of n ids gives n-1 positions: tokens = ids[:-1],
targets = ids[1:], loss_mask = mask[1:], so a target is always the next token of the same example.

Length policy. An example with more than seq_len positions is either truncated to its first
seq_len positions (`truncate='truncate'`, the default) or dropped (`truncate='drop'`). An example
left with no response token after truncation is dropped under either policy. Both are counted in
`iterator.stats`: examples read since the iterator started (including the few the packer has read
ahead), truncated, dropped; the counts are part of the iterator state.

Batches (all [B, T] numpy): 'tokens' int32, 'targets' int32, 'loss_mask' float32 (1 where the
target is a response token), 'positions' int32 (restart at 0 per example), 'segment_ids' int32
(1, 2, .. per example in a row, 0 = padding; padding also has loss_mask 0). With `packing=True`
examples are first-fit packed into rows (grain's FirstFitPackIterDataset over max(B, 16) open
rows, in the shuffled order); with `packing=False` each row holds one example.

Order. split='train': the records are shuffled with `seed` (a new order each epoch) and repeated
forever. split='eval': one pass in file order, the last batch filled with padding rows.
Everything is deterministic for a seed.

Processes. Every process builds the same global batches of `batch_size` rows and keeps its own
rows (process p of n: rows p*B/n to (p+1)*B/n - 1), so the batches, the iterator state and the
statistics do not depend on how many processes read them: a job checkpointed with n processes
resumes with m on exactly the same examples. Each process therefore tokenizes every record, which
costs little next to a training step; records are read lazily.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from gemma_jax.data_sources import record_to_messages, resolve_config, split_records
_FIELDS = ('tokens', 'targets', 'loss_mask')
_OK, _TRUNCATED, _DROPPED = 0, 1, 2
_MIN_PACKING_BINS = 16  # First-fit over this many open rows; more rows, less padding.


def process_share(batch_size: int, split: str, seq_len: int, process_index: int | None,
                  process_count: int | None, unit: str = 'rows') -> tuple[int, int]:
  """Checks a pipeline's arguments; returns (first, end) of this process's `unit`s of a global
  batch of `batch_size` (process p of n: units p*B/n to (p+1)*B/n - 1). Process index and count
  default to JAX's."""
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'seq_len and batch_size must be positive, got {seq_len}, {batch_size}.')
  if process_index is None or process_count is None:
    import jax  # Only to find this process's share.
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} {unit} do not split evenly over {process_count} '
                     'processes.')
  share = batch_size // process_count
  return process_index * share, (process_index + 1) * share


def batch_fingerprint(batch: Mapping[str, np.ndarray]) -> int:
  """CRC-32 of a global batch's tokens, loss mask and segment ids: which data a step saw."""
  crc = 0
  for key in ('tokens', 'loss_mask', 'segment_ids'):
    crc = zlib.crc32(np.ascontiguousarray(batch[key]).tobytes(), crc)
  return crc


def encode_example(messages: Sequence[Mapping[str, str]], tokenizer, seq_len: int,
                   truncate: str = 'truncate') -> dict[str, Any]:
  """Tokenises one conversation into shifted tokens/targets/loss_mask of <= seq_len positions.

  Returns a dict of 1-D arrays plus 'status' (0 ok, 1 truncated, 2 dropped: arrays empty).
  """
  ids, mask = tokenizer.encode_chat(list(messages), add_generation_prompt=False)
  ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.float32)
  status = _OK
  if len(ids) - 1 > seq_len:
    status = _TRUNCATED if truncate == 'truncate' else _DROPPED
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
  if status != _DROPPED and not mask[1:].any():
    status = _DROPPED  # Truncation cut every response token: nothing left to learn.
  if status == _DROPPED:
    ids, mask = ids[:0], mask[:0]
  return {'tokens': ids[:-1], 'targets': ids[1:], 'loss_mask': mask[1:], 'status': status}


class _Counter(grain.IterDataset):
  """Drops examples marked dropped and counts statuses into a shared dict (kept in the state)."""

  def __init__(self, parent: grain.IterDataset, stats: dict[str, int]):
    super().__init__(parent)
    self._counts = stats

  def __iter__(self) -> grain.DatasetIterator:
    return _CounterIterator(self._parent.__iter__(), self._counts)


class _CounterIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, stats: dict[str, int]):
    super().__init__(parent)
    self._counts = stats

  def __next__(self):
    while True:
      element = next(self._parent)
      status = element.pop('status')
      self._counts['examples'] += 1
      self._counts['truncated'] += status == _TRUNCATED
      self._counts['dropped'] += status == _DROPPED
      if status != _DROPPED:
        return element

  def get_state(self):
    return {'parent': self._parent.get_state(), 'stats': dict(self._counts)}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._counts.update(state['stats'])


class BatchIterator(grain.DatasetIterator):
  """Yields this process's rows of each global batch; `get_state`/`set_state` checkpoint it,
  `stats` counts examples, `fingerprint` identifies the last global batch. Subclasses turn the
  parent's element into the global batch (`_global_batch`)."""

  def __init__(self, parent: grain.DatasetIterator, stats: dict[str, int], batch_size: int,
               rows: slice):
    super().__init__(parent)
    self._counts = stats
    self._batch_size = batch_size  # global
    self._rows = rows  # this process's rows of a global batch
    self.fingerprint = 0  # CRC-32 of the last global batch's tokens, loss mask and segments

  @property
  def stats(self) -> dict[str, int]:
    """Examples read, truncated and dropped by this iterator so far (all processes' rows)."""
    return dict(self._counts)

  def _global_batch(self, element: Any) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._global_batch(next(self._parent))
    self.fingerprint = batch_fingerprint(batch)
    return {k: v[self._rows] for k, v in batch.items()}

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SFTIterator(BatchIterator):
  """SFT batches (packed rows; see the module docstring)."""

  def _global_batch(self, rows) -> dict[str, np.ndarray]:
    batch = {'tokens': rows['tokens'], 'targets': rows['targets'],
             'loss_mask': rows['loss_mask'], 'positions': rows['tokens_positions'],
             'segment_ids': rows['tokens_segment_ids']}
    batch = {k: v.astype(np.float32 if k == 'loss_mask' else np.int32) for k, v in batch.items()}
    missing = self._batch_size - batch['tokens'].shape[0]
    if missing:  # Only the end of a single eval pass: fill with padding rows.
      batch = {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}
    return batch


class SFTDataset(grain.IterDataset):
  """A grain IterDataset of SFT batches; each `iter()` gives a fresh, checkpointable SFTIterator.

  Attributes: `num_records` (records in the source), `seq_len`, `batch_size` (global rows per
  batch), `rows` (this process's rows of a batch), `config` (the resolved data config).
  """

  def __init__(self, examples: grain.MapDataset, *, config: Mapping[str, Any], seq_len: int,
               batch_size: int, num_records: int, rows: slice):
    super().__init__(examples)
    self.config, self.seq_len, self.batch_size = dict(config), seq_len, batch_size
    self.num_records, self.rows = num_records, rows

  def __iter__(self) -> SFTIterator:
    stats = {'examples': 0, 'truncated': 0, 'dropped': 0}
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
    examples = _Counter(self._parent.to_iter_dataset(read), stats)
    rows = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={k: self.seq_len for k in _FIELDS},
        num_packing_bins=max(self.batch_size, _MIN_PACKING_BINS), shuffle_bins=False,
        meta_features=('targets', 'loss_mask'),
        max_sequences_per_bin=None if self.config['packing'] else 1)
    return SFTIterator(iter(rows.batch(self.batch_size)), stats, self.batch_size, self.rows)


def make_dataset(data_config: Mapping[str, Any], tokenizer, *, seq_len: int, batch_size: int,
                 seed: int, split: str = 'train', process_index: int | None = None,
                 process_count: int | None = None) -> SFTDataset:
  """Builds the SFT batch pipeline described in this module's docstring.

  Args:
    data_config: dict or ConfigDict with keys of DEFAULT_CONFIG (missing keys take defaults).
    tokenizer: a gemma_jax.tokenizer.Tokenizer (needs `encode_chat`).
    seq_len: T, positions per row. batch_size: B, rows per global batch (all processes).
    seed: shuffling seed (train split only).
    split: 'train' (shuffled, repeated forever) or 'eval' (one ordered pass).
    process_index, process_count: whose rows of each global batch `iter(ds)` yields (see the
      module docstring); default jax.process_index()/count().
  Returns:
    an SFTDataset; `iter(ds)` yields batch dicts of [B / process_count, T] numpy arrays.
  """
  cfg = resolve_config(data_config)
  first, end = process_share(batch_size, split, seq_len, process_index, process_count)
  examples = split_records(cfg, split, record_to_messages)
  examples, num_records = prepare(examples, split, seed, lambda messages: encode_example(
      messages, tokenizer, seq_len, cfg['truncate']))
  return SFTDataset(examples, config=cfg, seq_len=seq_len, batch_size=batch_size,
                    num_records=num_records, rows=slice(first, end))


def prepare(items: grain.MapDataset, split: str, seed: int, encode: Callable[[Any], Any],
            ) -> tuple[grain.MapDataset, int]:
  """(the (where, x) `items` shuffled with `seed` and repeated for 'train', one ordered pass for
  'eval', each encoded by encode(x) with its errors prefixed by `where`; the number of items)."""
  num_records = len(items)
  if num_records == 0:
    raise ValueError(f'The {split} data has no records.')
  if split == 'train':
    items = items.shuffle(seed=seed).repeat()

  def encode_one(item):
    where, x = item
    try:
      return encode(x)
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from e

  return items.map(encode_one), num_records


def job_dataset(config: Any, tokenizer, *, split: str) -> SFTDataset:
  """The training job's pipeline for `split` from its config (config.data, seq_len, seed): each
  process yields its rows of global batches of `config.batch_size`."""
  return make_dataset(config.data, tokenizer, seq_len=config.seq_len,
                      batch_size=config.batch_size, seed=config.seed, split=split)
