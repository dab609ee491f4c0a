"""Prompt input pipeline for RL objectives (GRPO): records of a prompt and the fields its reward
functions read.

    ds = make_prompt_dataset(config.data, tokenizer, batch_size=4, seed=0,
                             max_prompt_tokens=96)
    it = iter(ds)
    prompts = next(it)             # a list of 4 `Prompt`s: ids, text, fields, where
    state = it.get_state()         # JSON-serialisable; it.set_state(state) resumes exactly

Records (JSONL lines, or TFDS records with the same fields; field names from the data config):
  {"prompt": str, "answer": ..., ...}            one user turn;
  {"messages": [turns ending with a user turn], "answer": ..., ...}.
Every other field of the record (here `answer`) is handed to the reward functions
(gemma_jax.rewards) with the prompt's completions. A prompt is encoded as the sampler sees it:
`Tokenizer.encode_chat(messages, add_generation_prompt=True)` (BOS, the turns, the model turn's
header), or with `raw` (grpo.raw_prompt, for base models and few-shot prompts) as the prompt text
after BOS. A record whose prompt is missing, malformed or longer than `max_prompt_tokens` raises
ValueError naming `file:line` (TFDS: dataset, split and record index); JSONL files are checked
whole when the dataset is made, so no step runs before a bad line is found.

split='train' shuffles the prompts with `seed` (a new order each epoch) and repeats forever;
split='eval' is one pass in file order (the last batch may be shorter). Every process builds the
same batches (rollouts are sampled in one process; see gemma_jax.rollouts).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from gemma_jax import data
from gemma_jax import data_sources
from gemma_jax.data_sources import _text


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: its token ids (BOS .. model turn header), the text of its last user turn, the
  record's other fields (for the reward functions) and where it was read."""

  ids: tuple[int, ...]
  text: str
  fields: Mapping[str, Any]
  where: str


def _value(value: Any) -> Any:
  """A record field as plain Python (TFDS gives bytes and numpy scalars)."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode('utf-8', errors='replace')
  if isinstance(value, np.ndarray):
    return value.item() if value.ndim == 0 else [_value(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  return value


def record_to_prompt(record: Any, cfg: Mapping[str, Any],
                     where: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
  """Checks one prompt record; returns (messages ending with a user turn, the other fields)."""
  if not isinstance(record, Mapping):
    raise ValueError(f'{where}: expected a JSON object, got {type(record).__name__}.')
  mf, pf = cfg['messages_field'], cfg['prompt_field']
  if mf in record:
    turns = record[mf]
    if isinstance(turns, Mapping) and {'role', 'content'} <= set(turns):  # TFDS columns
      turns = [{'role': r, 'content': c} for r, c in zip(turns['role'], turns['content'])]
    if isinstance(turns, (list, tuple, np.ndarray)) and not len(turns):
      raise ValueError(f"{where}: '{mf}' is empty; it must end with a user turn (the prompt).")
    if isinstance(turns, (list, tuple, np.ndarray)) and isinstance(turns[-1], Mapping) and (
        (last := _text(turns[-1].get('role', ''), where, 'role')) != 'user'):
      raise ValueError(f"{where}: '{mf}' must end with a user turn (the prompt to complete), "
                       f'it ends with a {last!r} turn.')
    # The chat format's rule checks the turns, given a model turn to complete them.
    with_reply = ([*turns, {'role': 'model', 'content': '-'}]
                  if isinstance(turns, (list, tuple, np.ndarray)) else turns)
    messages = data_sources.record_to_messages({mf: with_reply}, cfg, where)[:-1]
    used = mf
  elif pf in record:
    messages = [{'role': 'user', 'content': _text(record[pf], where, pf)}]
    used = pf
  else:
    raise ValueError(f"{where}: record has neither '{mf}' nor '{pf}' (its fields: "
                     f'{sorted(record)}); set data.messages_field or data.prompt_field.')
  if not messages or messages[-1]['role'] != 'user':
    raise ValueError(f"{where}: '{mf}' must end with a user turn (the prompt to complete).")
  if not messages[-1]['content'].strip():
    raise ValueError(f'{where}: the prompt is empty.')
  return messages, {k: _value(v) for k, v in record.items() if k != used}


def encode_prompt(messages: list[dict[str, str]], fields: Mapping[str, Any], tokenizer,
                  max_prompt_tokens: int, where: str = '', raw: bool = False) -> Prompt:
  """The `Prompt` of one checked record; ValueError when it has more than max_prompt_tokens.
  `raw`: the single user turn's text is the prompt, after BOS (no chat template)."""
  if raw:
    if len(messages) != 1:
      raise ValueError('grpo.raw_prompt=True takes a prompt text, not a conversation of '
                       f'{len(messages)} turns.')
    ids = tokenizer.encode(messages[0]['content'], add_bos=True)
  else:
    ids = tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
  if len(ids) > max_prompt_tokens:
    raise ValueError(f'prompt has {len(ids)} tokens; at most {max_prompt_tokens} fit next to '
                     'the completion budget (seq_len + 1 - grpo.max_completion_length): raise '
                     'seq_len or shorten the prompt.')
  return Prompt(tuple(int(i) for i in ids), messages[-1]['content'], dict(fields), where)


