"""Tests for gemma_jax.tokenizer and gemma_jax.convert.gguf_tokenizer.

The reference is transformers' own tokenizer rebuilt from the same GGUF file. One documented
difference is excluded from the id comparison: runs of 32 or more spaces (transformers' rebuilt
BPE splits them differently from SentencePiece's longest-match on the user-defined space pieces;
both decode to the same text, which test_roundtrip checks).
"""

import functools
import io
import pickle

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_jax.convert.gguf_tokenizer import sentencepiece_model_from_gguf, tokenizer_from_gguf
from gemma_jax.tokenizer import Tokenizer, strip_thoughts

_SP = sp_pb2.ModelProto.SentencePiece

PARITY_STRINGS = [
    '',
    'Hello world',
    'Hello, world! How are you today?',
    ' leading space',
    '  two leading spaces',
    'trailing spaces   ',
    'The quick brown fox jumps over the lazy dog.',
    'def add(a, b):\n    return a + b\n',
    'for (int i = 0; i < n; ++i) {\n\tsum += x[i];\n}',
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    '3.14159 2718281828 1,000,000 +42 -7 0x1F',
    'year 2024, 12:30:59, 1e-6',
    'a  b   c    d     e',
    '1 space, 2  spaces, 8        spaces, 31' + ' ' * 31 + 'end',
    'line1\nline2\n\nline4\n\n\n\nline8',
    '\n\n\n',
    '\t\ttabs\tand\t\t\tmore',
    'windows\r\nline endings\r\n',
    '안녕하세요, 세계! 젬마는 오픈 모델입니다.',
    'Gemma 모델 아키텍처는 multi-query attention을 사용합니다.',
    '日本語のテキストと中文文本',
    'Привет, мир! Ελληνικά',
    'مرحبا بالعالم',
    'café naïve résumé Ångström façade São Paulo',
    'e\u0301 (combining accent) vs \u00e9',
    'emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇰🇷🇺🇸',
    'rare chars: \u2603 \U0001F9EA \u0000 \u007f \u200b zero-width',
    'math: ∑ x² ≤ ∞, α β γ',
    '<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n',
    'text with <start_of_turn> inside and <end_of_turn> too',
    '<bos>starts with bos, ends with eos<eos>',
    '<pad><unk><mask> and <unused0> <unused6241>',
    '[multimodal] <start_of_image> <table><tr><td>x</td></tr></table>',
    '<start_of_turnx> <end_of_turn almost special',
    'HTML <b>bold</b> <i>it</i> <code>x</code>',
    'URL https://example.com/path?q=1&r=2#frag',
    'ALL CAPS AND MiXeD cAsE',
    'repeated aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',
    '▁ literal lower one eighth block ▁▁',
]
# Texts whose ids may differ from transformers (see module docstring) but must roundtrip.
ROUNDTRIP_ONLY = [
    'a' + ' ' * 32 + 'b',
    'x' + ' ' * 100 + 'y',
    ' ' * 64,
]


@pytest.fixture(scope='session')
def hf_tokenizer(gguf_path):
  transformers = pytest.importorskip('transformers')
  return transformers.AutoTokenizer.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture
def tok(gguf_tokenizer):
  return gguf_tokenizer


# Parity with transformers and roundtrips on the real Gemma 3 tokenizer.

def test_ids_match_transformers(tok, hf_tokenizer):
  assert len(PARITY_STRINGS) >= 30
  for s in PARITY_STRINGS:
    want = hf_tokenizer.encode(s, add_special_tokens=True)
    assert tok.encode(s) == want, s
    assert tok.encode(s, add_bos=False) == want[1:], s


def test_roundtrip(tok):
  for s in PARITY_STRINGS + ROUNDTRIP_ONLY:
    if any(p in s for p in ('<bos>', '<eos>', '<pad>', '\u2581')):
      continue  # Framing tokens are dropped by decode; U+2581 is SentencePiece's space (below).
    assert tok.decode(tok.encode(s)) == s, s
    assert tok.decode(tok.encode(s, add_bos=False)) == s, s


