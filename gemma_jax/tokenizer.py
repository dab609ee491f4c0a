"""SentencePiece tokenizer for Gemma and the Gemma chat (control-token) formats.

A tokenizer picks its chat format from its own pieces: a vocabulary holding `<|turn>` and `<turn|>`
is Gemma 4's ('gemma4'), any other is Gemma 1-3's ('gemma'). Every special id is looked up by its
piece, as ids differ between vocabularies (`<start_of_turn>`/`<end_of_turn>` are 106/107 in
Gemma 1/2 and 105/106 in Gemma 3; `<|turn>`/`<turn|>` are 105/106 in Gemma 4).

Gemma 1-3 have two roles, `user` and `model`, each turn written as

  <start_of_turn>user
  What is a good place for travel in the US?<end_of_turn>
  <start_of_turn>model
  California.<end_of_turn>

There is no system role: a system message's content is folded into the first user turn, followed
by a blank line.

Gemma 4 has three roles, `system`, `user` and `model`; the system turn is written only when there
is a system message. A model turn opens, with thinking off (the only mode here), with an empty
thought channel `<|channel>thought\\n<channel|>` (`empty_thought_channel`, below):

  <|turn>system
  Answer in one word.<turn|>
  <|turn>user
  What is a good place for travel in the US?<turn|>
  <|turn>model
  <|channel>thought
  <channel|>California.<turn|>

Sources: the official page https://ai.google.dev/gemma/docs/core/prompt-formatting-gemma4 (the
control tokens, the three roles, the system turn) and the chat template of the instruction-tuned
Hugging Face checkpoints (`chat_template.jinja` of google/gemma-4-31B-it, as stored in llama.cpp
`models/templates/gemma4.jinja`): BOS; a system turn only for a system message; turns
`<|turn>{role}\\n{content}<turn|>\\n`; thoughts `<|channel>...<channel|>` stripped from model
turns (its `strip_thinking`); the generation prompt `<|turn>model\\n` followed, with thinking off,
by `<|channel>thought\\n<channel|>`. The templates of google/gemma-4-E2B-it and -E4B-it (as stored
in ollama `model/renderers/testdata/gemma4_e2b_chat_template.jinja2`) write no empty thought
channel: use `Tokenizer(..., empty_thought_channel=False)` for those models.

Where this module departs from the template, and why:
- Contents are used verbatim (the template trims them; Gemma 3's template trims too, and this
  module never has), so a sampled reply is kept token for token.
- The empty thought channel opens every model turn, not only the generation prompt: training data
  (gemma_jax.data) then teaches exactly what a prompt asks for, and a longer conversation only
  appends ids, so a `ChatSession` keeps its KV cache. (The template leaves it out of earlier
  model turns.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

START_OF_TURN = '<start_of_turn>'  # Gemma 1-3
END_OF_TURN = '<end_of_turn>'
GEMMA4_START_OF_TURN = '<|turn>'
GEMMA4_END_OF_TURN = '<turn|>'
THOUGHT_START = '<|channel>'  # Gemma 4 thought channel: <|channel>thought\n...<channel|>
THOUGHT_END = '<channel|>'
EMPTY_THOUGHT = f'{THOUGHT_START}thought\n{THOUGHT_END}'
_REQUIRED_PIECES = {'pad_id': '<pad>', 'eos_id': '<eos>', 'bos_id': '<bos>', 'unk_id': '<unk>'}
_TURN_PIECES = {'gemma': (START_OF_TURN, END_OF_TURN),
                'gemma4': (GEMMA4_START_OF_TURN, GEMMA4_END_OF_TURN)}
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


def chat_turns(messages: Sequence[Mapping[str, str]], *,
               system_turn: bool = False) -> list[tuple[str, str]]:
  """The one check of a conversation: [(role, content)] with roles 'user'/'model', alternating
  from user, after an optional first system message; 'assistant' is an alias of 'model'. Raises
  ValueError naming the message. Chat formatting, chat ids and the training data (gemma_jax.data)
  all validate through it.

  system_turn: keep the system message as its own first turn ('system', content), as Gemma 4
    writes it; by default it is folded into the first user turn followed by a blank line, as
    Gemma 1-3 have no system role.
  """
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
        raise ValueError(f'messages[{k}]: a system message is only allowed first (Gemma 1-3 '
                         'fold it into the first user turn; Gemma 4 writes it as the first turn)')
      system = content
      continue
    expected = 'user' if not turns or turns[-1][0] == 'model' else 'model'
    if role != expected:
      raise ValueError(f'messages[{k}] has role {msg["role"]!r} but {expected!r} was expected: '
                       'the conversation must start with a user turn and alternate user/model '
                       '(an optional system message, then user and model turns alternating)')
    if system is not None and not turns and not system_turn:
      content = system + '\n\n' + content
    turns.append((role, content))
  if not turns:
    raise ValueError('messages must contain at least one user message')
  return [('system', system)] + turns if system is not None and system_turn else turns


def strip_thoughts(text: str) -> str:
  """`text` without its Gemma 4 thoughts `<|channel>...<channel|>`, as the HF template's
  `strip_thinking` removes them from model turns (an unclosed `<|channel>` drops the rest; a stray
  `<channel|>` is dropped), without its final trim."""
  return ''.join(part.split(THOUGHT_START)[0] for part in text.split(THOUGHT_END))


class Tokenizer:
  """A Gemma SentencePiece tokenizer plus its chat format.

  Args:
    model: path to a SentencePiece `.model` file, or the bytes of a serialized `ModelProto`
      (e.g. from `gemma_jax.convert.gguf_tokenizer.sentencepiece_model_from_gguf`).
    source: name used in error messages when `model` is bytes (e.g. the GGUF file it came from).
    empty_thought_channel: Gemma 4 only: open every model turn with `<|channel>thought\\n<channel|>`
      (thinking off), as the templates of gemma-4-26B-A4B-it and gemma-4-31B-it do; False for
      gemma-4-E2B-it and -E4B-it, whose templates do not. None (default): True for a Gemma 4
      vocabulary with the `<|channel>` and `<channel|>` pieces; a Gemma 1-3 one has none.

  `chat_format` is 'gemma4' when the vocabulary has `<|turn>` and `<turn|>`, else 'gemma'
  (Gemma 1-3). `start_of_turn`/`end_of_turn` are that format's turn pieces and
  `start_of_turn_id`/`end_of_turn_id` their ids (a sampler stops at `end_of_turn_id`).

  Text is matched against special pieces before SentencePiece sees it: any control or unknown
  piece written literally (`<bos>`, `<start_of_turn>`, `<unk>`...) becomes its id, as in
  transformers' tokenizer. User-defined pieces are matched by SentencePiece itself.
  """

  def __init__(self, model: str | os.PathLike | bytes, *, source: str | None = None,
               empty_thought_channel: bool | None = None):
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
    try:
      self._init_pieces(empty_thought_channel)
    except UnicodeDecodeError as e:  # a damaged file: SentencePiece does not check the pieces
      raise ValueError(f'{self.source}: not a valid SentencePiece model: a piece is not UTF-8 '
                       f'({e}).') from None

  def _init_pieces(self, empty_thought_channel: bool | None) -> None:
    """Special ids, the chat format and the special-piece matcher, from the loaded model."""
    proto = sp_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
    missing = [f for f in ('trainer_spec', 'normalizer_spec') if not proto.HasField(f)]
    if missing:  # Protobuf has no end marker: a file cut between two pieces parses, shorter.
      raise ValueError(f'{self.source}: not a valid SentencePiece model: it has no {missing[0]} '
                       '(a truncated file?).')
    for attr, piece in _REQUIRED_PIECES.items():
      setattr(self, attr, self._lookup(piece))
    gemma4 = all(self._has(p) for p in _TURN_PIECES['gemma4'])
    self.chat_format = 'gemma4' if gemma4 else 'gemma'
    self.start_of_turn, self.end_of_turn = _TURN_PIECES[self.chat_format]
    self.start_of_turn_id = self._lookup(self.start_of_turn)
    self.end_of_turn_id = self._lookup(self.end_of_turn)
    if empty_thought_channel and not gemma4:
      raise ValueError(f'{self.source}: empty_thought_channel=True needs a Gemma 4 tokenizer (one '
                       f'with {GEMMA4_START_OF_TURN!r} and {GEMMA4_END_OF_TURN!r}); this one has '
                       'the Gemma 1-3 chat format, which has no thought channel.')
    if empty_thought_channel is None:
      empty_thought_channel = gemma4 and self._has(THOUGHT_START) and self._has(THOUGHT_END)
    self.empty_thought_channel = bool(empty_thought_channel)
    # The ids of a model turn's header: <|turn>model\n, then the empty thought channel if any.
    self._empty_thought_ids = ([self._lookup(THOUGHT_START)] + self._sp.encode('thought\n')
                               + [self._lookup(THOUGHT_END)]) if self.empty_thought_channel else []

    # Control/unknown pieces are invisible to SentencePiece's text matching; split them out here.
    self._special_ids = {
        self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())
        if self._sp.is_control(i) or self._sp.is_unknown(i)}
    pattern = _trie_regex([p for p in self._special_ids if p])
    self._special_re = re.compile(pattern) if pattern else None
    self._special_pieces = {i: p for p, i in self._special_ids.items()}
    # Framing tokens carry no text; decode() drops them. Other specials decode to their piece.
    self._silent_ids = frozenset((self.pad_id, self.bos_id, self.eos_id))

  def _has(self, piece: str) -> bool:
    return self._sp.id_to_piece(self._sp.piece_to_id(piece)) == piece

  def _lookup(self, piece: str) -> int:
    if not self._has(piece):
      raise ValueError(
          f'{self.source}: the tokenizer has no piece {piece!r}; a Gemma tokenizer needs '
          f'{sorted(_REQUIRED_PIECES.values())} and the turn pieces {GEMMA4_START_OF_TURN!r}, '
          f'{GEMMA4_END_OF_TURN!r} (Gemma 4) or {START_OF_TURN!r}, {END_OF_TURN!r} (Gemma 1-3)')
    return self._sp.piece_to_id(piece)

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

  def _chat_turns(self, messages, add_generation_prompt: bool) -> list[tuple[str, str]]:
    """chat_turns in this tokenizer's format; Gemma 4 model turns lose their thoughts."""
    gemma4 = self.chat_format == 'gemma4'
    turns = chat_turns(messages, system_turn=gemma4)
    if add_generation_prompt and turns[-1][0] != 'user':
      raise ValueError('add_generation_prompt=True needs the last message to be a user message')
    if gemma4:
      turns = [(role, strip_thoughts(c) if role == 'model' else c) for role, c in turns]
    return turns

  def format_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = True) -> str:
    """The conversation as text in this tokenizer's chat format (without `<bos>`; see the module
    docstring for both formats).

    messages: [{'role': 'user'|'model'|'assistant'|'system', 'content': str}, ...]; 'assistant'
      is an alias of 'model'; an optional first 'system' message is the first turn (Gemma 4) or
      is prepended to the first user turn with a blank line (Gemma 1-3); user and model turns
      must alternate, starting with user.
    add_generation_prompt: append the model turn's header (`<start_of_turn>model\\n`; Gemma 4:
      `<|turn>model\\n`, then the empty thought channel) so the model writes the next turn (the
      last message must then be a user message).
    Contents are used verbatim (not stripped); Gemma 4 model turns lose their thoughts
    (`strip_thoughts`).
    """
    text = ''.join(f'{self._header(role)}{content}{self.end_of_turn}\n'
                   for role, content in self._chat_turns(messages, add_generation_prompt))
    return text + self._header('model') if add_generation_prompt else text

  def _header(self, role: str) -> str:
    thought = EMPTY_THOUGHT if role == 'model' and self.empty_thought_channel else ''
    return f'{self.start_of_turn}{role}\n{thought}'

  def _header_ids(self, role: str) -> list[int]:
    thought = self._empty_thought_ids if role == 'model' else []
    return [self.start_of_turn_id] + self._sp.encode(role + '\n') + thought

  def encode_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = False, add_bos: bool = True,
                  ) -> tuple[list[int], list[bool]]:
    """Token ids of `format_chat(messages)` with `<bos>` first, and a loss mask.

    The one encoding of a conversation: training data, exact-match prompts and `ChatSession`
    turns all use it. `add_bos=False` encodes turns that continue a conversation already begun.

    Returns (ids, target_mask), equally long; target_mask is True exactly on the tokens of model
    turns' contents and on the end of turn (`<end_of_turn>`; Gemma 4: `<turn|>`) closing each
    model turn; headers (with Gemma 4's empty thought channel) are not targets. Turn headers,
    contents and closers are encoded separately, as a sampler sees a prompt and then its own
    output; this equals `encode(format_chat(...))` except where a content begins with a newline
    that would merge with the header's (e.g. `\\n` + `\\n` is the single token `\\n\\n`).
    """
    turns = self._chat_turns(messages, add_generation_prompt)
    ids, mask = ([self.bos_id], [False]) if add_bos else ([], [])
    newline = self._sp.encode('\n')

    def add(new_ids, target):
      ids.extend(new_ids)
      mask.extend([target] * len(new_ids))

    for role, content in turns:
      target = role == 'model'
      add(self._header_ids(role), False)
      add(self.encode(content, add_bos=False), target)
      add([self.end_of_turn_id], target)
      add(newline, False)
    if add_generation_prompt:
      add(self._header_ids('model'), False)
    return ids, mask

  def save(self, path: str | os.PathLike) -> None:
    """Writes the SentencePiece model (a `.model` file loadable by `Tokenizer(path)`)."""
    with open(path, 'wb') as f:
      f.write(self._sp.serialized_model_proto())

  def serialized_model_proto(self) -> bytes:
    """The serialized SentencePiece `ModelProto`."""
    return self._sp.serialized_model_proto()

  def __repr__(self) -> str:
    return (f'Tokenizer({self.source!r}, vocab_size={self.vocab_size}, '
            f'chat_format={self.chat_format!r})')
