"""Preference tuning (DPO family): learn from pairs of a chosen and a rejected reply to one prompt.

Each pair is scored by the sequence log-probabilities of its two replies under the policy
(pi: the model being trained) and, except for SimPO, the reference model (ref: the initial
weights). With logratio = log pi(y|x) - log ref(y|x), c = chosen, r = rejected, |y| = reply tokens:

  sigmoid (DPO):  d = logratio_c - logratio_r
                  loss = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
                  (eps = label_smoothing: conservative DPO; eps = 0 is DPO, and TRL's 'sigmoid')
  ipo:            d = logratio_c / |y_c| - logratio_r / |y_r|,   loss = (d - 1 / (2 beta))^2
                  (length-normalised, as TRL's DPOTrainer computes IPO)
  simpo:          d = log pi(y_c|x) / |y_c| - log pi(y_r|x) / |y_r| - gamma / beta
                  loss = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
                  (reference-free; TRL's CPOTrainer with loss_type='simpo', cpo_alpha=0)

Rewards (logged): beta * logratio for sigmoid and ipo, beta * log pi(y|x) / |y| for simpo;
`reward_accuracy` is the fraction of pairs whose chosen reward is higher (0 at step 0, when
pi = ref), `reward_margin` the mean chosen minus rejected reward. At the first step the sigmoid
loss is exactly ln 2.

The reference model is the job's initial weights: with LoRA the same model with its adapters
switched off (the frozen base; no second copy), for full fine-tuning a frozen copy of the initial
parameters carried in the train state (one more copy of the parameters on the devices; never
checkpointed, re-read from model.init on resume).

Batches (gemma_jax.preference_data) are [P, 2, T] arrays: pair p's chosen row, then its rejected
row, so that micro-batches and devices never split a pair.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from gemma_jax.loss import sequence_logprobs

NAME = 'dpo'
LOSSES = ('sigmoid', 'ipo', 'simpo')


def preference_losses(policy_c: jax.Array, policy_r: jax.Array, ref_c: jax.Array,
                      ref_r: jax.Array, len_c: jax.Array, len_r: jax.Array, *, loss: str,
                      beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pair (loss_P, chosen reward_P, rejected reward_P) from sequence log-probabilities
  (the module docstring gives the formulas); `ref_*` are ignored by 'simpo'."""
  eps = label_smoothing
  len_c, len_r = jnp.maximum(len_c, 1.0), jnp.maximum(len_r, 1.0)
  if loss == 'simpo':
    avg_c, avg_r = policy_c / len_c, policy_r / len_r
    d = avg_c - avg_r - simpo_gamma / beta
    losses = -(1 - eps) * jax.nn.log_sigmoid(beta * d) - eps * jax.nn.log_sigmoid(-beta * d)
    return losses, beta * avg_c, beta * avg_r
  ratio_c, ratio_r = policy_c - ref_c, policy_r - ref_r
  if loss == 'sigmoid':
    d = ratio_c - ratio_r
    losses = -(1 - eps) * jax.nn.log_sigmoid(beta * d) - eps * jax.nn.log_sigmoid(-beta * d)
  elif loss == 'ipo':
    losses = jnp.square(ratio_c / len_c - ratio_r / len_r - 1 / (2 * beta))
  else:
    raise ValueError(f'dpo.loss={loss!r}; expected one of {list(LOSSES)}.')
  return losses, beta * ratio_c, beta * ratio_r


def _flat(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """[P, 2, T] pairs -> [2P, T] rows (chosen, rejected, chosen, ...)."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def _scores(model, rows: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  logits, _ = model(rows['tokens'], positions=rows['positions'], segment_ids=rows['segment_ids'])
  return sequence_logprobs(logits, rows['targets'], rows['loss_mask'])


@dataclasses.dataclass(frozen=True)
class DPO:
  """The DPO-family objective (config.dpo.*)."""

  loss: str = 'sigmoid'
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5

  name = NAME
  count_name = 'pairs'
  eval_before_training = True  # held-out reward metrics before -> after
  samples = False
  batch_reuse = 1
  rows_per_example = 2  # a pair: chosen and rejected

  @property
  def needs_reference(self) -> bool:
    return self.loss != 'simpo'

  def count(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The pairs of the whole batch with a chosen reply (padding pairs have none); at least 1."""
    chosen_tokens = jnp.sum(batch['loss_mask'][:, 0].astype(jnp.float32), axis=-1)
    return jnp.maximum(jnp.sum((chosen_tokens > 0).astype(jnp.float32)), 1.0)

  def loss_sums(self, model, reference, batch: Mapping[str, jax.Array],
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss summed over the batch's pairs, sums of the logged metrics)."""
    rows = _flat(batch)
    logp, length = _scores(model, rows)
    if self.needs_reference:
      ref_logp = jax.lax.stop_gradient(_scores(reference, rows)[0])
    else:
      ref_logp = jnp.zeros_like(logp)
    pc, rc, lc = logp[0::2], ref_logp[0::2], length[0::2]  # chosen
    pr, rr, lr = logp[1::2], ref_logp[1::2], length[1::2]  # rejected
    losses, reward_c, reward_r = preference_losses(
        pc, pr, rc, rr, lc, lr, loss=self.loss, beta=self.beta,
        label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
    valid = (lc > 0).astype(jnp.float32)
    total = lambda x: jnp.sum(x * valid)
    return total(losses), {
        'reward_accuracy': total((reward_c > reward_r).astype(jnp.float32)),
        'reward_margin': total(reward_c - reward_r),
        'chosen_rewards': total(reward_c), 'rejected_rewards': total(reward_r),
        'chosen_logps': total(pc), 'rejected_logps': total(pr)}

  def named(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return dict(sums)

  def metrics(self, sums: Mapping[str, Any], count: Any) -> dict[str, Any]:
    return {k: v / count for k, v in sums.items()}

  def dataset(self, config, tokenizer, split: str):
    from gemma_jax import preference_data  # pylint: disable=g-import-not-at-top (grain)
    return _Pairs(preference_data.job_preference_dataset(config, tokenizer, split=split))


class _Pairs:
  """A preference dataset whose iterators yield [P, 2, T] pairs instead of [2P, T] rows."""

  def __init__(self, rows):
    self.rows = rows

  def __iter__(self):
    return _PairIterator(iter(self.rows))


class _PairIterator:

  def __init__(self, rows):
    self._rows = rows

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    return {k: v.reshape(-1, 2, *v.shape[1:]) for k, v in next(self._rows).items()}

  def get_state(self):
    return self._rows.get_state()

  def set_state(self, state) -> None:
    self._rows.set_state(state)

  @property
  def stats(self) -> dict[str, int]:
    return self._rows.stats

  @property
  def fingerprint(self) -> int:
    return self._rows.fingerprint


def from_config(config) -> DPO:
  c = config.dpo
  return DPO(loss=c.loss, beta=float(c.beta), label_smoothing=float(c.label_smoothing),
             simpo_gamma=float(c.simpo_gamma))