def test_literal_u2581_decodes_as_space(tok, hf_tokenizer):
  # SentencePiece (and transformers' rebuilt tokenizer) cannot tell a literal U+2581 from the
  # escaped space; both decode it as ' '.
  s = '\u2581x \u2581'
  assert tok.decode(tok.encode(s)) == ' x  '
  assert hf_tokenizer.decode(hf_tokenizer.encode(s), skip_special_tokens=True) == ' x  '


def test_long_space_runs_are_the_documented_difference(tok, hf_tokenizer):
  s = 'a' + ' ' * 40 + 'b'
  ids = tok.encode(s)
  assert tok.id_to_piece(ids[2]) == '\u2581' * 31  # Longest user-defined space piece first.
  assert hf_tokenizer.decode(hf_tokenizer.encode(s), skip_special_tokens=True) == s


def test_special_ids_looked_up_by_piece(tok):
  assert tok.vocab_size == 262144
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)  # Gemma 3 vocabulary.
  assert tok.piece_to_id('<start_of_turn>') == 105
  with pytest.raises(ValueError, match='no piece'):
    tok.piece_to_id('<no such piece>')


def test_control_tokens_in_text(tok):
  ids = tok.encode('<start_of_turn>user\nhi<end_of_turn><eos><bos><unk><pad>', add_bos=False)
  assert ids[0] == tok.start_of_turn_id
  assert ids[-6:] == [tok.piece_to_id('hi'), tok.end_of_turn_id, tok.eos_id, tok.bos_id,
                      tok.unk_id, tok.pad_id]


def test_decode_drops_framing_tokens_only(tok):
  ids = [tok.bos_id] + tok.encode('Hi<end_of_turn>', add_bos=False) + [tok.eos_id, tok.pad_id]
  assert tok.decode(ids) == 'Hi<end_of_turn>'
  assert tok.decode(np.array(ids, np.int32)) == 'Hi<end_of_turn>'
  assert tok.decode([tok.unk_id]) == '<unk>'
  with pytest.raises(ValueError, match='out of range'):
    tok.decode([tok.vocab_size])


def test_byte_fallback(tok):
  # A character absent from the vocabulary is spelled as its UTF-8 bytes, not <unk>.
  s = '\U000E0041'  # A tag character.
  ids = tok.encode(s, add_bos=False)
  assert [tok.id_to_piece(i) for i in ids] == ['<0xF3>', '<0xA0>', '<0x81>', '<0x81>']
  assert tok.decode(ids) == s


def test_save_and_reload(tok, tmp_path):
  path = tmp_path / 'tokenizer.model'
  tok.save(path)
  again = Tokenizer(path)
  assert again.vocab_size == tok.vocab_size
  for s in PARITY_STRINGS[:10] + PARITY_STRINGS[-12:]:
    assert again.encode(s) == tok.encode(s)
  plain = spm.SentencePieceProcessor(model_file=str(path))  # A standard .model file.
  assert plain.bos_id() == tok.bos_id and plain.eos_id() == tok.eos_id
  assert plain.encode('Hello world') == tok.encode('Hello world', add_bos=False)


def test_pickle(tok):
  # Data pipelines ship the tokenizer to worker processes.
  again = pickle.loads(pickle.dumps(tok))
  s = PARITY_STRINGS[28]
  assert again.encode(s) == tok.encode(s) and again.decode(again.encode(s)) == s


