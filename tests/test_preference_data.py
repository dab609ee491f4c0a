"""Tests for gemma_jax/preference_data.py and scripts/make_preference_data.py (DPO pairs)."""

import json
import os
import sys

import numpy as np
import pytest

from gemma_jax import data_sources, preference_data as pd
from gemma_jax.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import make_preference_data  # noqa: E402  (a script, not a package)
import make_sft_data  # noqa: E402

KEYS = pd.KEYS
ONE = dict(process_index=0, process_count=1)
SYSTEM = {'role': 'system', 'content': 'be brief'}


@pytest.fixture(scope='module')
def tok():
  return Tokenizer(os.path.join(ROOT, 'data', 'quickstart_tokenizer.model'))  # 128 pieces


def _write(path, lines):
  path.write_text(''.join((l if isinstance(l, str) else json.dumps(l)) + '\n' for l in lines))
  return str(path)


def _user(text):
  return {'role': 'user', 'content': text}


def _model(text):
  return {'role': 'model', 'content': text}


def _pairs(n):
  """n (prompt messages, chosen, rejected); every third prompt has a system message and an
  earlier exchange, whose model turn must not be counted."""
  out = []
  for i in range(n):
    letters = ' '.join('abcdefg'[(i + k) % 7] for k in range(1 + i % 4))
    prompt = [_user(f'{i} {letters}')]
    if i % 3 == 0:
      prompt = [SYSTEM, _user('a b'), _model('b a')] + prompt
    out.append((prompt, letters[::-1], letters + ' x'))
  return out


def _as_record(pair, form):
  prompt, chosen, rejected = pair
  if form == 'prompt' and len(prompt) == 1:
    return {'prompt': prompt[0]['content'], 'chosen': chosen, 'rejected': rejected}
  if form in ('prompt', 'messages'):
    return {'messages': prompt, 'chosen': chosen, 'rejected': rejected}
  return {'chosen': prompt + [_model(chosen)], 'rejected': prompt + [_model(rejected)]}


def _eval_batches(tok, path, batch_size=3, seq_len=48, **cfg):
  ds = pd.make_preference_dataset({'path': '-', 'eval_path': path, **cfg}, tok, seq_len=seq_len,
                                  batch_size=batch_size, seed=0, split='eval', **ONE)
  it = iter(ds)
  return list(it), it


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_equal_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_three_record_formats_give_the_same_rows(tmp_path, tok):
  pairs = _pairs(7)
  got = [_eval_batches(tok, _write(tmp_path / f'{f}.jsonl', [_as_record(p, f) for p in pairs]))[0]
         for f in ('prompt', 'messages', 'trl')]
  _assert_equal_batches(got[0], got[1])
  _assert_equal_batches(got[0], got[2])
  # 'assistant' is 'model', and field names come from the config.
  renamed = [{'good': [{**t, 'role': 'assistant'} if t['role'] == 'model' else t
                       for t in r['chosen']], 'bad': r['rejected']}
             for r in (_as_record(p, 'trl') for p in pairs)]
  path = _write(tmp_path / 'renamed.jsonl', renamed)
  _assert_equal_batches(got[2], _eval_batches(tok, path, chosen_field='good',
                                              rejected_field='bad')[0])


