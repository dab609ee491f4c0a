"""gemma_jax.sampling: each rule draws with the probabilities it promises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.sampling import SamplingParams, sample_logits


def renormalised(logits, sampling):
  """Reference distribution: softmax(logits / T), keep top-k, then the top-p nucleus."""
  p = np.exp((logits - logits.max()) / sampling.temperature)
  p /= p.sum()
  order = np.argsort(-p, kind='stable')
  keep = np.zeros_like(p, bool)
  k = sampling.top_k or len(p)
  kept = p[order[:k]] / p[order[:k]].sum()
  before = np.cumsum(kept) - kept
  keep[order[:k][before < sampling.top_p]] = True
  q = np.where(keep, p, 0)
  return q / q.sum()


RULES = [SamplingParams(temperature=1.0, top_k=4), SamplingParams(temperature=1.0, top_p=0.7),
         SamplingParams(temperature=0.7, top_k=6, top_p=0.8), SamplingParams(temperature=2.0)]


@pytest.mark.parametrize('sampling', RULES, ids=str)
def test_sampling_frequencies_match_distribution(sampling):
  """20k draws with distinct keys (fixed seed): every frequency within 0.015 of the renormalised
  probability (> 5 standard deviations for n = 20k) and none outside the kept set."""
  logits = np.array([2.0, 1.5, 1.2, 1.0, 0.6, 0.5, 0.1, -0.3, -1.0, -2.0, 0.9, 1.4], np.float32)
  n = 20_000
  keys = jax.random.split(jax.random.key(0), n)
  draws = sample_logits(jnp.broadcast_to(logits, (n, len(logits))), keys, sampling)
  freq = np.bincount(np.asarray(draws), minlength=len(logits)) / n
  ref = renormalised(logits, sampling)
  assert np.all(freq[ref == 0] == 0)
  np.testing.assert_allclose(freq, ref, atol=0.015)


def test_bad_rules_are_errors():
  for kwargs, match in (({'top_p': 0.0}, 'top_p must be in'), ({'top_p': 1.5}, 'top_p must be in'),
                        ({'temperature': -1.0}, 'temperature must be >= 0'),
                        ({'temperature': float('nan')}, 'temperature must be >= 0'),
                        ({'top_k': -2}, 'top_k must be an integer'),
                        ({'top_k': 2.5}, 'top_k must be an integer'),
                        ({'top_k': True}, 'top_k must be an integer')):
    with pytest.raises(ValueError, match=match):
      SamplingParams(**kwargs)
  assert SamplingParams(top_k=np.int64(3)).top_k == 3
