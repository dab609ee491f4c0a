"""Preference-pair input pipeline (DPO family): sources, pair checks, reply masks, batching.

    ds = make_preference_dataset(config.data, tokenizer, seq_len=64, batch_size=4, seed=0)
    it = iter(ds)                  # a grain DatasetIterator
    batch = next(it)               # dict of numpy [2 * 4, 64] arrays: chosen, rejected, chosen, ..
    state = it.get_state()         # JSON-serialisable; it.set_state(state) resumes exactly
    it.stats                       # pairs {'examples': .., 'truncated': .., 'dropped': ..}

Records (JSONL lines, or TFDS records with the same fields; field names from the data config:
`prompt_field`, `messages_field`, `chosen_field`, `rejected_field`), three equivalent formats:
  {"prompt": str, "chosen": str, "rejected": str}    a user turn, then two alternative replies;
  {"messages": [turns ending with a user turn], "chosen": str, "rejected": str};
  {"chosen": [turns], "rejected": [turns]}           TRL's conversational format: two whole
      conversations that share every turn but the last, a model turn in both.
Pairs are checked when the JSONL file is read (TFDS: when a record is read) through the chat
format's one rule (data_sources.record_to_messages, tokenizer.chat_turns): a missing field, identical or
empty replies, roles out of order, a prompt not ending with a user turn or conversations whose
prompts differ raise ValueError naming `file:line` (TFDS: dataset, split and record index).

Rows. A pair gives two rows, prompt + chosen reply and prompt + rejected reply, each one example
encoded as gemma_jax.data.encode_example does (shifted tokens/targets), but with loss_mask 1 only
on the final reply's tokens and its end of turn (earlier model turns of the prompt are context),
padded to seq_len: 'tokens', 'targets' int32, 'loss_mask' float32, 'positions' int32 (0..n-1),
'segment_ids' int32 (1 on the example, 0 on padding). No packing (data.packing is ignored).
Length policy data.truncate: 'truncate' keeps the start of both rows, and drops the pair when a
row keeps no reply token; 'drop' drops the pair when either row is longer than seq_len. `stats`
counts pairs read, pairs truncated (either row) and pairs dropped; the counts are in the state.

Batches hold `batch_size` pairs, rows interleaved: row 2i is pair i's chosen, row 2i+1 its
rejected. split='train' shuffles the pairs with `seed` (a new order each epoch) and repeats
forever; split='eval' is one pass in file order, the last batch filled with all-zero rows. As in
gemma_jax.data, every process builds the same global batches and keeps its own pairs (process p of
n: pairs p*P/n to (p+1)*P/n - 1, so a pair never splits), so batches, state and stats do not
depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from gemma_jax import data
from gemma_jax import data_sources
from gemma_jax.data import _DROPPED, _OK, _Counter, encode_example
from gemma_jax.data_sources import _text

KEYS = ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')


def _is_turns(value: Any) -> bool:
  return isinstance(value, (list, tuple, Mapping)) or (
      isinstance(value, np.ndarray) and value.ndim > 0)


def _conversation(turns: Any, cfg: Mapping[str, Any], field: str, where: str) -> list[dict]:
  """`turns` (a JSON list of turns, or TFDS columns) checked as one conversation."""
  return data_sources.record_to_messages({field: turns}, {**cfg, 'messages_field': field}, where)


def _with_reply(turns: Any, reply: Any) -> Any:
  """`turns` followed by a model turn holding `reply`, in the same layout (list or columns)."""
  if isinstance(turns, Mapping) and all(
      isinstance(turns.get(k), (list, tuple, np.ndarray)) for k in ('role', 'content')):
    return {'role': [*turns['role'], 'model'], 'content': [*turns['content'], reply]}
  if isinstance(turns, (list, tuple, np.ndarray)):
    return [*turns, {'role': 'model', 'content': reply}]
  return turns  # Not turns at all: record_to_messages says what is wrong with it.


def record_to_pair(record: Any, cfg: Mapping[str, Any],
                   where: str) -> tuple[list[dict[str, str]], str, str]:
  """Checks one preference record; returns (prompt messages ending with a user turn, chosen
  reply, rejected reply). `where` (e.g. 'prefs.jsonl:7') prefixes errors."""
  if not isinstance(record, Mapping):
    raise ValueError(f'{where}: expected a JSON object, got {type(record).__name__}.')
  cf, rf = cfg['chosen_field'], cfg['rejected_field']
  mf, pf = cfg['messages_field'], cfg['prompt_field']
  missing = [f for f in (cf, rf) if f not in record]
  if missing:
    raise ValueError(f"{where}: preference record has no {' or '.join(map(repr, missing))} "
                     f'(its fields: {sorted(record)}); set data.chosen_field/rejected_field.')
  if _is_turns(record[cf]) and _is_turns(record[rf]):  # TRL's two whole conversations.
    chosen, rejected = (_conversation(record[f], cfg, f, where) for f in (cf, rf))
    for field, conv in ((cf, chosen), (rf, rejected)):
      if conv[-1]['role'] != 'model':
        raise ValueError(f"{where}: '{field}' must end with a model turn (the compared reply), "
                         f"ends with a {conv[-1]['role']} turn.")
    if chosen[:-1] != rejected[:-1]:
      k = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
               min(len(chosen), len(rejected)) - 1)
      raise ValueError(f"{where}: '{cf}' and '{rf}' must share every turn but the last; they "
                       f'differ at turn {k}.')
    prompt, chosen_text, rejected_text = chosen[:-1], chosen[-1]['content'], rejected[-1]['content']
  elif _is_turns(record[cf]) or _is_turns(record[rf]):
    raise ValueError(f"{where}: '{cf}' and '{rf}' must both be strings (replies) or both lists "
                     'of turns (conversations).')
  elif mf in record:
    chosen_text = _text(record[cf], where, cf)  # First, so that a failure below is the prompt's.
    try:
      full = _conversation(_with_reply(record[mf], chosen_text), cfg, mf, where)
    except ValueError:  # Either the prompt is wrong (raised here) or it ends with a model turn.
      _conversation(record[mf], cfg, mf, where)
      raise ValueError(f"{where}: '{mf}' must end with a user turn (the prompt that '{cf}' and "
                       f"'{rf}' answer), it ends with a model turn.") from None
    prompt, rejected_text = full[:-1], _text(record[rf], where, rf)
  elif pf in record:
    full = data_sources.record_to_messages({pf: record[pf], cf: record[cf]},
                                   {**cfg, 'response_field': cf}, where)
    prompt, chosen_text = full[:-1], full[-1]['content']
    rejected_text = _text(record[rf], where, rf)
  else:
    raise ValueError(f"{where}: record has string '{cf}'/'{rf}' but neither '{mf}' nor '{pf}' "
                     f'(its fields: {sorted(record)}); set data.messages_field or '
                     'data.prompt_field.')
  for field, text in ((cf, chosen_text), (rf, rejected_text)):
    if not text.strip():
      raise ValueError(f"{where}: '{field}' is an empty reply.")
  if chosen_text == rejected_text:
    raise ValueError(f"{where}: '{cf}' and '{rf}' are identical, so the pair prefers nothing.")
  return prompt, chosen_text, rejected_text


def read_preference_jsonl(path: str, cfg: Mapping[str, Any] | None = None,
                          ) -> list[tuple[str, tuple]]:
  """Reads and checks a preference JSONL file; returns [(where, record_to_pair's triple)],
  where = 'path:line'. `cfg` names the fields (default: the data config's defaults)."""
  return data_sources.read_jsonl(path, cfg, record_to_pair)


def encode_pair(prompt: list[dict[str, str]], chosen: str, rejected: str, tokenizer,
                seq_len: int, truncate: str = 'truncate') -> dict[str, Any]:
  """Encodes a pair as two padded rows; returns {key: [2, seq_len] array} plus 'status' (0 ok,
  1 truncated, 2 dropped: arrays all zero). loss_mask covers the final reply only."""
  prompt_len = len(tokenizer.encode_chat(prompt, add_generation_prompt=True)[0])
  rows = {k: np.zeros((2, seq_len), np.float32 if k == 'loss_mask' else np.int32) for k in KEYS}
  status = _OK
  for i, reply in enumerate((chosen, rejected)):
    e = encode_example(prompt + [{'role': 'model', 'content': reply}], tokenizer, seq_len,
                       truncate)
    mask = e['loss_mask'].copy()
    mask[:prompt_len - 1] = 0  # Targets inside the prompt (its model turns) are context.
    if e['status'] == _DROPPED or not mask.any():
      return {**{k: np.zeros_like(v) for k, v in rows.items()}, 'status': _DROPPED}
    status = max(status, e['status'])
    n = len(e['tokens'])
    rows['tokens'][i, :n], rows['targets'][i, :n], rows['loss_mask'][i, :n] = (
        e['tokens'], e['targets'], mask)
    rows['positions'][i, :n], rows['segment_ids'][i, :n] = np.arange(n), 1
  return {**rows, 'status': status}


class PreferenceIterator(data.BatchIterator):
  """Batches of pairs, rows interleaved (see the module docstring); `stats` counts pairs."""

  def _global_batch(self, pairs) -> dict[str, np.ndarray]:
    missing = self._batch_size - pairs['tokens'].shape[0]  # > 0 only at the end of an eval pass
    return {k: np.pad(pairs[k], ((0, missing), (0, 0), (0, 0))).reshape(
        2 * self._batch_size, -1) for k in KEYS}


class PreferenceDataset(grain.IterDataset):
  """A grain IterDataset of preference batches; each `iter()` gives a fresh PreferenceIterator.

  Attributes: `num_records` (pairs in the source), `seq_len`, `batch_size` (pairs per global
  batch), `rows` (this process's rows of a batch's 2 * batch_size), `config` (resolved).
  """

  def __init__(self, pairs: grain.MapDataset, *, config: Mapping[str, Any], seq_len: int,
               batch_size: int, num_records: int, rows: slice):
    super().__init__(pairs)
    self.config, self.seq_len, self.batch_size = dict(config), seq_len, batch_size
    self.num_records, self.rows = num_records, rows

  def __iter__(self) -> PreferenceIterator:
    stats = {'examples': 0, 'truncated': 0, 'dropped': 0}
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
    pairs = _Counter(self._parent.to_iter_dataset(read), stats)
    return PreferenceIterator(iter(pairs.batch(self.batch_size)), stats, self.batch_size,
                              self.rows)


def make_preference_dataset(data_config: Mapping[str, Any], tokenizer, *, seq_len: int,
                            batch_size: int, seed: int, split: str = 'train',
                            process_index: int | None = None,
                            process_count: int | None = None) -> PreferenceDataset:
  """Builds the preference batch pipeline described in this module's docstring.

  Args:
    data_config: dict or ConfigDict of data.* keys (missing keys take defaults).
    tokenizer: a gemma_jax.tokenizer.Tokenizer (needs `encode_chat`).
    seq_len: T, positions per row. batch_size: P, pairs per global batch (2P rows).
    seed: shuffling seed (train split only).
    split: 'train' (shuffled, repeated forever) or 'eval' (one ordered pass).
    process_index, process_count: whose pairs `iter(ds)` yields; default jax's.
  Returns:
    a PreferenceDataset; `iter(ds)` yields dicts of [2P / process_count, T] numpy arrays.
  """
  cfg = data_sources.resolve_config(data_config)
  first, end = data.process_share(batch_size, split, seq_len, process_index, process_count,
                                  unit='pairs')
  rows = slice(2 * first, 2 * end)  # a pair's two rows stay together
  pairs = data_sources.split_records(cfg, split, record_to_pair)
  pairs, num_records = data.prepare(pairs, split, seed, lambda pair: encode_pair(
      *pair, tokenizer, seq_len, cfg['truncate']))
  return PreferenceDataset(pairs, config=cfg, seq_len=seq_len, batch_size=batch_size,
                           num_records=num_records, rows=rows)


def job_preference_dataset(config: Any, tokenizer, *, split: str) -> PreferenceDataset:
  """The DPO job's pipeline for `split` from its config (config.data, seq_len, seed): each process
  yields its rows of global batches of `config.batch_size` pairs."""
  return make_preference_dataset(config.data, tokenizer, seq_len=config.seq_len,
                                 batch_size=config.batch_size, seed=config.seed, split=split)