def test_rows_interleave_chosen_and_rejected_with_the_mask_on_each_reply(tmp_path, tok):
  pairs = _pairs(7)
  path = _write(tmp_path / 'a.jsonl', [_as_record(p, 'prompt') for p in pairs])
  batches, it = _eval_batches(tok, path, batch_size=3, seq_len=48)
  assert len(batches) == 3 and it.stats == {'examples': 7, 'truncated': 0, 'dropped': 0}
  for b in batches:
    assert set(b) == set(KEYS)
    for k in KEYS:
      assert b[k].shape == (6, 48) and b[k].dtype == (np.float32 if k == 'loss_mask' else np.int32)
  rows = [{k: b[k][r] for k in KEYS} for b in batches for r in range(6)]
  for i, (prompt, chosen, rejected) in enumerate(pairs):
    for row, reply in ((rows[2 * i], chosen), (rows[2 * i + 1], rejected)):
      ids, _ = tok.encode_chat(prompt + [_model(reply)])
      n = len(ids) - 1
      np.testing.assert_array_equal(row['tokens'][:n], ids[:-1])
      np.testing.assert_array_equal(row['targets'][:n], ids[1:])
      np.testing.assert_array_equal(row['positions'][:n], np.arange(n))
      np.testing.assert_array_equal(row['segment_ids'], np.arange(48) < n)
      assert not row['tokens'][n:].any() and not row['positions'][n:].any()
      # Counted: exactly the final reply and its end of turn, at the end of the example (an
      # earlier model turn of the prompt is context).
      reply_ids = tok.encode(reply, add_bos=False) + [tok.end_of_turn_id]
      np.testing.assert_array_equal(row['loss_mask'], (np.arange(48) >= n - 1 - len(reply_ids))
                                    & (np.arange(48) < n - 1))
      np.testing.assert_array_equal(row['targets'][row['loss_mask'] == 1], reply_ids)
  for row in rows[14:]:  # The last batch of the eval pass is filled with all-zero rows.
    assert not any(row[k].any() for k in KEYS)


def test_truncate_and_drop_policies_count_pairs(tmp_path, tok):
  short = ([_user('a b')], 'b a', 'a b')
  long_reply = ([_user('a')], 'b c d e f g a b c d e f g', 'b')  # chosen row over seq_len
  long_prompt = ([_user('a b c d e f g a b c d e f g a b c d e f g')], 'x', 'y')  # replies cut
  path = _write(tmp_path / 'a.jsonl', [_as_record(p, 'prompt')
                                       for p in (long_reply, short, long_prompt)])
  seq_len = 16
  for policy, kept, truncated, dropped in [('truncate', 2, 1, 1), ('drop', 1, 0, 2)]:
    batches, it = _eval_batches(tok, path, batch_size=4, seq_len=seq_len, truncate=policy)
    assert it.stats == {'examples': 3, 'truncated': truncated, 'dropped': dropped}
    b = batches[0]
    assert int((b['segment_ids'] > 0).any(axis=1).sum()) == 2 * kept  # dropped pairs: no rows
    if policy == 'truncate':  # Both rows keep their start; the pair stays together.
      for r, reply in enumerate(long_reply[1:]):
        ids, _ = tok.encode_chat(long_reply[0] + [_model(reply)])
        n = min(len(ids) - 1, seq_len)
        np.testing.assert_array_equal(b['tokens'][r, :n], ids[:n])
        assert b['loss_mask'][r].any()
      assert b['segment_ids'][0].all() and not b['segment_ids'][1].all()
    else:
      ids, _ = tok.encode_chat(short[0] + [_model(short[1])])
      np.testing.assert_array_equal(b['tokens'][0, :len(ids) - 1], ids[:-1])


def test_processes_take_their_pairs_of_the_same_global_batches(tmp_path, tok):
  """2 processes see exactly the rows of the 1-process batches (whole pairs each), with the same
  iterator state and fingerprint."""
  path = _write(tmp_path / 'a.jsonl', [_as_record(p, 'prompt') for p in _pairs(9)])
  cfg = {'path': path, 'eval_path': path}
  kw = dict(seq_len=48, batch_size=4, seed=1)
  for split in ('train', 'eval'):
    whole = iter(pd.make_preference_dataset(cfg, tok, **kw, split=split, **ONE))
    parts = [iter(pd.make_preference_dataset(cfg, tok, **kw, split=split, process_index=p,
                                             process_count=2)) for p in range(2)]
    for _ in range(3 if split == 'eval' else 5):
      want, got = next(whole), [next(it) for it in parts]
      for k in KEYS:
        assert got[0][k].shape == (4, 48)
        np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
      assert {it.fingerprint for it in parts} == {whole.fingerprint}
      assert all(it.get_state() == whole.get_state() for it in parts)
  with pytest.raises(ValueError, match='batch_size=4 pairs do not split evenly over 3'):
    pd.make_preference_dataset(cfg, tok, **kw, process_index=0, process_count=3)