class PromptIterator:
  """Batches of `Prompt`s (see the module docstring); `get_state`/`set_state` checkpoint it,
  `stats` counts prompts read, `fingerprint` is the CRC-32 of the last batch's ids."""

  def __init__(self, prompts: grain.MapDataset, batch_size: int, num_records: int, split: str):
    self._prompts, self._batch_size = prompts, batch_size
    self._end = num_records if split == 'eval' else None  # eval: one pass
    self._next = 0
    self.fingerprint = 0

  def __iter__(self):
    return self

  def __next__(self) -> list[Prompt]:
    stop = self._next + self._batch_size
    if self._end is not None:
      if self._next >= self._end:
        raise StopIteration
      stop = min(stop, self._end)
    batch = [self._prompts[i] for i in range(self._next, stop)]
    self._next = stop
    crc = 0
    for p in batch:
      crc = zlib.crc32(np.asarray(p.ids, np.int32).tobytes(), crc)
    self.fingerprint = crc
    return batch

  def get_state(self) -> dict[str, int]:
    return {'next': self._next}

  def set_state(self, state: Mapping[str, int]) -> None:
    self._next = int(state['next'])

  @property
  def stats(self) -> dict[str, int]:
    """Prompts read (no prompt is truncated or dropped: a long one is an error)."""
    return {'examples': self._next, 'truncated': 0, 'dropped': 0}


class PromptDataset:
  """Iterable of prompt batches; each `iter()` gives a fresh PromptIterator. Attributes:
  `num_records`, `batch_size` (prompts per batch), `config` (the resolved data config)."""

  def __init__(self, prompts: grain.MapDataset, *, config: Mapping[str, Any], batch_size: int,
               num_records: int, split: str):
    self._prompts, self.config, self.batch_size = prompts, dict(config), batch_size
    self.num_records, self.split = num_records, split

  def __iter__(self) -> PromptIterator:
    return PromptIterator(self._prompts, self.batch_size, self.num_records, self.split)


def make_prompt_dataset(data_config: Mapping[str, Any], tokenizer, *, batch_size: int,
                        seed: int, max_prompt_tokens: int, split: str = 'train',
                        raw: bool = False) -> PromptDataset:
  """Builds the prompt pipeline described in this module's docstring (`batch_size` prompts per
  batch; `max_prompt_tokens`: the longest prompt allowed, in tokens; `raw`: plain-text prompts,
  see encode_prompt)."""
  cfg = data_sources.resolve_config(data_config)
  data.process_share(batch_size, split, max_prompt_tokens, 0, 1, unit='prompts')
  records = data_sources.split_records(cfg, split, record_to_prompt)
  encode = lambda record: encode_prompt(*record[1], tokenizer, max_prompt_tokens, record[0], raw)
  if cfg['source'] == 'jsonl':  # Check every prompt's length now, before any step.
    for i in range(len(records)):
      try:
        encode(records[i])
      except ValueError as e:
        raise ValueError(f'{records[i][0]}: {e}') from e
  prompts, num_records = data.prepare(records.map(lambda r: (r[0], r)), split, seed, encode)
  return PromptDataset(prompts, config=cfg, batch_size=batch_size, num_records=num_records,
                       split=split)


def job_prompt_dataset(config: Any, tokenizer, *, split: str) -> PromptDataset:
  """The RL job's prompts for `split` from its config: `config.batch_size` prompts per batch,
  each at most seq_len + 1 - grpo.max_completion_length tokens."""
  return make_prompt_dataset(config.data, tokenizer, batch_size=config.batch_size,
                             seed=config.seed, split=split,
                             max_prompt_tokens=config.seq_len + 1 -
                             config.grpo.max_completion_length,
                             raw=bool(config.grpo.raw_prompt))
