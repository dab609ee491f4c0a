"""SFT input pipeline: sources, chat formatting, loss masks, packing, batching.

    ds = make_dataset(config.data, tokenizer, seq_len=512, batch_size=8, seed=0)
    it = iter(ds)                  # a grain DatasetIterator
    batch = next(it)               # dict of numpy [B, T] arrays, see below
    state = it.get_state()         # JSON-serialisable; it.set_state(state) resumes exactly
    it.stats                       # {'examples': .., 'truncated': .., 'dropped': ..} for logging

Sources. `source='jsonl'`: one JSON object per line, either
`{"messages": [{"role": "user"|"model"|"assistant"|"system", "content": str}, ...]}` or
`{"prompt": str, "response": str}` (a user turn then a model turn). The file is read and checked
when the dataset is made: a malformed line, an unknown role, turns that do not alternate
(optional system message, then user, model, user, ..) or an example without a model turn raise
ValueError naming `file:line`. `source='tfds'`: a prepared TFDS dataset read through
`tfds.data_source` (array_record files, TensorFlow not needed); field names come from the config;
bad records raise ValueError naming the dataset, split and record index when they are read.

Formatting. `Tokenizer.encode_chat` turns the messages into ids (BOS first) and a target mask that
is True on model-turn tokens only. An example of n ids gives n-1 positions: tokens = ids[:-1],
targets = ids[1:], loss_mask = mask[1:], so a target is always the next token of the same example.

Length policy. An example with more than seq_len positions is either truncated to its first
seq_len positions (`truncate='truncate'`, the default) or dropped (`truncate='drop'`). An example
left with no response token after truncation is dropped under either policy. Both are counted in
`iterator.stats`: examples read by this process since the iterator started (including the few the
packer has read ahead), truncated, dropped; the counts are part of the iterator state.

Batches (all [B, T] numpy): 'tokens' int32, 'targets' int32, 'loss_mask' float32 (1 where the
target is a response token), 'positions' int32 (restart at 0 per example), 'segment_ids' int32
(1, 2, .. per example in a row, 0 = padding; padding also has loss_mask 0). With `packing=True`
examples are first-fit packed into rows (grain's FirstFitPackIterDataset over max(B, 16) open
rows, in the shuffled order); with `packing=False` each row holds one example.

Order. split='train': each process takes records `process_index::process_count` of the source,
shuffles them with `seed` (a new order each epoch) and repeats forever. split='eval': one pass in
file order, the last batch filled with padding rows. Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from gemma_jax.tokenizer import chat_turns
from gemma_jax.train_config import DATA_DEFAULTS

DEFAULT_CONFIG = DATA_DEFAULTS  # the data.* keys of a job config, with their meaning
_FIELDS = ('tokens', 'targets', 'loss_mask')
_OK, _TRUNCATED, _DROPPED = 0, 1, 2
_MIN_PACKING_BINS = 16  # First-fit over this many open rows; more rows, less padding.


def resolve_config(data_config: Mapping[str, Any] | None) -> dict[str, Any]:
  """Returns DEFAULT_CONFIG updated by `data_config`; unknown keys or bad values raise."""
  given = dict(data_config.to_dict() if hasattr(data_config, 'to_dict') else (data_config or {}))
  unknown = sorted(set(given) - set(DEFAULT_CONFIG))
  if unknown:
    raise ValueError(f'Unknown data config key(s) {unknown}; known keys: {sorted(DEFAULT_CONFIG)}.')
  cfg = {**DEFAULT_CONFIG, **given}
  if cfg['source'] not in ('jsonl', 'tfds'):
    raise ValueError(f"data.source must be 'jsonl' or 'tfds', got {cfg['source']!r}.")
  if cfg['truncate'] not in ('truncate', 'drop'):
    raise ValueError(f"data.truncate must be 'truncate' or 'drop', got {cfg['truncate']!r}.")
  if cfg['source'] == 'jsonl' and not cfg['path']:
    raise ValueError("data.path must name a JSONL file when data.source='jsonl'.")
  if cfg['source'] == 'tfds' and not cfg['name']:
    raise ValueError("data.name must name a TFDS dataset when data.source='tfds'.")
  return cfg


def _text(value: Any, where: str, what: str) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode('utf-8')
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _text(value.item(), where, what)
  if not isinstance(value, str):
    raise ValueError(f'{where}: {what} must be a string, got {type(value).__name__}.')
  return value


def record_to_messages(record: Any, cfg: Mapping[str, Any], where: str) -> list[dict[str, str]]:
  """Turns one record into chat messages, checking roles and that a model turn exists.

  Accepts `cfg['messages_field']` as a list of {'role', 'content'} dicts (JSON) or as a dict of
  parallel arrays {'role': [...], 'content': [...]} (a TFDS Sequence feature), else the pair
  `cfg['prompt_field']` / `cfg['response_field']`. `where` (e.g. 'train.jsonl:7') prefixes errors.
  """
  if not isinstance(record, Mapping):
    raise ValueError(f'{where}: expected a JSON object, got {type(record).__name__}.')
  mfield, pfield, rfield = cfg['messages_field'], cfg['prompt_field'], cfg['response_field']
  if mfield in record:
    turns = record[mfield]
    if isinstance(turns, Mapping):  # TFDS Sequence({'role', 'content'}) comes as columns.
      if set(turns) < {'role', 'content'}:
        raise ValueError(f"{where}: '{mfield}' needs 'role' and 'content', has {sorted(turns)}.")
      turns = [{'role': r, 'content': c} for r, c in zip(turns['role'], turns['content'])]
    if not isinstance(turns, (list, tuple, np.ndarray)):
      raise ValueError(f"{where}: '{mfield}' must be a list of turns, got {type(turns).__name__}.")
    messages = []
    for i, turn in enumerate(turns):
      if not isinstance(turn, Mapping) or 'role' not in turn or 'content' not in turn:
        raise ValueError(f"{where}: {mfield}[{i}] must be an object with 'role' and 'content'.")
      role = _text(turn['role'], where, f'{mfield}[{i}].role')
      messages.append({'role': 'model' if role == 'assistant' else role,
                       'content': _text(turn['content'], where, f'{mfield}[{i}].content')})
  elif pfield in record and rfield in record:
    messages = [{'role': 'user', 'content': _text(record[pfield], where, pfield)},
                {'role': 'model', 'content': _text(record[rfield], where, rfield)}]
  else:
    raise ValueError(f"{where}: record has neither '{mfield}' nor '{pfield}' and '{rfield}' "
                     f'(its fields: {sorted(record)}); set data.messages_field or '
                     'data.prompt_field/response_field.')
  try:
    chat_turns(messages)  # roles and their order: the chat format's own rule
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None
  if not any(m['role'] == 'model' for m in messages):
    raise ValueError(f'{where}: example has no model turn, so nothing to learn from.')
  return messages


def read_jsonl(path: str, cfg: Mapping[str, Any] | None = None) -> list[tuple[str, list[dict]]]:
  """Reads and checks a JSONL file; returns [(where, messages)], where = 'path:line'."""
  cfg = {**DEFAULT_CONFIG, **(cfg or {})}
  if not os.path.isfile(path):
    raise ValueError(f'JSONL file {path!r} not found (check data.path / data.eval_path).')
  examples = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{path}:{lineno}'
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: malformed JSON ({e.msg} at column {e.colno}).') from None
      examples.append((where, record_to_messages(record, cfg, where)))
  if not examples:
    raise ValueError(f'JSONL file {path!r} holds no examples.')
  return examples


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


def _tfds_records(cfg: Mapping[str, Any], split: str) -> tuple[Any, str]:
  """Opens a TFDS split as a random-access source (no TensorFlow)."""
  import tensorflow_datasets as tfds  # Heavy import, only for TFDS sources.
  try:
    source = tfds.data_source(cfg['name'], split=split, data_dir=cfg['data_dir'] or None)
  except Exception as e:  # tfds raises many kinds; say which dataset and where we looked.
    raise ValueError(f"Cannot open TFDS dataset {cfg['name']!r} split {split!r} in data_dir "
                     f"{cfg['data_dir'] or '(default)'!r}: {e}") from e
  return source, f"tfds {cfg['name']}[{split}]"


def write_tfds_dataset(records_by_split: Mapping[str, Sequence[Mapping[str, Any]]], name: str,
                       data_dir: str, version: str = '1.0.0') -> str:
  """Writes records as a TFDS dataset (array_record files, no TensorFlow) readable by name.

  Every record has the same fields: strings, or a list of {'role', 'content'} turns (stored as a
  TFDS Sequence). E.g. `write_tfds_dataset({'train': recs}, 'my_sft', '/data/tfds')`, then train
  with data.source='tfds', data.name='my_sft', data.data_dir='/data/tfds'. Returns the
  dataset's directory.
  """
  import tensorflow_datasets as tfds  # Heavy import, only for TFDS sources.
  first = next(iter(next(iter(records_by_split.values()))))
  features = {}
  for key, value in first.items():
    if isinstance(value, str):
      features[key] = tfds.features.Text()
    elif isinstance(value, (list, tuple)):
      features[key] = tfds.features.Sequence(
          {'role': tfds.features.Text(), 'content': tfds.features.Text()})
    else:
      raise ValueError(f'Field {key!r}: expected a string or a list of turns, got '
                       f'{type(value).__name__}.')

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(recs) for split, recs in records_by_split.items()}

  body = {
      'name': name, 'VERSION': tfds.core.Version(version),
      '_info': lambda self: tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict(features)),
      '_split_generators': _split_generators,
      '_generate_examples': lambda self, recs: ((i, dict(r)) for i, r in enumerate(recs)),
  }
  with tfds.core.registered.skip_registration():  # A data_dir, not the code, defines the dataset.
    builder_cls = type(f'_{name}_builder', (tfds.core.GeneratorBasedBuilder,), body)
  builder = builder_cls(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


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


class SFTIterator(grain.DatasetIterator):
  """Yields training batches; `get_state`/`set_state` checkpoint it, `stats` counts examples."""

  def __init__(self, parent: grain.DatasetIterator, stats: dict[str, int], batch_size: int):
    super().__init__(parent)
    self._counts = stats
    self._batch_size = batch_size

  @property
  def stats(self) -> dict[str, int]:
    """Examples read, truncated and dropped by this iterator so far (this process only)."""
    return dict(self._counts)

  def __next__(self) -> dict[str, np.ndarray]:
    rows = next(self._parent)
    batch = {'tokens': rows['tokens'], 'targets': rows['targets'],
             'loss_mask': rows['loss_mask'], 'positions': rows['tokens_positions'],
             'segment_ids': rows['tokens_segment_ids']}
    batch = {k: v.astype(np.float32 if k == 'loss_mask' else np.int32) for k, v in batch.items()}
    missing = self._batch_size - batch['tokens'].shape[0]
    if missing:  # Only the end of a single eval pass: fill with padding rows.
      batch = {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SFTDataset(grain.IterDataset):
  """A grain IterDataset of SFT batches; each `iter()` gives a fresh, checkpointable SFTIterator.

  Attributes: `num_records` (records in this process's share of the source), `seq_len`,
  `batch_size`, `config` (the resolved data config).
  """

  def __init__(self, examples: grain.MapDataset, *, config: Mapping[str, Any], seq_len: int,
               batch_size: int, num_records: int):
    super().__init__(examples)
    self.config, self.seq_len, self.batch_size = dict(config), seq_len, batch_size
    self.num_records = num_records

  def __iter__(self) -> SFTIterator:
    stats = {'examples': 0, 'truncated': 0, 'dropped': 0}
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
    examples = _Counter(self._parent.to_iter_dataset(read), stats)
    rows = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={k: self.seq_len for k in _FIELDS},
        num_packing_bins=max(self.batch_size, _MIN_PACKING_BINS), shuffle_bins=False,
        meta_features=('targets', 'loss_mask'),
        max_sequences_per_bin=None if self.config['packing'] else 1)
    return SFTIterator(iter(rows.batch(self.batch_size)), stats, self.batch_size)


def make_dataset(data_config: Mapping[str, Any], tokenizer, *, seq_len: int, batch_size: int,
                 seed: int, split: str = 'train', process_index: int | None = None,
                 process_count: int | None = None) -> SFTDataset:
  """Builds the SFT batch pipeline described in this module's docstring.

  Args:
    data_config: dict or ConfigDict with keys of DEFAULT_CONFIG (missing keys take defaults).
    tokenizer: a gemma_jax.tokenizer.Tokenizer (needs `encode_chat`).
    seq_len: T, positions per row. batch_size: B, rows per batch (per process).
    seed: shuffling seed (train split only).
    split: 'train' (shuffled, repeated forever) or 'eval' (one ordered pass).
    process_index, process_count: this process's share; default jax.process_index()/count().
  Returns:
    an SFTDataset; `iter(ds)` yields batch dicts of [B, T] numpy arrays.
  """
  cfg = resolve_config(data_config)
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'seq_len and batch_size must be positive, got {seq_len}, {batch_size}.')
  if process_index is None or process_count is None:
    import jax  # Only to find this process's share.
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')

  if cfg['source'] == 'jsonl':
    path = cfg['path'] if split == 'train' else cfg['eval_path']
    if not path:
      raise ValueError("No held-out data: set data.eval_path for split='eval'.")
    examples = grain.MapDataset.source(read_jsonl(path, cfg))
  else:
    tfds_split = cfg['train_split'] if split == 'train' else cfg['eval_split']
    if not tfds_split:
      raise ValueError("No held-out data: set data.eval_split for split='eval'.")
    source, name = _tfds_records(cfg, tfds_split)
    examples = grain.MapDataset.source(source).map_with_index(
        lambda i, r: (f'{name} record {i}', record_to_messages(r, cfg, f'{name} record {i}')))

  examples = examples[process_index::process_count]
  num_records = len(examples)
  if num_records == 0:
    raise ValueError(f'Process {process_index} of {process_count} has no {split} records; '
                     'the dataset is smaller than the number of processes.')
  if split == 'train':
    examples = examples.shuffle(seed=seed).repeat()

  def encode(item):
    where, messages = item
    try:
      return encode_example(messages, tokenizer, seq_len, cfg['truncate'])
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from e

  examples = examples.map(encode)
  return SFTDataset(examples, config=cfg, seq_len=seq_len, batch_size=batch_size,
                    num_records=num_records)


def job_dataset(config: Any, tokenizer, *, split: str) -> SFTDataset:
  """The training job's pipeline for `split` from its config (config.data, seq_len, seed): each
  process reads its share of the global `config.batch_size`."""
  import jax  # Only to find this process's share.
  n = jax.process_count()
  if config.batch_size % n:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{n} processes.')
  return make_dataset(config.data, tokenizer, seq_len=config.seq_len,
                      batch_size=config.batch_size // n, seed=config.seed, split=split)
