"""Reinforcement learning with verifiable rewards (GRPO family): sample a group of G completions
per prompt from the current weights, score them with reward functions, and push up the
log-probability of the completions that scored above their group's mean.

Each step (gemma_jax.rollouts makes its batch): for prompt x, completions y_1..y_G with rewards
r_1..r_G (a weighted sum of reward functions, gemma_jax.rewards),

  advantage  A_i = (r_i - mean(r)) / (std(r) + 1e-4)      std: unbiased, over the group
             (scale_rewards 'group'; 'batch': std over the whole batch; 'none': no division);
             a group whose rewards are all equal gets A = 0 exactly (it teaches nothing)
  per token  ratio_t = pi(y_t | x, y_<t) / pi_old(y_t | ...)   (log-probs of logits / temperature)
             l_t = -min(ratio_t A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) A)
                   + beta * KL_t,   KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (k3)
  aggregated (loss_type, with m_t the completion-token mask, over the whole step's batch):
             'grpo'     mean over completions of (sum_t l_t m_t / sum_t m_t)
             'dr_grpo'  sum l_t m_t / (completions x max_completion_length)     (Dr. GRPO)
             'dapo'     sum l_t m_t / sum m_t                                    (DAPO; TRL's default)

pi_old is the policy that sampled the completions: with num_iterations = 1 the batch is used
once and pi_old = stop_gradient(pi), so the ratio is exactly 1 (its gradient is A's); with
num_iterations = mu > 1 the same rollouts serve mu consecutive optimizer steps and pi_old's
log-probs are computed once, when they are sampled. These are TRL's GRPOTrainer formulas
(tests/test_grpo_trl.py checks loss, gradients and metrics against it). The reference (beta > 0)
is the initial weights, as for DPO: the base with the adapters switched off under LoRA, else a
frozen copy.

Batches are rows of prompt + completion (shifted tokens/targets as elsewhere, loss_mask 1 on the
completion's tokens including its stop token) with 'advantages' ([N] or per token [N, T]) and,
when mu > 1, 'old_logps' [N, T] aligned with the targets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.loss import token_logprobs

NAME = 'grpo'
LOSS_TYPES = ('grpo', 'dr_grpo', 'dapo')
SCALE_REWARDS = ('group', 'batch', 'none')


def group_advantages(rewards: Sequence[float], group_size: int, scale: str = 'group',
                     ) -> np.ndarray:
  """Float32 advantages [N] of rewards [N] laid out in consecutive groups of `group_size`
  (the module docstring's formula); an all-equal group gets exactly 0, never NaN."""
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  mean = r.mean(axis=1, keepdims=True)
  if scale == 'group':
    std = r.std(axis=1, ddof=1, keepdims=True)
  elif scale == 'batch':
    std = np.full_like(mean, r.std(ddof=1) if r.size > 1 else 0.0)
  elif scale == 'none':
    std = None
  else:
    raise ValueError(f'grpo.scale_rewards={scale!r}; expected one of {list(SCALE_REWARDS)}.')
  advantages = r - mean
  if std is not None:
    advantages = advantages / (std + 1e-4)
  constant = (r.max(axis=1) == r.min(axis=1))[:, None]
  return np.where(constant, 0.0, advantages).reshape(-1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class GRPO:
  """The GRPO-family objective (config.grpo.*; the module docstring has the formulas).

  The loss uses loss_type, beta, epsilon, epsilon_high, temperature and max_completion_length;
  the rest describe the rollouts (gemma_jax.rollouts): G = num_generations completions per prompt
  drawn with temperature/top_k/top_p, reused for num_iterations steps, scored by `rewards`
  (names, gemma_jax.rewards) weighted by `reward_weights`; `format_pattern` is the regex of the
  'format' reward; `raw_prompt`: prompts are plain text (no chat template); completions also
  stop at `stop_strings`.
  """

  loss_type: str = 'dapo'
  beta: float = 0.0
  epsilon: float = 0.2
  epsilon_high: float = 0.2
  temperature: float = 1.0
  max_completion_length: int = 64
  num_generations: int = 8
  num_iterations: int = 1
  top_k: int = 0
  top_p: float = 1.0
  scale_rewards: str = 'group'
  rewards: tuple[str, ...] = ('exact_match',)
  reward_weights: tuple[float, ...] = (1.0,)
  format_pattern: str = ''
  raw_prompt: bool = False
  stop_strings: tuple[str, ...] = ()

  name = NAME
  count_name = 'completion_tokens'
  eval_before_training = True  # held-out mean reward before -> after
  samples = True  # its batches come from the Sampler (gemma_jax.rollouts), not from a file

  @property
  def needs_reference(self) -> bool:
    return self.beta != 0

  @property
  def rows_per_example(self) -> int:
    """Rows per prompt: its G completions."""
    return self.num_generations

  @property
  def batch_reuse(self) -> int:
    """Optimizer steps that share one batch of rollouts (mu)."""
    return self.num_iterations

  def token_logps(self, model, batch: Mapping[str, jax.Array]) -> jax.Array:
    """[N, T] float32 log-probs of the targets under `model`'s logits / temperature."""
    logits, _ = model(batch['tokens'], positions=batch['positions'],
                      segment_ids=batch['segment_ids'])
    return token_logprobs(logits.astype(jnp.float32) / self.temperature, batch['targets'])

  def count(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The loss's normaliser over the whole batch (see the module docstring)."""
    mask = batch['loss_mask'].astype(jnp.float32)
    rows = jnp.float32(mask.shape[0])
    if self.loss_type == 'grpo':
      return rows
    if self.loss_type == 'dr_grpo':
      return rows * self.max_completion_length
    return jnp.maximum(jnp.sum(mask), 1.0)

  def loss_sums(self, model, reference, batch: Mapping[str, jax.Array],
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the aggregated per-token losses summed over the batch, sums of the logged metrics)."""
    mask = batch['loss_mask'].astype(jnp.float32)
    logp = self.token_logps(model, batch)
    old = batch.get('old_logps')
    old = jax.lax.stop_gradient(logp) if old is None else old
    adv = batch['advantages'].astype(jnp.float32)
    adv = adv[:, None] if adv.ndim == 1 else adv
    ratio = jnp.exp(logp - old)
    low, high = 1 - self.epsilon, 1 + self.epsilon_high
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, low, high) * adv)
    if self.needs_reference:
      ref = jax.lax.stop_gradient(self.token_logps(reference, batch))
      kl = jnp.exp(ref - logp) - (ref - logp) - 1
      per_token = per_token + self.beta * kl
    else:
      kl = jnp.zeros_like(logp)
    tokens = jnp.sum(mask, axis=-1)
    if self.loss_type == 'grpo':
      loss_sum = jnp.sum(jnp.sum(per_token * mask, axis=-1) / jnp.maximum(tokens, 1.0))
    else:
      loss_sum = jnp.sum(per_token * mask)
    clipped = ((ratio < low) & (adv < 0)) | ((ratio > high) & (adv > 0))
    return loss_sum, {
        'kl_sum': jnp.sum(kl * mask),
        'clipped_sum': jnp.sum(clipped.astype(jnp.float32) * mask),
        'token_sum': jnp.sum(tokens),
        'row_sum': jnp.sum((tokens > 0).astype(jnp.float32))}

  def named(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return dict(sums)

  def metrics(self, sums: Mapping[str, Any], count: Any) -> dict[str, Any]:
    """kl (mean over completion tokens), clip_fraction (tokens whose clipped term was taken) and
    completion_length (mean tokens per completion, its stop token included)."""
    del count
    tokens = jnp.maximum(sums['token_sum'], 1.0)
    return {'kl': sums['kl_sum'] / tokens, 'clip_fraction': sums['clipped_sum'] / tokens,
            'completion_length': sums['token_sum'] / jnp.maximum(sums['row_sum'], 1.0)}

  def dataset(self, config, tokenizer, split: str):
    from gemma_jax import prompt_data  # pylint: disable=g-import-not-at-top (grain)
    return prompt_data.job_prompt_dataset(config, tokenizer, split=split)


def from_config(config) -> GRPO:
  c = config.grpo
  return GRPO(loss_type=c.loss_type, beta=float(c.beta), epsilon=float(c.epsilon),
              epsilon_high=float(c.epsilon if c.epsilon_high < 0 else c.epsilon_high),
              temperature=float(c.temperature), max_completion_length=int(c.max_completion_length),
              num_generations=int(c.num_generations), num_iterations=int(c.num_iterations),
              top_k=int(c.top_k), top_p=float(c.top_p), scale_rewards=c.scale_rewards,
              rewards=tuple(c.rewards), reward_weights=tuple(float(w) for w in c.reward_weights),
              format_pattern=c.format_pattern, raw_prompt=bool(c.raw_prompt),
              stop_strings=tuple(c.stop_strings))