def test_rebuilt_model_proto(gguf_tokenizer):
  proto = sp_pb2.ModelProto.FromString(gguf_tokenizer.serialized_model_proto())
  types = np.array([p.type for p in proto.pieces])
  assert (types == _SP.UNKNOWN).sum() == 1 and proto.pieces[3].piece == '<unk>'
  assert [i for i in np.flatnonzero(types == _SP.CONTROL)] == [0, 1, 2]
  assert (types == _SP.BYTE).sum() == 256
  assert proto.pieces[105].type == _SP.USER_DEFINED  # So '<start_of_turn>' in text matches.
  assert proto.pieces[138].piece == '\u2581\u2581'  # GGUF stores this one as '  '.
  assert not any(' ' in p.piece for p in proto.pieces)
  assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
  assert proto.trainer_spec.byte_fallback
  norm = proto.normalizer_spec
  assert (norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces) == (
      'identity', False, False)


# Errors.

def test_not_a_gguf_file(tmp_path):
  path = tmp_path / 'model.gguf'
  path.write_bytes(b'not a gguf file at all')
  with pytest.raises(ValueError, match='model.gguf.*not a GGUF'):
    sentencepiece_model_from_gguf(path)
  with pytest.raises(ValueError, match='not found'):
    tokenizer_from_gguf(tmp_path / 'missing.gguf')


def _write_gguf(path, tokens=None, types=None, unk=3):
  gguf = pytest.importorskip('gguf')
  writer = gguf.GGUFWriter(str(path), arch='gemma3')
  if tokens is not None:
    writer.add_tokenizer_model('llama')
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    if unk is not None:
      writer.add_unk_token_id(unk)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_without_tokenizer(tmp_path):
  path = tmp_path / 'no_tokenizer.gguf'
  _write_gguf(path)
  with pytest.raises(ValueError, match='no_tokenizer.gguf.*tokenizer.ggml.model'):
    tokenizer_from_gguf(path)


def _tiny_vocab(with_turns=True):
  tokens = ['<pad>', '<eos>', '<bos>', '<unk>']
  types = [3, 3, 3, 3]
  if with_turns:
    tokens += ['<start_of_turn>', '<end_of_turn>']
    types += [3, 3]
  tokens += ['\n', '  '] + [f'<0x{b:02X}>' for b in range(256)] + ['▁', 'a', 'b', 'ab']
  types += [4, 4] + [6] * 256 + [1, 1, 1, 1]
  return tokens, types


def test_tiny_gguf_tokenizer(tmp_path):
  path = tmp_path / 'tiny.gguf'
  _write_gguf(path, *_tiny_vocab())
  tok = tokenizer_from_gguf(path)
  assert tok.vocab_size == 268
  assert (tok.start_of_turn_id, tok.end_of_turn_id, tok.unk_id) == (4, 5, 3)
  ids = tok.encode('<start_of_turn>ab  a\nz', add_bos=False)
  assert [tok.id_to_piece(i) for i in ids] == [
      '<start_of_turn>', 'ab', '▁▁', 'a', '\n', '<0x7A>']
  assert tok.decode(ids) == '<start_of_turn>ab  a\nz'


def test_missing_required_piece(tmp_path):
  path = tmp_path / 'noturns.gguf'
  _write_gguf(path, *_tiny_vocab(with_turns=False))
  with pytest.raises(ValueError, match="noturns.gguf.*'<start_of_turn>'"):
    tokenizer_from_gguf(path)


def test_bad_unknown_token(tmp_path):
  tokens, types = _tiny_vocab()
  types[3] = 2
  types[-1] = 2  # A second UNKNOWN-typed token.
  path = tmp_path / 'twounk.gguf'
  _write_gguf(path, tokens, types)
  with pytest.raises(ValueError, match='twounk.gguf.*exactly one unknown'):
    tokenizer_from_gguf(path)


def test_bad_model_file(tmp_path):
  path = tmp_path / 'bad.model'
  path.write_bytes(b'garbage')
  with pytest.raises(ValueError, match='bad.model'):
    Tokenizer(path)
  with pytest.raises(ValueError, match='not found'):
    Tokenizer(tmp_path / 'missing.model')


# Chat format.