def test_resume_from_iterator_state_and_reshuffle_each_epoch(tmp_path, tok):
  pairs = _pairs(10)
  path = _write(tmp_path / 'a.jsonl', [_as_record(p, 'prompt') for p in pairs])
  make = lambda seed=3: iter(pd.make_preference_dataset(
      {'path': path, 'truncate': 'drop'}, tok, seq_len=24, batch_size=2, seed=seed, **ONE))
  it = make()
  first = _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # Survives a JSON round trip (Orbax/grain).
  expected, expected_stats = _take(it, 8), it.stats
  resumed = make()
  resumed.set_state(state)
  _assert_equal_batches(expected, _take(resumed, 8))
  assert resumed.stats == expected_stats and expected_stats['dropped'] > 0
  again, other = make(), make(seed=4)
  _assert_equal_batches(first, _take(again, 7))
  assert any((x['tokens'] != y['tokens']).any() for x, y in zip(first, _take(other, 7)))


@pytest.mark.parametrize('bad, message', [
    ('{"prompt": "p", "chosen": ', 'malformed JSON'),
    ({'prompt': 'p', 'rejected': 'r'}, "no 'chosen'"),
    ({'prompt': 'p', 'chosen': 'c'}, "no 'rejected'"),
    ({'prompt': 'p', 'chosen': 'same', 'rejected': 'same'}, 'identical'),
    ({'prompt': 'p', 'chosen': ' ', 'rejected': 'r'}, "'chosen' is an empty reply"),
    ({'prompt': 'p', 'chosen': 'c', 'rejected': ''}, "'rejected' is an empty reply"),
    ({'prompt': 'p', 'chosen': 'c', 'rejected': 3}, 'rejected must be a string'),
    ({'messages': [_user('u'), _user('v')], 'chosen': 'c', 'rejected': 'r'}, "'model' was expec"),
    ({'messages': [_model('m'), _user('u')], 'chosen': 'c', 'rejected': 'r'}, "'user' was expec"),
    ({'messages': [_user('u'), _model('m')], 'chosen': 'c', 'rejected': 'r'},
     "'messages' must end with a user turn"),
    ({'messages': [SYSTEM], 'chosen': 'c', 'rejected': 'r'}, 'at least one user message'),
    ({'chosen': [_user('u'), _model('c')], 'rejected': [_user('v'), _model('r')]},
     'share every turn but the last; they differ at turn 0'),
    ({'chosen': [_user('u'), _model('c')], 'rejected': [_user('u'), _model('r'), _user('w')]},
     "'rejected' must end with a model turn"),
    ({'chosen': [_user('u'), _model('c')], 'rejected': [_user('u'), _model('c')]}, 'identical'),
    ({'chosen': [_model('c')], 'rejected': [_model('r')]}, "'user' was expected"),
    ({'chosen': [_user('u'), _model('c')], 'rejected': 'r'}, 'both be strings'),
    ({'question': 'q', 'chosen': 'c', 'rejected': 'r'}, "neither 'messages' nor 'prompt'"),
    ([1, 2], 'JSON object'),
])
def test_bad_pairs_name_file_and_line(tmp_path, tok, bad, message):
  path = _write(tmp_path / 'bad.jsonl', [{'prompt': 'p', 'chosen': 'c', 'rejected': 'r'}, '', bad])
  with pytest.raises(ValueError, match=rf'bad\.jsonl:3: .*{message}'):
    pd.make_preference_dataset({'path': path}, tok, seq_len=16, batch_size=1, seed=0, **ONE)


