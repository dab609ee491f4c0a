"""scoring.score: equal to transformers' float32 log-softmax on the real Gemma 3 270M, equal to a
full forward on tiny models, the same however pairs are batched, text equal to its token ids,
greedy tokens score as the argmax, compiled shapes reused, and its errors."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax import scoring
from gemma_jax.config import get_preset
from gemma_jax.sampler import GREEDY, Sampler
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.transformer import Transformer

_TOKENIZER = pathlib.Path(__file__).resolve().parent.parent / 'data' / 'quickstart_tokenizer.model'
# Token-id pairs of different lengths: a 1-token prompt, a 1-token continuation, a row (29
# tokens) longer than the tiny models' windows (8), so the local layers' masks matter.
PAIRS = [([2, 17, 33, 91, 5], [40, 41, 42]), ([2], [7, 8, 9, 10, 11, 12]),
         ([2] + list(range(60, 80)), [5, 90, 91, 92, 93, 94, 95, 96]), ([2, 8, 9], [100])]


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _reference(log_softmax_TV, prompt, continuation):
  """The continuation's log-probs read from a full row's log-softmax [len(p + c), V]."""
  n = len(prompt)
  return np.array([log_softmax_TV[n - 1 + j, t] for j, t in enumerate(continuation)])


_forward = nnx.jit(lambda model, tokens_BT: model(tokens_BT)[0])


def _full_log_softmax(model, rows):
  """Log-softmax [T, V] of each row by one plain jitted forward of them all, right-padded to 32
  (causal attention: padding after a token never changes its logits)."""
  tokens = np.zeros((len(rows), 32), np.int32)
  for r, row in enumerate(rows):
    tokens[r, :len(row)] = row
  logits = np.asarray(_forward(model, jnp.asarray(tokens)))
  return [_log_softmax(logits[r, :len(row)]) for r, row in enumerate(rows)]


@pytest.fixture(scope='module')
def tiny():
  return Transformer(get_preset('tiny-gemma3'), rngs=nnx.Rngs(0))


def test_real_270m_matches_transformers(real, tmp_path):
  """One batched call on the real 270M (the session's `real` model) equals transformers' float32
  log_softmax gathered at the same continuation tokens (<= 1e-4 absolute). transformers runs the
  same weights through our exporter (seconds, where loading the GGUF file takes a minute);
  tests/test_gguf.py proves them equal to transformers' own load of that file."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from gemma_jax.convert import save_hf
  model, tokenizer = real[:2]
  prompts = ['The capital of France is', 'def add(a, b):\n',
             'Once upon a time, in a small village by the sea,', [tokenizer.bos_id]]
  continuations = [' Paris.', '    return a + b', ' there lived an old fisherman', 'Hello']
  got = scoring.score(model, tokenizer, prompts, continuations)
  save_hf(model, tmp_path / 'hf')
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'hf', dtype=torch.float32).eval()
  for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
    p = prompt if isinstance(prompt, list) else tokenizer.encode(prompt, add_bos=True)
    c = tokenizer.encode(continuation, add_bos=False)
    with torch.no_grad():
      logits = reference(torch.tensor([p + c])).logits[0].numpy()
    assert logits.dtype == np.float32
    want = _reference(_log_softmax(logits), p, c)
    assert got[i].dtype == np.float32 and got[i].shape == (len(c),)
    err = float(np.abs(got[i] - want).max())
    print(f'\npair {i}: {len(p)} + {len(c)} tokens, max |d| = {err:.2e}')
    assert err <= 1e-4, (i, err)


@pytest.mark.parametrize('preset', ['tiny-gemma3', 'tiny-gemma4'])
def test_equals_full_forward(preset, tiny):
  """Each continuation's log-probs equal the log-softmax of a plain full forward of its row."""
  model = tiny if preset == 'tiny-gemma3' else Transformer(get_preset(preset), rngs=nnx.Rngs(1))
  got = scoring.score(model, None, [p for p, _ in PAIRS], [c for _, c in PAIRS])
  full = _full_log_softmax(model, [p + c for p, c in PAIRS])
  for (p, c), lp, log_softmax_TV in zip(PAIRS, got, full):
    np.testing.assert_allclose(lp, _reference(log_softmax_TV, p, c), atol=1e-5, rtol=0)


def test_batching_invariance(tiny):
  """One pair at a time, all together, and 3 batches of 2 (the last padded) agree."""
  pairs = PAIRS + [([2, 3], [4, 5, 6, 7])]
  prompts, continuations = [p for p, _ in pairs], [c for _, c in pairs]
  together = scoring.score(tiny, None, prompts, continuations)
  in_twos = scoring.score(tiny, None, prompts, continuations, batch_size=2)
  alone = [scoring.score(tiny, None, [p], [c])[0] for p, c in pairs]
  for i, (a, b, c) in enumerate(zip(together, in_twos, alone)):
    assert a.shape == b.shape == c.shape == (len(pairs[i][1]),)
    np.testing.assert_allclose(a, c, atol=1e-5, rtol=0, err_msg=f'pair {i}')
    np.testing.assert_allclose(b, c, atol=1e-5, rtol=0, err_msg=f'pair {i}')


