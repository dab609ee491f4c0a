"""Rebuilds a SentencePiece model from the tokenizer stored in a GGUF file.

llama.cpp's converter writes a SentencePiece ("llama") tokenizer as three parallel arrays,
`tokenizer.ggml.tokens / scores / token_type`, plus special ids. That is enough to rebuild an
equivalent SentencePiece `ModelProto` (BPE, byte fallback, identity normalisation), so Gemma's
tokenizer is available offline from a `.gguf` file alone.

Gemma 4 files (`tokenizer.ggml.model` 'gemma4', llama.cpp's `Gemma4Model.set_vocab`) carry the
same SentencePiece-style BPE vocabulary (pieces with U+2581, byte pieces, no dummy prefix) but
placeholder scores (-1000) and the merge list of the Hugging Face tokenizer instead. SentencePiece
BPE merges, at each step, the adjacent pair whose joined piece scores highest; Hugging Face BPE
merges the pair of lowest rank. So a piece made by merge r is given score -r (its first merge),
and multi-character pieces no merge makes get the lowest score: the same choices, as long as the
merge list holds every pair whose joined piece is in the vocabulary (true of lists converted from
SentencePiece, which Gemma's is).

Type mapping (GGUF -> SentencePiece), chosen to reproduce transformers' tokenizer:
  NORMAL -> NORMAL, BYTE -> BYTE, UNUSED -> UNUSED, USER_DEFINED -> USER_DEFINED;
  the piece named by `unknown_token_id` -> UNKNOWN (GGUF marks Gemma's `<unk>` CONTROL);
  CONTROL -> CONTROL for `<bos>`, `<eos>`, `<pad>` (the ids given in the metadata), and
  CONTROL -> USER_DEFINED for every other control piece (`<start_of_turn>`, `<mask>`,
  `<unusedN>`...), because SentencePiece matches user-defined pieces written in text and decodes
  them to their text, as transformers does with its special tokens. `Tokenizer` matches the
  remaining control/unknown pieces in text itself.
"""

from __future__ import annotations

import os

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_jax.tokenizer import Tokenizer

_SP = sp_pb2.ModelProto.SentencePiece
# llama.cpp's gguf.TokenType values.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_TYPE_MAP = {_NORMAL: _SP.NORMAL, _UNKNOWN: _SP.UNKNOWN, _CONTROL: _SP.USER_DEFINED,
             _USER_DEFINED: _SP.USER_DEFINED, _UNUSED: _SP.UNUSED, _BYTE: _SP.BYTE}


def _open(path_or_reader):
  """Returns (reader, name for messages)."""
  import gguf  # Deferred: only GGUF import paths need the package.
  from gemma_jax.convert.gguf import open_gguf  # Deferred: gguf.py imports this module lazily too.
  if isinstance(path_or_reader, gguf.GGUFReader):
    return path_or_reader, str(getattr(path_or_reader.data, 'filename', None) or '<GGUFReader>')
  path = os.fspath(path_or_reader)
  return open_gguf(path), path


def _field(reader, name, key, required=True):
  field = reader.fields.get(key)
  if field is None:
    if required:
      raise ValueError(f'{name}: GGUF metadata has no key {key!r}; the file carries no '
                       'SentencePiece tokenizer that can be rebuilt')
    return None
  return field


def _scalar(reader, name, key):
  field = _field(reader, name, key, required=False)
  return None if field is None else field.parts[field.data[0]][0].item()


def _strings(field):
  # Decoding 262k strings through field.contents() is slow; read the byte parts directly.
  return [bytes(field.parts[i]).decode('utf-8') for i in field.data]


def _numbers(field):
  return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.zeros(0)


def sentencepiece_model_from_gguf(path_or_reader) -> bytes:
  """Serialized SentencePiece `ModelProto` equivalent to a GGUF file's tokenizer.

  Args:
    path_or_reader: path to a `.gguf` file, or an open `gguf.GGUFReader`.
  Raises ValueError (naming the file) for a non-GGUF file, a non-SentencePiece tokenizer or
  missing/inconsistent tokenizer metadata.
  """
  return _model_proto(*_open(path_or_reader))


def tokenizer_from_gguf(path_or_reader) -> Tokenizer:
  """A `Tokenizer` rebuilt from a GGUF file's tokenizer metadata (a path or a `gguf.GGUFReader`;
  pass the reader you already have: parsing the metadata of a Gemma 3 file takes ~10 s)."""
  reader, name = _open(path_or_reader)
  return Tokenizer(_model_proto(reader, name), source=name)


