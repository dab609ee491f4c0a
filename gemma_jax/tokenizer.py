"""SentencePiece tokenizer for Gemma and the Gemma chat (control-token) format.

Gemma's chat format has two roles, `user` and `model`, each turn written as

  <start_of_turn>user
  What is a good place for travel in the US?<end_of_turn>
  <start_of_turn>model
  California.<end_of_turn>

There is no system role: a system message's content is folded into the first user turn, followed
by a blank line. `<start_of_turn>` and `<end_of_turn>` are single control tokens whose ids differ
between vocabularies (106/107 in Gemma 1/2, 105/106 in Gemma 3), so every special id is looked up
by its piece.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

START_OF_TURN = '<start_of_turn>'
END_OF_TURN = '<end_of_turn>'
_REQUIRED_PIECES = {
    'pad_id': '<pad>', 'eos_id': '<eos>', 'bos_id': '<bos>', 'unk_id': '<unk>',
    'start_of_turn_id': START_OF_TURN, 'end_of_turn_id': END_OF_TURN,
}
_ROLE_ALIASES = {'user': 'user', 'model': 'model', 'assistant': 'model', 'system': 'system'}
_Type = sp_pb2.ModelProto.SentencePiece.Type


def _trie_regex(words: Sequence[str]) -> str:
  """A regex matching the longest of `words` at a position, factored as a trie: a plain
  alternation of Gemma's ~6k `<unusedN>` pieces would be tried branch by branch at every `<`."""
  trie: dict = {}
  for word in words:
    node = trie
    for ch in word:
      node = node.setdefault(ch, {})
    node[''] = {}

  def build(node: dict) -> str:
    alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
    if not alts:
      return ''
    body = alts[0] if len(alts) == 1 else '(?:' + '|'.join(alts) + ')'
    # Where a word ends, its continuations are optional; greedy, so the longest word wins.
    return f'(?:{body})?' if '' in node else body

  return build(trie)