CONVERSATION = [
    {'role': 'user', 'content': 'What is a good place for travel in the US?'},
    {'role': 'model', 'content': 'California.'},
    {'role': 'user', 'content': 'What can I do in California?'},
]


def test_format_chat_multi_turn(tok):
  assert tok.format_chat(CONVERSATION) == (
      '<start_of_turn>user\nWhat is a good place for travel in the US?<end_of_turn>\n'
      '<start_of_turn>model\nCalifornia.<end_of_turn>\n'
      '<start_of_turn>user\nWhat can I do in California?<end_of_turn>\n'
      '<start_of_turn>model\n')
  closed = CONVERSATION[:2]
  assert tok.format_chat(closed, add_generation_prompt=False).endswith(
      '<start_of_turn>model\nCalifornia.<end_of_turn>\n')


def test_format_chat_system_and_assistant_alias(tok):
  messages = [
      {'role': 'system', 'content': 'Answer the following question in a concise and '
                                    'informative manner:'},
      {'role': 'user', 'content': 'Explain why the sky is blue'},
      {'role': 'assistant', 'content': 'Rayleigh scattering.'},
  ]
  assert tok.format_chat(messages, add_generation_prompt=False) == (
      '<start_of_turn>user\nAnswer the following question in a concise and informative manner:'
      '\n\nExplain why the sky is blue<end_of_turn>\n'
      '<start_of_turn>model\nRayleigh scattering.<end_of_turn>\n')


@pytest.mark.parametrize('messages, match', [
    ([], 'at least one user'),
    ([{'role': 'system', 'content': 'x'}], 'at least one user'),
    ([{'role': 'model', 'content': 'x'}], "'user' was expected"),
    ([{'role': 'user', 'content': 'x'}, {'role': 'user', 'content': 'y'}], 'alternate'),
    ([{'role': 'user', 'content': 'x'}, {'role': 'system', 'content': 'y'}], 'only allowed first'),
    ([{'role': 'tool', 'content': 'x'}], "role 'tool'"),
    ([{'role': 'user'}], r'messages\[0\] must be a dict'),
    ([{'role': 'user', 'content': ['x']}], 'must be a str'),
])
def test_format_chat_errors(tok, messages, match):
  with pytest.raises(ValueError, match=match):
    tok.format_chat(messages)
  with pytest.raises(ValueError, match=match):
    tok.encode_chat(messages)


def test_generation_prompt_needs_user_last(tok):
  with pytest.raises(ValueError, match='last message'):
    tok.format_chat(CONVERSATION[:2], add_generation_prompt=True)
  with pytest.raises(ValueError, match='last message'):
    tok.encode_chat(CONVERSATION[:2], add_generation_prompt=True)


CHATS = [
    CONVERSATION[:2],
    CONVERSATION + [{'role': 'assistant', 'content': 'Visit Yosemite.\n\nOr surf.  '}],
    [{'role': 'system', 'content': 'You are a helpful 2nd-grade teacher.'},
     {'role': 'user', 'content': '하늘은 왜 파란가요? 🙂'},
     {'role': 'model', 'content': 'def f(x):\n    return x  # 코드'}],
    [{'role': 'user', 'content': 'say <start_of_turn> literally'},
     {'role': 'model', 'content': 'ok: <end_of_turn> and <eos>'}],
    [{'role': 'user', 'content': ''}, {'role': 'model', 'content': ''}],
]


@pytest.mark.parametrize('gen', [False, True])
def test_encode_chat_equals_encode_of_format_chat(tok, gen):
  for messages in CHATS + [CONVERSATION]:
    if gen and messages[-1]['role'] != 'user':
      messages = messages[:-1]
    ids, mask = tok.encode_chat(messages, add_generation_prompt=gen)
    assert ids == tok.encode(tok.format_chat(messages, add_generation_prompt=gen))
    assert len(mask) == len(ids)
    if gen:
      assert not any(mask[-3:])