def _scores_from_merges(tokens: list[str], merges: list[str], name: str) -> np.ndarray:
  """SentencePiece scores that make its BPE merge as a Hugging Face merge list does (see the
  module docstring): -rank for a merged piece, lower than every rank for other longer pieces."""
  index = {t: i for i, t in enumerate(tokens)}
  lengths = np.array([len(t) for t in tokens])
  scores = np.where(lengths > 1, -float(len(merges) + 1), 0.0)
  made = np.zeros(len(tokens), bool)
  for rank, merge in enumerate(merges):
    split = merge.find(' ', 1)  # llama.cpp's rule: a piece may itself start with a space
    if split < 0:
      raise ValueError(f'{name}: tokenizer.ggml.merges entry {rank} ({merge!r}) is not two '
                       'pieces separated by a space')
    i = index.get(merge[:split] + merge[split + 1:])
    if i is None:
      raise ValueError(f'{name}: tokenizer.ggml.merges entry {rank} ({merge!r}) makes a piece '
                       'that is not in tokenizer.ggml.tokens')
    if not made[i]:
      made[i], scores[i] = True, -float(rank)
  return scores


def _model_proto(reader, name) -> bytes:
  model = _field(reader, name, 'tokenizer.ggml.model')
  kind = bytes(model.parts[model.data[0]]).decode()
  if kind not in ('llama', 'gemma4'):
    raise ValueError(f'{name}: tokenizer.ggml.model is {kind!r}; only SentencePiece ("llama") '
                     'and Gemma 4 ("gemma4") tokenizers can be rebuilt as a SentencePiece model')
  tokens = _strings(_field(reader, name, 'tokenizer.ggml.tokens'))
  types = _numbers(_field(reader, name, 'tokenizer.ggml.token_type'))
  if kind == 'gemma4':
    scores = _scores_from_merges(tokens, _strings(_field(reader, name, 'tokenizer.ggml.merges')),
                                 name)
  else:
    scores = _numbers(_field(reader, name, 'tokenizer.ggml.scores'))
  if not len(tokens) == len(scores) == len(types):
    raise ValueError(f'{name}: tokenizer.ggml.tokens/scores/token_type have different lengths '
                     f'({len(tokens)}, {len(scores)}, {len(types)})')
  if not np.isfinite(np.asarray(scores, np.float64)).all():
    raise ValueError(f'{name}: tokenizer.ggml.scores holds NaN or infinite scores')
  special = {}
  for key in ('bos', 'eos', 'unknown', 'padding'):
    i = _scalar(reader, name, f'tokenizer.ggml.{key}_token_id')
    if i is not None and not 0 <= i < len(tokens):
      raise ValueError(f'{name}: tokenizer.ggml.{key}_token_id={i} is outside the vocabulary '
                       f'of {len(tokens)} tokens')
    special[key] = i
  unk = special['unknown']
  if unk is None:
    candidates = [i for i, t in enumerate(types) if t == _UNKNOWN]
    if len(candidates) != 1:
      raise ValueError(f'{name}: no tokenizer.ggml.unknown_token_id and {len(candidates)} tokens '
                       'of type UNKNOWN; SentencePiece needs exactly one unknown piece')
    unk = candidates[0]
  control_ids = {special[k] for k in ('bos', 'eos', 'padding')} - {None, unk}

  proto = sp_pb2.ModelProto()
  seen = {}
  for i, (token, score, ttype) in enumerate(zip(tokens, scores, types)):
    ttype = int(ttype)
    if ttype not in _TYPE_MAP:
      raise ValueError(f'{name}: token {i} ({token!r}) has unknown GGUF token type {ttype}')
    if i == unk:
      sp_type = _SP.UNKNOWN
    elif i in control_ids:
      sp_type = _SP.CONTROL
    elif ttype == _UNKNOWN:
      raise ValueError(f'{name}: token {i} ({token!r}) is of type UNKNOWN but the unknown token '
                       f'is {unk}; SentencePiece allows exactly one unknown piece')
    else:
      sp_type = _TYPE_MAP[ttype]
    # SentencePiece stores spaces as U+2581; llama.cpp writes user-defined pieces unescaped.
    piece = token if sp_type == _SP.BYTE else token.replace(' ', '\u2581')
    if piece in seen:
      raise ValueError(f'{name}: tokens {seen[piece]} and {i} are both {piece!r} once spaces are '
                       'escaped; SentencePiece pieces must be unique')
    seen[piece] = i
    proto.pieces.add(piece=piece, score=float(score), type=sp_type)

  def piece_of(i, default):
    return tokens[i] if i is not None else default

  trainer = proto.trainer_spec
  trainer.model_type = sp_pb2.TrainerSpec.BPE
  trainer.vocab_size = len(tokens)
  trainer.byte_fallback = True
  trainer.unk_id, trainer.unk_piece = unk, tokens[unk]
  trainer.bos_id = special['bos'] if special['bos'] is not None else -1
  trainer.eos_id = special['eos'] if special['eos'] is not None else -1
  trainer.pad_id = special['padding'] if special['padding'] is not None else -1
  trainer.bos_piece = piece_of(special['bos'], trainer.bos_piece)
  trainer.eos_piece = piece_of(special['eos'], trainer.eos_piece)
  trainer.pad_piece = piece_of(special['padding'], trainer.pad_piece)
  add_space_prefix = _scalar(reader, name, 'tokenizer.ggml.add_space_prefix')
  normalizer = proto.normalizer_spec
  normalizer.name = 'identity'
  normalizer.add_dummy_prefix = bool(add_space_prefix)
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  return proto.SerializeToString()