def chat_turns(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
  """The one check of a conversation: [(role, content)] with roles 'user'/'model', alternating
  from user, after an optional first system message (folded into the first user turn, as Gemma
  has no system role); 'assistant' is an alias of 'model'. Raises ValueError naming the message.
  Chat formatting, chat ids and the training data (gemma_jax.data) all validate through it."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise TypeError('messages must be a list of {"role": ..., "content": ...} dicts')
  turns, system = [], None
  for k, msg in enumerate(messages):
    if not isinstance(msg, Mapping) or 'role' not in msg or 'content' not in msg:
      raise ValueError(f'messages[{k}] must be a dict with "role" and "content", got {msg!r}')
    role, content = _ROLE_ALIASES.get(msg['role']), msg['content']
    if role is None:
      raise ValueError(f'messages[{k}] has role {msg["role"]!r}; expected one of '
                       f'{sorted(_ROLE_ALIASES)}')
    if not isinstance(content, str):
      raise ValueError(f'messages[{k}]["content"] must be a str, got {type(content).__name__}')
    if role == 'system':
      if k != 0:
        raise ValueError(f'messages[{k}]: a system message is only allowed first (Gemma has no '
                         'system role; it is folded into the first user turn)')
      system = content
      continue
    expected = 'user' if not turns or turns[-1][0] == 'model' else 'model'
    if role != expected:
      raise ValueError(f'messages[{k}] has role {msg["role"]!r} but {expected!r} was expected: '
                       'the conversation must start with a user turn and alternate user/model '
                       '(an optional system message, then user and model turns alternating)')
    if system is not None and not turns:
      content = system + '\n\n' + content
    turns.append((role, content))
  if not turns:
    raise ValueError('messages must contain at least one user message')
  return turns


class Tokenizer:
  """A Gemma SentencePiece tokenizer plus the chat format.

  Args:
    model: path to a SentencePiece `.model` file, or the bytes of a serialized `ModelProto`
      (e.g. from `gemma_jax.convert.gguf_tokenizer.sentencepiece_model_from_gguf`).
    source: name used in error messages when `model` is bytes (e.g. the GGUF file it came from).

  Text is matched against special pieces before SentencePiece sees it: any control or unknown
  piece written literally (`<bos>`, `<start_of_turn>`, `<unk>`...) becomes its id, as in
  transformers' tokenizer. User-defined pieces are matched by SentencePiece itself.
  """

  def __init__(self, model: str | os.PathLike | bytes, *, source: str | None = None):
    self._sp = spm.SentencePieceProcessor()
    if isinstance(model, (bytes, bytearray)):
      self.source = source or '<serialized ModelProto>'
      try:
        self._sp.LoadFromSerializedProto(bytes(model))
      except (RuntimeError, OSError) as e:
        raise ValueError(f'{self.source}: not a valid SentencePiece model: {e}') from e
    else:
      self.source = source or os.fspath(model)
      if not os.path.isfile(model):
        raise ValueError(f'{self.source}: SentencePiece model file not found')
      try:
        self._sp.Load(os.fspath(model))
      except (RuntimeError, OSError) as e:
        raise ValueError(f'{self.source}: not a valid SentencePiece model: {e}') from e
    for attr, piece in _REQUIRED_PIECES.items():
      setattr(self, attr, self._lookup(piece))

    # Control/unknown pieces are invisible to SentencePiece's text matching; split them out here.
    self._special_ids = {
        self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())
        if self._sp.is_control(i) or self._sp.is_unknown(i)}
    pattern = _trie_regex([p for p in self._special_ids if p])
    self._special_re = re.compile(pattern) if pattern else None
    self._special_pieces = {i: p for p, i in self._special_ids.items()}
    # Framing tokens carry no text; decode() drops them. Other specials decode to their piece.
    self._silent_ids = frozenset((self.pad_id, self.bos_id, self.eos_id))

  def _lookup(self, piece: str) -> int:
    i = self._sp.piece_to_id(piece)
    if self._sp.id_to_piece(i) != piece:
      raise ValueError(
          f'{self.source}: the tokenizer has no piece {piece!r}; a Gemma tokenizer needs '
          f'{sorted(_REQUIRED_PIECES.values())}')
    return i

  @property
  def vocab_size(self) -> int:
    """Number of pieces (ids are 0 .. vocab_size - 1)."""
    return self._sp.get_piece_size()

  def check_fits(self, vocab_size: int, model: str, hint: str = '') -> None:
    """Raises ValueError unless every id of this tokenizer is a row of a model's embedding of
    `vocab_size` rows (`model` names it in the message; `hint` says what to do). The one
    vocabulary check: the trainer, the converter and sample.py call it."""
    if self.vocab_size > vocab_size:
      raise ValueError(
          f'{self.source}: vocabulary mismatch: the tokenizer has {self.vocab_size} pieces but '
          f'the model has only {vocab_size} embedding rows ({model}): its ids would index past '
          f'the embedding.{" " + hint if hint else ""}')

  def piece_to_id(self, piece: str) -> int:
    """Id of `piece`; ValueError if the vocabulary has no such piece."""
    return self._lookup(piece)

  def id_to_piece(self, i: int) -> str:
    """The piece (vocabulary string, spaces as U+2581) for id `i`."""
    return self._sp.id_to_piece(int(i))

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text`, with `<bos>` first when `add_bos`; special pieces in text are matched."""
    if not isinstance(text, str):
      raise TypeError(f'encode expects a str, got {type(text).__name__}')
    ids = [self.bos_id] if add_bos else []
    if self._special_re is None:
      return ids + self._sp.encode(text)
    start = 0
    for m in self._special_re.finditer(text):
      if m.start() > start:
        ids.extend(self._sp.encode(text[start:m.start()]))
      ids.append(self._special_ids[m.group()])
      start = m.end()
    if start < len(text):
      ids.extend(self._sp.encode(text[start:]))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`. `<pad>`, `<bos>` and `<eos>` are dropped; other special pieces (e.g.
    `<start_of_turn>`) are written out, so `decode(encode(s)) == s` for text without those three."""
    out, run = [], []
    for i in ids:
      i = int(i)
      if i < 0 or i >= self.vocab_size:
        raise ValueError(f'token id {i} out of range [0, {self.vocab_size}) for {self.source}')
      if i in self._special_pieces:
        if run:
          out.append(self._sp.decode(run))
          run = []
        if i not in self._silent_ids:
          out.append(self._special_pieces[i])
      else:
        run.append(i)
    if run:
      out.append(self._sp.decode(run))
    return ''.join(out)

  # Chat format.

  def format_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = True) -> str:
    """The conversation as text in Gemma's control-token format (without `<bos>`).

    messages: [{'role': 'user'|'model'|'assistant'|'system', 'content': str}, ...]; 'assistant'
      is an alias of 'model'; an optional first 'system' message is prepended to the first user
      turn with a blank line; user and model turns must alternate, starting with user.
    add_generation_prompt: append `<start_of_turn>model\\n` so the model writes the next turn
      (the last message must then be a user message).
    Contents are used verbatim (not stripped).
    """
    turns = chat_turns(messages)
    if add_generation_prompt and turns[-1][0] != 'user':
      raise ValueError('add_generation_prompt=True needs the last message to be a user message')
    text = ''.join(f'{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n' for role, content in turns)
    if add_generation_prompt:
      text += f'{START_OF_TURN}model\n'
    return text

  def encode_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = False, add_bos: bool = True,
                  ) -> tuple[list[int], list[bool]]:
    """Token ids of `format_chat(messages)` with `<bos>` first, and a loss mask.

    The one encoding of a conversation: training data, exact-match prompts and `ChatSession`
    turns all use it. `add_bos=False` encodes turns that continue a conversation already begun.

    Returns (ids, target_mask), equally long; target_mask is True exactly on the tokens of model
    turns' contents and on the `<end_of_turn>` closing each model turn. Turn headers, contents and
    closers are encoded separately, as a sampler sees a prompt and then its own output; this
    equals `encode(format_chat(...))` except where a content begins with a newline that would
    merge with the header's (e.g. `\\n` + `\\n` is the single token `\\n\\n`).
    """
    turns = chat_turns(messages)
    if add_generation_prompt and turns[-1][0] != 'user':
      raise ValueError('add_generation_prompt=True needs the last message to be a user message')
    ids, mask = ([self.bos_id], [False]) if add_bos else ([], [])
    newline = self._sp.encode('\n')

    def add(new_ids, target):
      ids.extend(new_ids)
      mask.extend([target] * len(new_ids))

    for role, content in turns:
      target = role == 'model'
      add([self.start_of_turn_id] + self._sp.encode(role + '\n'), False)
      add(self.encode(content, add_bos=False), target)
      add([self.end_of_turn_id], target)
      add(newline, False)
    if add_generation_prompt:
      add([self.start_of_turn_id] + self._sp.encode('model\n'), False)
    return ids, mask

  def save(self, path: str | os.PathLike) -> None:
    """Writes the SentencePiece model (a `.model` file loadable by `Tokenizer(path)`)."""
    with open(path, 'wb') as f:
      f.write(self._sp.serialized_model_proto())

  def serialized_model_proto(self) -> bytes:
    """The serialized SentencePiece `ModelProto`."""
    return self._sp.serialized_model_proto()

  def __repr__(self) -> str:
    return f'Tokenizer({self.source!r}, vocab_size={self.vocab_size})'