def test_text_equals_token_ids(tiny):
  """Text prompts get BOS, text continuations none: the same scores as those token ids."""
  tokenizer = Tokenizer(_TOKENIZER)
  prompts, continuations = ['Reverse the letters: a b c', 'Reverse'], [' c b a', ' the']
  ids_p = [tokenizer.encode(p, add_bos=True) for p in prompts]
  ids_c = [tokenizer.encode(c, add_bos=False) for c in continuations]
  assert all(x[0] == tokenizer.bos_id for x in ids_p)
  assert all(tokenizer.bos_id not in x for x in ids_c)
  from_text = scoring.score(tiny, tokenizer, prompts, continuations)
  from_ids = scoring.score(tiny, tokenizer, ids_p, ids_c)
  for a, b in zip(from_text, from_ids):
    np.testing.assert_array_equal(a, b)
  mixed = scoring.score(tiny, tokenizer, [ids_p[0], prompts[1]], [continuations[0], ids_c[1]])
  for a, b in zip(mixed, from_ids):
    np.testing.assert_array_equal(a, b)


def test_greedy_tokens_score_as_the_argmax(tiny):
  """Every token of a greedy Sampler continuation has the largest log-prob at its position."""
  prompts = [[2, 17, 33, 91, 5], [2, 8, 9]]
  sampler = Sampler(tiny, cache_length=64)
  completions = sampler.sample(prompts, 12, sampling=GREEDY)
  continuations = [c.tokens for c in completions]
  assert all(len(c) == 12 for c in continuations)
  scored = scoring.score(tiny, None, prompts, continuations)
  full = _full_log_softmax(tiny, [p + c for p, c in zip(prompts, continuations)])
  for p, c, lp, log_softmax_TV in zip(prompts, continuations, scored, full):
    best = log_softmax_TV[len(p) - 1:len(p) + len(c) - 1].max(-1)
    np.testing.assert_allclose(lp, best, atol=1e-5, rtol=0)


def test_multiple_choice(tiny):
  """The best choice is the one with the largest summed score; sums are score's sums."""
  prompt, choices = [2, 17, 33], [[40], [41, 42], [43, 44, 45]]
  best, sums = scoring.multiple_choice(tiny, None, prompt, choices)
  per_token = scoring.score(tiny, None, [prompt] * 3, choices)
  np.testing.assert_allclose(sums, [lp.sum() for lp in per_token], atol=1e-6, rtol=0)
  assert best == int(np.argmax(sums))


def test_compiled_shapes_reused(tiny):
  """Pairs whose lengths fall in the same buckets reuse one compiled forward."""
  scoring.score(tiny, None, [[2, 3, 4]], [[5, 6]])
  size = scoring._score._cache_size()
  scoring.score(tiny, None, [[2, 3, 4, 5, 6, 7, 8]], [[9, 10, 11, 12, 13]])
  assert scoring._score._cache_size() == size


def test_errors(tiny):
  """Bad input: an error naming the pair's index (or the argument), before any compute."""
  tokenizer = Tokenizer(_TOKENIZER)
  max_len = tiny.config.max_seq_len
  cases = [
      (([[2]], [[3], [4]]), r'1 prompts but 2 continuations'),
      (([[2], [2, 3]], [[3], []]), r'continuation 1 is empty'),
      (([[2], []], [[3], [4]]), r'prompt 1 is empty'),
      ((['a'], [[3]]), r'prompt 0 is text but there is no tokenizer'),
      (([[2], [2] * max_len], [[3], [4]]), rf'pair 1 has {max_len} prompt \+ 1 continuation.*'
                                           rf'max_seq_len={max_len}'),
      (([[2]], [[3, 512]]), r'continuation 0 has token ids \[512\] outside'),
      (('abc', ['d']), r'lists'),
  ]
  for (prompts, continuations), match in cases:
    with pytest.raises(ValueError, match=match):
      scoring.score(tiny, None, prompts, continuations)
  with pytest.raises(ValueError, match=r'continuation 0 is empty'):
    scoring.score(tiny, tokenizer, ['abc'], [''])
  with pytest.raises(ValueError, match=r'batch_size must be an integer >= 1, got 0'):
    scoring.score(tiny, None, [[2]], [[3]], batch_size=0)
  with pytest.raises(ValueError, match=r'choices is empty'):
    scoring.multiple_choice(tiny, None, [2], [])
  assert scoring.score(tiny, None, [], []) == []