def test_encode_chat_mask_covers_model_turns(tok):
  for messages in CHATS:
    ids, mask = tok.encode_chat(messages)
    targets = [i for i, m in zip(ids, mask) if m]
    model_turns = [m['content'] for m in messages if m['role'] in ('model', 'assistant')]
    want = []
    for content in model_turns:
      want += tok.encode(content, add_bos=False) + [tok.end_of_turn_id]
    assert targets == want
    # Everything else (BOS, headers, user turns, newlines after <end_of_turn>) is masked out.
    assert not mask[0] and ids[0] == tok.bos_id
    assert sum(mask) == len(want)
    if not any('<end_of_turn>' in m['content'] for m in messages):
      eot = [k for k, i in enumerate(ids) if i == tok.end_of_turn_id]
      assert [mask[k] for k in eot] == [i % 2 == 1 for i in range(len(eot))]


def test_encode_chat_is_prefix_stable(tok):
  # Extending a conversation only appends ids, so a chat session can keep its KV cache.
  short, _ = tok.encode_chat(CONVERSATION, add_generation_prompt=True)
  longer, _ = tok.encode_chat(CHATS[1])
  assert longer[:len(short)] == short


def test_encode_chat_leading_newline_is_encoded_separately(tok):
  # Documented exception to equality with encode(format_chat): the header's '\n' and a content's
  # leading '\n' would merge into '\n\n'; encode_chat keeps the header's token, as a sampler does.
  messages = [{'role': 'user', 'content': 'hi'}, {'role': 'model', 'content': '\nyes'}]
  ids, mask = tok.encode_chat(messages)
  assert tok.decode(ids) == tok.format_chat(messages, add_generation_prompt=False)
  header = tok.encode('<start_of_turn>model\n', add_bos=False)
  k = len(tok.encode_chat(messages[:1])[0])
  assert ids[k:k + len(header)] == header and not any(mask[k:k + len(header)])


def test_control_pieces_of_a_plain_model_match_in_text():
  # A .model file may mark <start_of_turn> and many <unusedN> as CONTROL, which SentencePiece
  # never matches in text; Tokenizer matches them itself (longest piece wins) and decodes them.
  proto = sp_pb2.ModelProto()
  specials = ['<pad>', '<eos>', '<bos>', '<unk>', '<start_of_turn>', '<end_of_turn>']
  specials += [f'<unused{i}>' for i in range(3000)]
  for k, piece in enumerate(specials):
    proto.pieces.add(piece=piece, score=0.0, type=_SP.UNKNOWN if k == 3 else _SP.CONTROL)
  for b in range(256):
    proto.pieces.add(piece=f'<0x{b:02X}>', score=0.0, type=_SP.BYTE)
  for k, piece in enumerate(['▁', 'a', 'b', 'ab']):
    proto.pieces.add(piece=piece, score=-float(k), type=_SP.NORMAL)
  proto.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
  proto.trainer_spec.byte_fallback = True
  proto.normalizer_spec.name = 'identity'
  proto.normalizer_spec.add_dummy_prefix = False
  tok = Tokenizer(proto.SerializeToString(), source='plain.model')
  assert (tok.start_of_turn_id, tok.end_of_turn_id) == (4, 5)
  text = '<start_of_turn>ab<unused12><unused1><unused12x<end_of_turn>'
  ids = tok.encode(text, add_bos=False)
  assert ids[:4] == [4, tok.piece_to_id('ab'), tok.piece_to_id('<unused12>'),
                     tok.piece_to_id('<unused1>')]
  assert ids[-1] == 5
  assert tok.decode(ids) == text


def test_one_vocabulary_check(tok):
  """Tokenizer.check_fits is the check the trainer, the converter and sample.py share: a tokenizer
  fits a model whose embedding has at least as many rows as it has pieces."""
  tok.check_fits(tok.vocab_size, 'model m')
  tok.check_fits(tok.vocab_size + 5, 'model m')
  with pytest.raises(ValueError, match=rf'{tok.vocab_size} pieces but the model has only '
                                       rf'{tok.vocab_size - 1} embedding rows \(model m\).*Do X'):
    tok.check_fits(tok.vocab_size - 1, 'model m', 'Do X.')


