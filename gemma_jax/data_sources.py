"""Where training records come from: a job's data config, JSONL files and TFDS datasets, and
the checks every record passes before it is encoded (gemma_jax.data, gemma_jax.preference_data).

`source='jsonl'`: one JSON object per line, either
`{"messages": [{"role": "user"|"model"|"assistant"|"system", "content": str}, ...]}` or
`{"prompt": str, "response": str}` (a user turn then a model turn); preference pairs have their
own fields (gemma_jax.preference_data). The file is read and checked when the dataset is made: a
line that is not UTF-8 or not JSON, an unknown role, turns that do not alternate (optional system
message, then user, model, user, ..) or an example without a model turn raise ValueError naming
`file:line`. `source='tfds'`: a prepared TFDS dataset read through `tfds.data_source`
(array_record files, TensorFlow not needed); field names come from the config; bad records raise
ValueError naming the dataset, split and record index when they are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from gemma_jax.tokenizer import chat_turns
from gemma_jax.train_config import DATA_DEFAULTS

DEFAULT_CONFIG = DATA_DEFAULTS  # the data.* keys of a job config, with their meaning


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
      if not {'role', 'content'} <= set(turns):
        raise ValueError(f"{where}: '{mfield}' needs 'role' and 'content', has {sorted(turns)}.")
      columns = (turns['role'], turns['content'])
      if not all(isinstance(c, (list, tuple, np.ndarray)) for c in columns) or (
          len(columns[0]) != len(columns[1])):
        raise ValueError(f"{where}: '{mfield}' as columns needs 'role' and 'content' lists of "
                         'equal length.')
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


def jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
  """(where, record) for each non-blank line of a JSONL file, where = 'path:line'; a missing
  file, bytes that are not UTF-8 or a line that is not JSON raise ValueError naming it."""
  if not os.path.isfile(path):
    raise ValueError(f'JSONL file {path!r} not found (check data.path / data.eval_path).')
  with open(path, 'rb') as f:  # lines decoded one by one, so a bad byte is reported by line
    for lineno, raw in enumerate(f, start=1):
      where = f'{path}:{lineno}'
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ValueError(f'{where}: not UTF-8 (byte {e.start + 1} of the line).') from None
      if not line.strip():
        continue
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: malformed JSON ({e.msg} at column {e.colno}).') from None
      except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, nesting too deep
        raise ValueError(f'{where}: unreadable JSON ({type(e).__name__}: {e}).') from None


def read_jsonl(path: str, cfg: Mapping[str, Any] | None = None,
               parse: Callable[[Any, Mapping[str, Any], str], Any] | None = None,
               ) -> list[tuple[str, Any]]:
  """Reads and checks a JSONL file; returns [(where, parse(record, cfg, where))], where =
  'path:line' (`parse` default: `record_to_messages`, giving chat messages)."""
  given = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg or {})
  cfg = {**DEFAULT_CONFIG, **given}
  parse = parse or record_to_messages
  examples = [(where, parse(record, cfg, where)) for where, record in jsonl_records(path)]
  if not examples:
    raise ValueError(f'JSONL file {path!r} holds no examples.')
  return examples


def split_records(cfg: Mapping[str, Any], split: str,
                  parse: Callable[[Any, Mapping[str, Any], str], Any]) -> grain.MapDataset:
  """The (where, parse(record, cfg, where)) items of a job's `split` ('train' or 'eval') from
  its resolved data config: a JSONL file read and checked now, or a TFDS split checked as each
  record is read."""
  if cfg['source'] == 'jsonl':
    path = cfg['path'] if split == 'train' else cfg['eval_path']
    if not path:
      raise ValueError("No held-out data: set data.eval_path for split='eval'.")
    return grain.MapDataset.source(read_jsonl(path, cfg, parse))
  tfds_split = cfg['train_split'] if split == 'train' else cfg['eval_split']
  if not tfds_split:
    raise ValueError("No held-out data: set data.eval_split for split='eval'.")
  source, name = _tfds_records(cfg, tfds_split)
  return grain.MapDataset.source(source).map_with_index(
      lambda i, r: (f'{name} record {i}', parse(r, cfg, f'{name} record {i}')))


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
