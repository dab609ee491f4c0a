"""Evaluation during and after training: held-out loss and accuracy, and exact match on held-out
prompts answered greedily by the sampler (the quickstart's before/after figure).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gemma_jax import distributed
from gemma_jax import sharding
from gemma_jax.train_config import ConfigError

if TYPE_CHECKING:
  import ml_collections


def held_out_loss(eval_step, params: nnx.State, batches: Iterator[Mapping[str, np.ndarray]],
                  mesh: Mesh, rules: sharding.ShardingRules,
                  frozen: nnx.State | None = None, reference: nnx.State | None = None, *,
                  metrics: Callable[[Mapping[str, Any], float], Mapping[str, Any]] | None = None,
                  ) -> dict[str, float]:
  """Mean loss and the objective's metrics over `batches` (`eval_step` from
  `trainer.make_eval_step`, `metrics` the objective's; default SFT's token accuracy), per target
  token (SFT) or pair (DPO); {} when there are no batches."""
  totals = None
  for batch in batches:
    out = eval_step(params, distributed.put_batch(batch, mesh, rules), frozen, reference)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    return {}
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = max(totals.pop('count'), 1.0)
  loss_sum = totals.pop('loss_sum')
  metrics = metrics or (lambda sums, n: {'accuracy': sums['correct_sum'] / n})
  return {'loss': loss_sum / count, **{k: float(v) for k, v in metrics(totals, count).items()}}


def split_prompt_reference(messages: Sequence[Mapping[str, str]]) -> tuple[list[dict], str]:
  """Splits a conversation at its last model turn: (prompt messages, reference answer)."""
  last = max(i for i, m in enumerate(messages) if m['role'] in ('model', 'assistant'))
  return [dict(m) for m in messages[:last]], messages[last]['content']


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of predictions equal to their reference after collapsing whitespace."""
  if len(predictions) != len(references) or not references:
    raise ValueError(f'exact_match needs equal, non-zero lengths, got {len(predictions)} '
                     f'predictions and {len(references)} references.')
  norm = lambda s: ' '.join(s.split())
  return sum(norm(p) == norm(r) for p, r in zip(predictions, references)) / len(references)


def exact_match_examples(config: ml_collections.ConfigDict) -> list[tuple[list[dict], str]]:
  """The first `exact_match.examples` held-out conversations as (prompt messages, answer); for
  preference pairs (objective 'dpo') the answer is the chosen reply."""
  n = config.exact_match.examples
  if not n:
    return []
  if config.data.source != 'jsonl' or not config.data.eval_path:
    raise ConfigError('config.exact_match.examples > 0 needs JSONL held-out data '
                      "(data.source='jsonl' and data.eval_path).")
  if config.objective == 'dpo':
    from gemma_jax import preference_data  # pylint: disable=g-import-not-at-top (grain)
    pairs = preference_data.read_preference_jsonl(config.data.eval_path, config.data)[:n]
    return [(prompt, chosen) for _, (prompt, chosen, _) in pairs]
  from gemma_jax import data_sources  # pylint: disable=g-import-not-at-top (grain)
  records = data_sources.read_jsonl(config.data.eval_path, config.data)[:n]
  return [split_prompt_reference(messages) for _, messages in records]


def exact_match_eval(model, tokenizer, examples, max_new_tokens: int,
                     batch_size: int = 64) -> dict[str, Any]:
  """Answers held-out conversations greedily (KV-cached `Sampler`) and scores exact match.

  `examples`: [(prompt messages, reference answer)], e.g. from `exact_match_examples`; prompts
  are encoded exactly as training encodes them (`Tokenizer.encode_chat`).
  Returns {'exact_match': fraction, 'samples': [(prompt text, prediction, reference), ...]}.
  """
  from gemma_jax.sampler import Sampler  # pylint: disable=g-import-not-at-top

  prompts = [tokenizer.encode_chat(m, add_generation_prompt=True)[0] for m, _ in examples]
  sampler = Sampler(model, tokenizer, cache_length=max(map(len, prompts)) + max_new_tokens)
  batch_size = min(batch_size, len(prompts))
  predictions = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)  # One batch shape, one compile.
    predictions += [c.text for c in sampler.sample(chunk, max_new_tokens)[:n]]
  references = [r for _, r in examples]
  samples = [(m[-1]['content'], p, r) for (m, r), p in zip(examples, predictions)]
  return {'exact_match': exact_match(predictions, references), 'samples': samples}
