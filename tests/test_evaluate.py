"""gemma_jax.evaluate: held-out loss over batches, exact match and its held-out examples."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax import evaluate, loss, sharding, train_config, trainer
from gemma_jax.config import get_preset
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.join(ROOT, 'data', 'quickstart_eval.jsonl')
TOKENIZER = os.path.join(ROOT, 'data', 'quickstart_tokenizer.model')


def test_held_out_loss_is_the_token_mean_over_all_batches():
  """Sums over batches, then divides once: the mean over target tokens, not over batches."""
  model = Transformer(get_preset('tiny-gemma1').replace(vocab_size=64), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(0)
  batches = []
  for n_targets in (3, 11):  # unequal target counts: a mean of batch means would differ
    ids = rng.integers(1, 64, (2, 9)).astype(np.int32)
    mask = np.zeros((2, 8), np.float32)
    mask.flat[:n_targets] = 1
    batches.append({'tokens': ids[:, :-1], 'targets': ids[:, 1:], 'loss_mask': mask,
                    'positions': np.tile(np.arange(8, dtype=np.int32), (2, 1)),
                    'segment_ids': np.ones((2, 8), np.int32)})
  mesh = sharding.make_mesh({'fsdp': -1})
  got = evaluate.held_out_loss(jax.jit(trainer.make_eval_step(graphdef, rest)), params,
                               iter(batches), mesh, sharding.ShardingRules())
  sums = [loss.token_loss_sums(model(jnp.asarray(b['tokens']))[0], b['targets'], b['loss_mask'])
          for b in batches]
  assert got['loss'] == pytest.approx(sum(float(s[0]) for s in sums) / 14, rel=1e-5)
  assert got['accuracy'] == pytest.approx(sum(float(s[1]) for s in sums) / 14, rel=1e-5)
  assert evaluate.held_out_loss(None, params, iter([]), mesh, sharding.ShardingRules()) == {}


def test_exact_match_and_examples():
  assert evaluate.exact_match(['a  b', 'c'], ['a b', 'd']) == 0.5  # whitespace collapsed
  with pytest.raises(ValueError, match='equal, non-zero lengths'):
    evaluate.exact_match(['a'], [])
  messages = [{'role': 'user', 'content': 'q1'}, {'role': 'model', 'content': 'a1'},
              {'role': 'user', 'content': 'q2'}, {'role': 'assistant', 'content': 'a2'}]
  prompt, reference = evaluate.split_prompt_reference(messages)
  assert reference == 'a2' and prompt == messages[:3]
  c = train_config.base_config()
  c.data.path = c.data.eval_path = EVAL
  c.exact_match.examples = 3
  examples = evaluate.exact_match_examples(c)
  assert len(examples) == 3 and all(m[-1]['role'] == 'user' for m, _ in examples)
  c.data.source = 'tfds'
  with pytest.raises(train_config.ConfigError, match='needs JSONL held-out data'):
    evaluate.exact_match_examples(c)


def test_exact_match_eval_scores_what_the_sampler_answers():
  """Greedy answers are deterministic: references set to two of the three answers score 2/3, and
  each sample pairs a prompt with its own answer and reference."""
  tok = Tokenizer(TOKENIZER)
  model = Transformer(get_preset('tiny-gemma1').replace(vocab_size=128), rngs=nnx.Rngs(0))
  prompts = [[{'role': 'user', 'content': f'Reverse the letters: {x}'}] for x in 'abc']
  first = evaluate.exact_match_eval(model, tok, [(m, 'unused') for m in prompts],
                                    max_new_tokens=4, batch_size=2)
  answers = [p for _, p, _ in first['samples']]
  references = [answers[0], answers[1] + ' and more', answers[2]]
  result = evaluate.exact_match_eval(model, tok, list(zip(prompts, references)),
                                     max_new_tokens=4, batch_size=2)
  assert result['exact_match'] == pytest.approx(2 / 3)
  assert result['samples'] == [(m[-1]['content'], a, r)
                               for m, a, r in zip(prompts, answers, references)]