def test_tfds_source(tmp_path, tok):
  pairs = _pairs(5)
  records = [{'q': p[-1]['content'], 'conv': p, 'good': c, 'bad': r,
              'good_conv': p + [_model(c)], 'bad_conv': p + [_model(r)]} for p, c, r in pairs]
  broken = [{**records[0], 'bad': records[0]['good']}]
  data_sources.write_tfds_dataset({'train': records, 'broken': broken},
                          'tiny_pref_test', str(tmp_path / 'tfds'))
  common = {'source': 'tfds', 'name': 'tiny_pref_test', 'data_dir': str(tmp_path / 'tfds'),
            'eval_split': 'train'}
  as_pairs = lambda b: sorted(tuple(b[k][r].tobytes() for r in (2 * i, 2 * i + 1) for k in KEYS)
                             for i in range(len(b['tokens']) // 2))
  trl = [_as_record(p, 'trl') for p in pairs]
  bare = [{'prompt': r['q'], 'chosen': r['good'], 'rejected': r['bad']} for r in records]
  for fields, same in [  # TFDS shuffles its records: compare the sets of pairs.
      ({'messages_field': 'conv', 'chosen_field': 'good', 'rejected_field': 'bad'}, trl),
      ({'chosen_field': 'good_conv', 'rejected_field': 'bad_conv'}, trl),
      ({'messages_field': '-', 'prompt_field': 'q', 'chosen_field': 'good',
        'rejected_field': 'bad'}, bare)]:
    ds = pd.make_preference_dataset({**common, **fields}, tok, seq_len=48, batch_size=5,
                                    seed=0, split='eval', **ONE)
    assert ds.num_records == 5
    want = _eval_batches(tok, _write(tmp_path / 'a.jsonl', same), batch_size=5)[0][0]
    assert as_pairs(next(iter(ds))) == as_pairs(want)
  with pytest.raises(ValueError, match=r"tfds tiny_pref_test\[broken\] record 0: .*identical"):
    next(iter(pd.make_preference_dataset(
        {**common, 'train_split': 'broken', 'messages_field': 'conv', 'chosen_field': 'good',
         'rejected_field': 'bad'}, tok, seq_len=48, batch_size=1, seed=0, **ONE)))


def test_job_preference_dataset_uses_the_job_config(tmp_path, tok):
  from gemma_jax.train_config import base_config
  config = base_config()
  config.batch_size, config.seq_len = 2, 40
  config.data.path = _write(tmp_path / 'a.jsonl', [_as_record(p, 'trl') for p in _pairs(3)])
  batch = next(iter(pd.job_preference_dataset(config, tok, split='train')))
  assert all(batch[k].shape == (4, 40) for k in KEYS)
  with pytest.raises(ValueError, match="Unknown data config key"):
    pd.make_preference_dataset({'path': config.data.path, 'chosen': 'x'}, tok, seq_len=8,
                               batch_size=1, seed=0, **ONE)


def test_shipped_preference_data_is_reproducible_and_right(tmp_path, tok):
  train, held_out = make_preference_data.make_records()
  for name, records in (('preference_train.jsonl', train), ('preference_eval.jsonl', held_out)):
    shipped = os.path.join(ROOT, 'data', name)
    make_sft_data.write_jsonl(records, str(tmp_path / name))
    assert (tmp_path / name).read_bytes() == open(shipped, 'rb').read()
  read = {split: pd.read_preference_jsonl(os.path.join(ROOT, 'data', f'preference_{split}.jsonl'))
          for split in ('train', 'eval')}
  assert (len(read['train']), len(read['eval'])) == (400, 50)
  letters, kinds = {}, set()
  for split, pairs in read.items():
    letters[split] = set()
    for _, (prompt, chosen, rejected) in pairs:
      seq = prompt[-1]['content'].removeprefix(make_sft_data.PROMPT)
      letters[split].add(seq)
      assert make_sft_data.score(make_sft_data.reverse_letters(seq), chosen)
      assert not make_sft_data.score(rejected, chosen)
      kinds.add('unreversed' if rejected == seq else
                {0: 'swapped', -1: 'dropped', 1: 'doubled'}[len(rejected) // 2 - len(chosen) // 2])
  assert not letters['train'] & letters['eval'] and len(letters['eval']) == 50
  assert any(len(p) > 1 for _, (p, _, _) in read['train'])  # some with a system message
  assert kinds == set(make_preference_data.MISTAKES)  # every kind of mistake occurs
  _, it = _eval_batches(tok, os.path.join(ROOT, 'data', 'preference_eval.jsonl'), batch_size=50,
                        seq_len=64)
  assert it.stats == {'examples': 50, 'truncated': 0, 'dropped': 0}