# Gemma 4's chat format, on small tokenizers trained here (no real Gemma 4 vocabulary is shipped).

GEMMA4_PIECES = ('<|turn>', '<turn|>', '<|channel>', '<channel|>', '<|think|>')
GEMMA3_PIECES = ('<start_of_turn>', '<end_of_turn>')
_CORPUS = ['What is a good place for travel in the US? California. Name a color. And a fruit?',
           'Answer in one word. Red. Paris is in France. The system, the user and the model.',
           'I should think about this thought first. Yosemite is in California.']


@functools.lru_cache(maxsize=None)
def small_tokenizer_model(pieces=GEMMA4_PIECES) -> bytes:
  """A SentencePiece model trained here in milliseconds: Gemma's <pad> <eos> <bos> <unk> as ids
  0-3, then `<mask>` and `pieces` as user-defined pieces, BPE merges of a few sentences, byte
  fallback and no normalisation (every text round-trips, '\\n' is the byte piece <0x0A>)."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_CORPUS * 30), model_writer=model, vocab_size=400,
      model_type='bpe', pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece='<pad>',
      eos_piece='<eos>', bos_piece='<bos>', unk_piece='<unk>', hard_vocab_limit=False,
      byte_fallback=True, normalization_rule_name='identity', add_dummy_prefix=False,
      remove_extra_whitespaces=False, minloglevel=2, user_defined_symbols=['<mask>', *pieces])
  return model.getvalue()


@pytest.fixture(scope='module')
def tok4():
  return Tokenizer(small_tokenizer_model(), source='gemma4-small.model')


G4_CHAT = [
    {'role': 'user', 'content': 'What is a good place for travel in the US?'},
    {'role': 'assistant', 'content': 'California.'},
    {'role': 'user', 'content': 'Name a color.'},
]
G4_SYSTEM = {'role': 'system', 'content': 'Answer in one word.'}


def test_gemma4_format_is_picked_from_the_pieces(tok4):
  assert tok4.chat_format == 'gemma4'
  assert (tok4.start_of_turn, tok4.end_of_turn) == ('<|turn>', '<turn|>')
  # Looked up, not the real vocabulary's 105/106 (here the pieces follow <mask>, id 4).
  assert (tok4.start_of_turn_id, tok4.end_of_turn_id) == (
      tok4.piece_to_id('<|turn>'), tok4.piece_to_id('<turn|>')) == (5, 6)
  assert tok4.empty_thought_channel
  tok3 = Tokenizer(small_tokenizer_model(GEMMA3_PIECES), source='gemma3-small.model')
  assert tok3.chat_format == 'gemma' and not tok3.empty_thought_channel
  assert (tok3.start_of_turn_id, tok3.end_of_turn_id) == (5, 6)
  assert tok3.id_to_piece(tok3.end_of_turn_id) == '<end_of_turn>'
  # Both turn pieces make Gemma 4; one alone does not.
  half = Tokenizer(small_tokenizer_model(GEMMA3_PIECES + ('<|turn>',)))
  assert half.chat_format == 'gemma' and half.end_of_turn == '<end_of_turn>'
  with pytest.raises(ValueError, match=r"half.model.*no piece '<start_of_turn>'.*'<\|turn>'"):
    Tokenizer(small_tokenizer_model(('<|turn>',)), source='half.model')
  # A Gemma 4 vocabulary without the thought channel's pieces writes none (and cannot be asked to).
  bare = GEMMA4_PIECES[:2]
  assert not Tokenizer(small_tokenizer_model(bare)).empty_thought_channel
  with pytest.raises(ValueError, match=r"bare.model.*no piece '<\|channel>'"):
    Tokenizer(small_tokenizer_model(bare), source='bare.model', empty_thought_channel=True)
  with pytest.raises(ValueError, match='gemma3-small.model.*needs a Gemma 4 tokenizer'):
    Tokenizer(small_tokenizer_model(GEMMA3_PIECES), source='gemma3-small.model',
              empty_thought_channel=True)


def test_gemma4_format_chat_text(tok4):
  assert tok4.format_chat(G4_CHAT) == (
      '<|turn>user\nWhat is a good place for travel in the US?<turn|>\n'
      '<|turn>model\n<|channel>thought\n<channel|>California.<turn|>\n'
      '<|turn>user\nName a color.<turn|>\n'
      '<|turn>model\n<|channel>thought\n<channel|>')
  # A system turn only when there is a system message, first; no generation prompt on request.
  assert tok4.format_chat([G4_SYSTEM] + G4_CHAT[:2], add_generation_prompt=False) == (
      '<|turn>system\nAnswer in one word.<turn|>\n'
      '<|turn>user\nWhat is a good place for travel in the US?<turn|>\n'
      '<|turn>model\n<|channel>thought\n<channel|>California.<turn|>\n')
  # The E2B/E4B templates write no empty thought channel.
  plain = Tokenizer(small_tokenizer_model(), empty_thought_channel=False)
  assert plain.format_chat([G4_SYSTEM] + G4_CHAT) == (
      '<|turn>system\nAnswer in one word.<turn|>\n'
      '<|turn>user\nWhat is a good place for travel in the US?<turn|>\n'
      '<|turn>model\nCalifornia.<turn|>\n'
      '<|turn>user\nName a color.<turn|>\n'
      '<|turn>model\n')


def _g4_expected(tok, messages, gen, empty_thought=True):
  """(ids, mask) of a conversation spelled out piece by piece: <bos>, then per turn <|turn>,
  role + '\\n', [<|channel>thought\\n<channel|> for model turns], content, <turn|>, '\\n'."""
  text = lambda s: tok.encode(s, add_bos=False)  # plain text (no special pieces in it)
  thought = ([tok.piece_to_id('<|channel>')] + text('thought\n') + [tok.piece_to_id('<channel|>')]
             if empty_thought else [])
  turn, end = tok.piece_to_id('<|turn>'), tok.piece_to_id('<turn|>')
  ids, mask = [tok.bos_id], [False]
  for m in messages:
    role = 'model' if m['role'] == 'assistant' else m['role']
    head = [turn] + text(role + '\n') + (thought if role == 'model' else [])
    body = text(m['content']) + [end]
    ids += head + body + text('\n')
    mask += [False] * len(head) + [role == 'model'] * len(body) + [False] * len(text('\n'))
  if gen:
    head = [turn] + text('model\n') + thought
    ids, mask = ids + head, mask + [False] * len(head)
  return ids, mask


@pytest.mark.parametrize('system', [False, True])
@pytest.mark.parametrize('empty_thought', [True, False])
def test_gemma4_encode_chat_ids_and_mask(system, empty_thought):
  tok = Tokenizer(small_tokenizer_model(), empty_thought_channel=empty_thought)
  messages = ([G4_SYSTEM] if system else []) + G4_CHAT
  for gen, msgs in ((True, messages), (False, messages[:-1])):
    ids, mask = tok.encode_chat(msgs, add_generation_prompt=gen)
    assert (ids, mask) == _g4_expected(tok, msgs, gen, empty_thought)
    assert ids == tok.encode(tok.format_chat(msgs, add_generation_prompt=gen))
    assert tok.decode(ids) == tok.format_chat(msgs, add_generation_prompt=gen)
  # The training targets are the model turns' contents, each closed by <turn|>.
  ids, mask = tok.encode_chat(messages[:-1])
  assert tok.decode([i for i, m in zip(ids, mask) if m]) == 'California.<turn|>'


def test_gemma4_thoughts_are_stripped_from_model_turns(tok4):
  thought = '<|channel>thought\nThe user wants a city.<channel|>'
  messages = [{'role': 'user', 'content': 'I should think about this?'},
              {'role': 'model', 'content': thought + 'Paris.'}]
  text = tok4.format_chat(messages, add_generation_prompt=False)
  assert text.endswith('<|turn>model\n<|channel>thought\n<channel|>Paris.<turn|>\n')
  assert 'The user wants' not in text
  ids, mask = tok4.encode_chat(messages)
  assert tok4.decode([i for i, m in zip(ids, mask) if m]) == 'Paris.<turn|>'
  # User turns, and every turn of a Gemma 1-3 tokenizer, are kept verbatim.
  user = [{'role': 'user', 'content': thought}]
  assert tok4.format_chat(user).startswith(f'<|turn>user\n{thought}<turn|>')
  tok3 = Tokenizer(small_tokenizer_model(GEMMA3_PIECES))
  assert f'<start_of_turn>model\n{thought}Paris.<end_of_turn>' in tok3.format_chat(
      messages, add_generation_prompt=False)
  # The HF template's strip_thinking: an unclosed <|channel> drops the rest, a stray <channel|>
  # is dropped; no trimming here.
  assert strip_thoughts(' a<|channel>x<channel|>b<|channel>y<channel|> c ') == ' ab c '
  assert strip_thoughts('a<|channel>never closed') == 'a'
  assert strip_thoughts('a<channel|>b') == 'ab'


def test_gemma4_encode_chat_is_prefix_stable(tok4):
  # A conversation grows by appending ids, so a ChatSession keeps its cache, and the prompt of a
  # turn is exactly what training data puts before that turn's targets.
  messages = [G4_SYSTEM] + G4_CHAT
  prompt, prompt_mask = tok4.encode_chat(messages, add_generation_prompt=True)
  longer, mask = tok4.encode_chat(messages + [{'role': 'model', 'content': 'Red.'}])
  assert longer[:len(prompt)] == prompt and mask[:len(prompt)] == prompt_mask
  assert mask[len(prompt):] == [True] * (len(longer) - len(prompt) - 1) + [False]


def test_gemma1_3_format_on_a_small_tokenizer():
  tok3 = Tokenizer(small_tokenizer_model(GEMMA3_PIECES))
  messages = [G4_SYSTEM] + G4_CHAT
  assert tok3.format_chat(messages) == (
      '<start_of_turn>user\nAnswer in one word.\n\nWhat is a good place for travel in the US?'
      '<end_of_turn>\n<start_of_turn>model\nCalifornia.<end_of_turn>\n'
      '<start_of_turn>user\nName a color.<end_of_turn>\n<start_of_turn>model\n')
  ids, mask = tok3.encode_chat(messages, add_generation_prompt=True)
  assert ids == tok3.encode(tok3.format_chat(messages))
  assert tok3.decode([i for i, m in zip(ids, mask) if m]) == 'California.<end_of_turn>'


@pytest.mark.parametrize('messages, match', [
    ([G4_SYSTEM], 'at least one user'),
    ([G4_CHAT[0], G4_SYSTEM], 'only allowed first'),
    ([G4_SYSTEM, G4_CHAT[1]], "'user' was expected"),
    ([G4_CHAT[0], G4_CHAT[0]], 'alternate'),
])
def test_gemma4_format_chat_errors(tok4, messages, match):
  with pytest.raises(ValueError, match=match):
    tok4.format_chat(messages)
  with pytest.raises(ValueError, match=match):
    tok4.encode_chat(messages)
  with pytest.raises(ValueError, match='last message'):
    tok4.encode_chat(G4_CHAT[:2], add_generation_prompt=True)


def test_gemma4_tokenizer_pickles(tok4):
  again = pickle.loads(pickle.dumps(tok4))
  assert again.chat_format == 'gemma4' and again.encode_chat(G4_CHAT) == tok4.encode_chat(G4_CHAT)
