"""Tests for gemma_jax/data.py and scripts/make_sft_data.py (the SFT input pipeline)."""

import importlib.util
import io
import json
import os
import random
import sys

import numpy as np
import pytest
import sentencepiece as spm

from gemma_jax import data, data_sources, evaluate
from gemma_jax.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import make_sft_data  # noqa: E402  (a script, not a package)

KEYS = ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')


@pytest.fixture(scope='module')
def tok():
  """A tiny SentencePiece model with Gemma's special pieces and ids."""
  rng = random.Random(0)
  corpus = [f'Reverse the letters: {w} user model system {w[::-1]} {i}'
            for i in range(200) for w in [' '.join(rng.sample('abcdefghijklmnopqrstuvwxyz', 5))]]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, vocab_size=80, model_type='bpe',
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece='<pad>', eos_piece='<eos>',
      bos_piece='<bos>', unk_piece='<unk>', hard_vocab_limit=False, minloglevel=2,
      user_defined_symbols=['<start_of_turn>', '<end_of_turn>'])
  return Tokenizer(model.getvalue())


def _write(path, lines):
  path.write_text(''.join((l if isinstance(l, str) else json.dumps(l)) + '\n' for l in lines))
  return str(path)


def _records(n, seed=0, max_len=6):
  """n distinct prompt/response records; the prompt carries the record's index."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    w = ' '.join(rng.choice('abcdefg') for _ in range(rng.randint(1, max_len)))
    out.append({'prompt': f'{i} {w}', 'response': w[::-1]})
  return out


def _segments(batches):
  """Every packed example in `batches` as (tokens, targets, loss_mask) tuples; checks layout."""
  out = []
  for b in batches:
    assert set(b) == set(KEYS)
    for k in KEYS:
      assert b[k].dtype == (np.float32 if k == 'loss_mask' else np.int32), k
    for row in range(b['tokens'].shape[0]):
      seg, pos = b['segment_ids'][row], b['positions'][row]
      pad = seg == 0
      assert not b['loss_mask'][row][pad].any() and not b['tokens'][row][pad].any()
      n = seg.max()
      assert list(np.unique(seg[~pad])) == list(range(1, n + 1))
      assert (np.diff(seg[~pad]) >= 0).all()  # Contiguous segments 1..n, padding at the end.
      assert pad[np.argmax(pad):].all() if pad.any() else True
      for s in range(1, n + 1):
        idx = np.nonzero(seg == s)[0]
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
        t, y, m = (b[k][row][idx] for k in ('tokens', 'targets', 'loss_mask'))
        np.testing.assert_array_equal(t[1:], y[:-1])  # The next token of the same example.
        out.append((tuple(t), tuple(y), tuple(m)))
  return out


def _expected(tok, records, seq_len):
  """The (tokens, targets, loss_mask) each record should become, per data.encode_example."""
  out = []
  for r in records:
    e = data.encode_example(data_sources.record_to_messages(r, data_sources.DEFAULT_CONFIG, 'x'), tok, seq_len)
    out.append((tuple(e['tokens']), tuple(e['targets']), tuple(e['loss_mask'])))
  return out


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_jsonl_both_formats(tmp_path):
  path = _write(tmp_path / 'a.jsonl', [
      {'prompt': 'p', 'response': 'r'}, '',
      {'messages': [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'u'},
                    {'role': 'assistant', 'content': 'a'}]}])
  (w1, m1), (w2, m2) = data_sources.read_jsonl(path)
  assert (w1, w2) == (f'{path}:1', f'{path}:3')
  assert m1 == [{'role': 'user', 'content': 'p'}, {'role': 'model', 'content': 'r'}]
  assert [m['role'] for m in m2] == ['system', 'user', 'model']


@pytest.mark.parametrize('bad, message', [
    ('{"prompt": "p", "response": ', 'malformed JSON'),
    ({'messages': [{'role': 'user', 'content': 'u'}]}, 'no model turn'),
    ({'messages': [{'role': 'bot', 'content': 'u'}]}, "role 'bot'"),
    ({'messages': [{'role': 'model', 'content': 'm'}]}, 'alternating'),
    ({'messages': [{'role': 'user', 'content': 3}, {'role': 'model', 'content': 'm'}]}, 'string'),
    ({'question': 'q'}, "neither 'messages'"),
    ([1, 2], 'JSON object'),
])
def test_jsonl_errors_name_file_and_line(tmp_path, tok, bad, message):
  path = _write(tmp_path / 'bad.jsonl', [{'prompt': 'p', 'response': 'r'}, '', bad])
  with pytest.raises(ValueError, match=rf'bad\.jsonl:3: .*{message}'):
    data.make_dataset({'path': path}, tok, seq_len=16, batch_size=1, seed=0,
                      process_index=0, process_count=1)


def test_config_errors(tmp_path, tok):
  path = _write(tmp_path / 'a.jsonl', _records(2))
  kw = dict(seq_len=16, batch_size=1, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"Unknown data config key\(s\) \['pathh'\]"):
    data.make_dataset({'pathh': path}, tok, **kw)
  with pytest.raises(ValueError, match="data.truncate must be 'truncate' or 'drop'"):
    data.make_dataset({'path': path, 'truncate': 'cut'}, tok, **kw)
  with pytest.raises(ValueError, match='not found'):
    data.make_dataset({'path': path + 'x'}, tok, **kw)
  with pytest.raises(ValueError, match='data.eval_path'):
    data.make_dataset({'path': path}, tok, split='eval', **kw)


def test_loss_mask_only_on_model_turns(tmp_path, tok):
  messages = [{'role': 'system', 'content': 'system a b'}, {'role': 'user', 'content': 'c d'},
              {'role': 'model', 'content': 'e f g'}, {'role': 'user', 'content': 'a'},
              {'role': 'model', 'content': 'b c'}]
  path = _write(tmp_path / 'a.jsonl', [{'messages': messages}])
  ds = data.make_dataset({'path': path, 'packing': False}, tok, seq_len=64, batch_size=1,
                         seed=0, process_index=0, process_count=1)
  b = next(iter(ds))
  ids, mask = tok.encode_chat(messages)
  n = len(ids) - 1
  np.testing.assert_array_equal(b['tokens'][0, :n], ids[:-1])
  np.testing.assert_array_equal(b['targets'][0, :n], ids[1:])
  np.testing.assert_array_equal(b['loss_mask'][0, :n], mask[1:])
  assert not b['loss_mask'][0, n:].any() and not b['segment_ids'][0, n:].any()
  # The counted targets are exactly the model turns' contents, each closed by <end_of_turn>.
  counted = b['targets'][0][b['loss_mask'][0] == 1]
  eot = tok.end_of_turn_id
  expected = (tok.encode('e f g', add_bos=False) + [eot] + tok.encode('b c', add_bos=False) + [eot])
  np.testing.assert_array_equal(counted, expected)


@pytest.mark.parametrize('packing', [True, False])
def test_packing_loses_nothing_and_never_crosses_examples(tmp_path, tok, packing):
  records = _records(40, max_len=12)
  path = _write(tmp_path / 'a.jsonl', records)
  ds = data.make_dataset({'path': 'unused', 'eval_path': path, 'packing': packing}, tok,
                         seq_len=40, batch_size=3, seed=0, split='eval',
                         process_index=0, process_count=1)
  batches = list(iter(ds))
  assert all(b[k].shape == (3, 40) for b in batches for k in KEYS)
  got = _segments(batches)
  want = _expected(tok, records, 40)
  assert (sorted(got) == sorted(want)) if packing else (got == want)  # No token lost or shared.
  rows = sum(int((b['segment_ids'] > 0).any(axis=1).sum()) for b in batches)
  assert (rows < 40) if packing else (rows == 40)


def test_truncate_and_drop_are_counted(tmp_path, tok):
  long = {'prompt': 'a', 'response': 'b c d e f g a b c d e f g a b c d e f g'}
  late = {'prompt': 'a b c d e f g a b c d e f g a b c d e f g', 'response': 'x'}
  records = [long, {'prompt': 'a', 'response': 'b'}, late]
  path = _write(tmp_path / 'a.jsonl', records)
  for policy, kept, truncated, dropped in [('truncate', 2, 1, 1), ('drop', 1, 0, 2)]:
    ds = data.make_dataset({'path': '-', 'eval_path': path, 'truncate': policy}, tok,
                           seq_len=12, batch_size=4, seed=0, split='eval',
                           process_index=0, process_count=1)
    it = iter(ds)
    segments = _segments(list(it))
    assert len(segments) == kept
    assert it.stats == {'examples': 3, 'truncated': truncated, 'dropped': dropped}
    if policy == 'truncate':  # Keeps the start of the example: the first seq_len positions.
      ids, _ = tok.encode_chat(data_sources.record_to_messages(long, data_sources.DEFAULT_CONFIG, 'x'))
      assert segments[0][0] == tuple(ids[:12]) and segments[0][1] == tuple(ids[1:13])


def test_deterministic_for_seed_and_reshuffled_each_epoch(tmp_path, tok):
  records = _records(12)
  path = _write(tmp_path / 'a.jsonl', records)
  make = lambda seed: iter(data.make_dataset(
      {'path': path, 'packing': False}, tok, seq_len=32, batch_size=4, seed=seed,
      process_index=0, process_count=1))
  a, b, c = _take(make(0), 6), _take(make(0), 6), _take(make(1), 6)
  for x, y in zip(a, b):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  assert _segments(a) != _segments(c)
  epoch1, epoch2 = _segments(a[:3]), _segments(a[3:])
  assert sorted(epoch1) == sorted(epoch2) == sorted(_expected(tok, records, 32))
  assert epoch1 != epoch2


def test_resume_from_iterator_state(tmp_path, tok):
  records = _records(30, max_len=10)
  path = _write(tmp_path / 'a.jsonl', records)
  make = lambda: iter(data.make_dataset(
      {'path': path, 'truncate': 'drop'}, tok, seq_len=24, batch_size=2, seed=3,
      process_index=0, process_count=1))
  it = make()
  _take(it, 11)  # Past the first 16 packing bins, so the state is mid-stream.
  state = json.loads(json.dumps(it.get_state()))  # Survives a JSON round trip (Orbax/grain).
  expected, expected_stats = _take(it, 12), it.stats
  resumed = make()
  resumed.set_state(state)
  got = _take(resumed, 12)
  for x, y in zip(expected, got):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  assert resumed.stats == expected_stats and expected_stats['dropped'] > 0


def test_processes_take_their_rows_of_the_same_global_batches(tmp_path, tok):
  """3 processes see exactly the rows of the 1-process batches, with the same iterator state, so a
  job checkpointed with one process count resumes with another on the same examples."""
  path = _write(tmp_path / 'a.jsonl', _records(23))
  cfg = {'path': path, 'eval_path': path, 'packing': True}
  kw = dict(seq_len=32, batch_size=6, seed=0)
  for split in ('train', 'eval'):
    whole = iter(data.make_dataset(cfg, tok, **kw, split=split, process_index=0, process_count=1))
    parts = [iter(data.make_dataset(cfg, tok, **kw, split=split, process_index=p, process_count=3))
             for p in range(3)]
    for _ in range(3 if split == 'eval' else 6):
      want, got = next(whole), [next(it) for it in parts]
      for k in KEYS:
        np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
      assert {it.fingerprint for it in parts} == {whole.fingerprint}
      assert all(it.get_state() == whole.get_state() for it in parts)
  # Elastic resume: a 1-process state restored in a 2-process iterator continues the same batches.
  whole = iter(data.make_dataset(cfg, tok, **kw, process_index=0, process_count=1))
  _take(whole, 3)
  state = whole.get_state()
  half = iter(data.make_dataset(cfg, tok, **kw, process_index=1, process_count=2))
  half.set_state(state)
  for _ in range(3):
    want, got = next(whole), next(half)
    for k in KEYS:
      np.testing.assert_array_equal(got[k], want[k][3:])
    assert half.fingerprint == whole.fingerprint
  with pytest.raises(ValueError, match='batch_size=6 rows do not split evenly over 4 processes'):
    data.make_dataset(cfg, tok, **kw, process_index=0, process_count=4)


def test_tfds_source_without_tensorflow(tmp_path, tok):
  assert importlib.util.find_spec('tensorflow') is None
  turns = lambda u, m: [{'role': 'user', 'content': u}, {'role': 'model', 'content': m}]
  train = [{'question': f'q {i}', 'answer': f'a {i}', 'conv': turns(f'u {i}', f'm {i}')}
           for i in range(7)]
  bad = [{'question': 'q', 'answer': 'a', 'conv': [{'role': 'bot', 'content': 'x'}]}]
  data_sources.write_tfds_dataset({'train': train, 'test': train[:3], 'bad': bad}, 'tiny_sft_test',
                          str(tmp_path))
  assert 'tensorflow' not in sys.modules
  common = {'source': 'tfds', 'name': 'tiny_sft_test', 'data_dir': str(tmp_path),
            'eval_split': 'test', 'packing': False}
  for fields, key in [({'prompt_field': 'question', 'response_field': 'answer'}, 'pa'),
                      ({'messages_field': 'conv'}, 'um')]:
    ds = data.make_dataset({**common, **fields}, tok, seq_len=32, batch_size=7, seed=0,
                           process_index=0, process_count=1)
    got = sorted(_segments([next(iter(ds))]))
    want = [{'prompt': r['question'], 'response': r['answer']} if key == 'pa' else
            {'messages': r['conv']} for r in train]
    assert got == sorted(_expected(tok, want, 32))
    assert ds.num_records == 7
  evaluation = data.make_dataset({**common, 'messages_field': 'conv'}, tok, seq_len=32,
                                 batch_size=2, seed=0, split='eval',
                                 process_index=0, process_count=1)
  assert len(_segments(list(iter(evaluation)))) == 3
  with pytest.raises(ValueError, match=r"tfds tiny_sft_test\[bad\] record 0: .*role 'bot'"):
    next(iter(data.make_dataset({**common, 'train_split': 'bad', 'messages_field': 'conv'}, tok,
                                seq_len=32, batch_size=1, seed=0,
                                process_index=0, process_count=1)))
  with pytest.raises(ValueError, match='Cannot open TFDS dataset'):
    data.make_dataset({**common, 'name': 'no_such_sft'}, tok, seq_len=32, batch_size=1, seed=0,
                      process_index=0, process_count=1)


def test_quickstart_data_is_reproducible_and_checkable(tmp_path, tok):
  train, held_out = make_sft_data.make_records()
  for name, records in (('quickstart_train.jsonl', train), ('quickstart_eval.jsonl', held_out)):
    shipped = os.path.join(ROOT, 'data', name)
    assert os.path.getsize(shipped) < 1_000_000
    make_sft_data.write_jsonl(records, str(tmp_path / name))
    assert (tmp_path / name).read_bytes() == open(shipped, 'rb').read()
  train_examples = data_sources.read_jsonl(os.path.join(ROOT, 'data', 'quickstart_train.jsonl'))
  eval_examples = data_sources.read_jsonl(os.path.join(ROOT, 'data', 'quickstart_eval.jsonl'))
  assert any(m[0]['role'] == 'system' for _, m in train_examples)
  assert any(sum(t['role'] == 'model' for t in m) > 1 for _, m in train_examples)
  train_prompts = {t['content'] for _, m in train_examples for t in m if t['role'] == 'user'}
  prompts, references = [], []
  for _, messages in eval_examples:
    prompt, reference = evaluate.split_prompt_reference(messages)
    assert prompt[-1]['content'] not in train_prompts
    letters = prompt[-1]['content'].removeprefix(make_sft_data.PROMPT)
    assert make_sft_data.score(make_sft_data.reverse_letters(letters), reference)
    prompts.append(letters)
    references.append(reference)
  assert evaluate.exact_match(references, references) == 1.0
  assert evaluate.exact_match([' ' + r + ' ' for r in references], references) == 1.0
  assert evaluate.exact_match(prompts, references) < 0.2  # Palindromes only.
  assert not make_sft_data.score('a b', 'b a')


@pytest.mark.parametrize('messages', [
    [{'role': 'model', 'content': 'm'}],
    [{'role': 'user', 'content': 'u'}, {'role': 'user', 'content': 'v'},
     {'role': 'model', 'content': 'm'}],
    [{'role': 'user', 'content': 'u'}, {'role': 'system', 'content': 's'},
     {'role': 'model', 'content': 'm'}],
    [{'role': 'tool', 'content': 't'}, {'role': 'model', 'content': 'm'}],
])
def test_training_data_and_chat_format_share_one_conversation_rule(messages):
  """A conversation the chat format refuses is refused by the data pipeline with the same
  message (one rule: tokenizer.chat_turns), prefixed by where the record is."""
  from gemma_jax.tokenizer import chat_turns
  with pytest.raises(ValueError) as chat_error:
    chat_turns(messages)
  with pytest.raises(ValueError) as data_error:
    data_sources.record_to_messages({'messages': messages}, data_sources.DEFAULT_CONFIG, 'f.jsonl:9')
  assert str(data_error.value) == f'f.jsonl:9: {chat_error.value}'
