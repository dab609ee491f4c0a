"""Rollouts: the train batches of an RL objective (GRPO), sampled from the current weights by the
project's own `Sampler`, on the job's devices, with no copy of the weights.

For a batch of B prompts (gemma_jax.prompt_data), `Rollouts.batch(step, model)`:
  1. samples G = grpo.num_generations completions of each prompt with `Sampler.sample` (the
     prompts repeated G times, consecutive; temperature/top_k/top_p from config.grpo; at most
     grpo.max_completion_length tokens, stopping at <end_of_turn>, <eos> or one of
     grpo.stop_strings, whose token is then the completion's last) under the seed
     `rollout_seed(config.seed, step)`, so a resumed job samples exactly what the uninterrupted
     one did;
  2. scores them with the reward functions (gemma_jax.rewards) and normalises the rewards per
     group into advantages (objectives.grpo.group_advantages);
  3. lays out the train batch: B*G rows of prompt + completion (tokens/targets shifted, loss_mask
     1 on the completion including its stop token, positions 0.., segment_ids 1, zero padding to
     seq_len), per-token 'advantages' [N, T], and, when num_iterations > 1, the sampling policy's
     'old_logps' [N, T].
With num_iterations = mu the same rollouts serve mu consecutive steps (steps (k-1)mu+1 .. k mu);
checkpoints and preemption stops fall on the last of them (the trainer sees to it), so the
iterator state saved with a checkpoint is always between two rollouts.

Host-side metrics of each step: reward (mean), reward_std (mean over groups of the group's
std), reward_NAME for each reward function, frac_reward_zero_std (groups that teach nothing) and
rollout_seconds (sampling, rewards and old log-probs; 0 on a step that reuses its rollouts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from gemma_jax import rewards as rewards_lib
from gemma_jax.objectives.grpo import group_advantages
from gemma_jax.sampler import Completion, Sampler
from gemma_jax.sampling import GREEDY, SamplingParams

KEYS = ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')


def rollout_seed(seed: int, step: int) -> int:
  """The sampling seed of step `step`'s rollouts (a 32-bit draw from (seed, step))."""
  return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0])


def reward_functions(objective) -> dict[str, rewards_lib.RewardFn]:
  """The objective's reward functions by name (config.grpo.rewards, resolved)."""
  if len(set(map(metric_name, objective.rewards))) != len(objective.rewards):
    raise rewards_lib.RewardError(f'config.grpo.rewards={list(objective.rewards)} names a '
                                  'reward twice; weigh it with grpo.reward_weights instead.')
  return {n: rewards_lib.resolve(n, objective.format_pattern) for n in objective.rewards}


def sample_completions(model, tokenizer, prompts: Sequence[Any], objective, *, seed: int,
                       cache_length: int, generations: int | None = None,
                       sampling: SamplingParams | None = None) -> list[Completion]:
  """`Sampler.sample` of each prompt's ids repeated `generations` (default G) times."""
  g = objective.num_generations if generations is None else generations
  sampling = sampling or SamplingParams(objective.temperature, objective.top_k, objective.top_p)
  ids = [list(p.ids) for p in prompts for _ in range(g)]
  sampler = Sampler(model, tokenizer, cache_length=cache_length)
  return sampler.sample(ids, objective.max_completion_length, sampling=sampling, seed=seed,
                        stop_tokens=list(objective.stop_strings) or None)


def score_completions(fns, weights, prompts: Sequence[Any], completions: Sequence[Completion],
                      generations: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(weighted reward [N], each function's [N]) of prompts' completions (`generations` each)."""
  rows = [p for p in prompts for _ in range(generations)]
  fields = {k: [p.fields.get(k) for p in rows] for k in rows[0].fields}
  total, per_fn = rewards_lib.score(fns, weights, [p.text for p in rows],
                                    [c.text for c in completions], fields)
  return np.asarray(total, np.float64), {k: np.asarray(v) for k, v in per_fn.items()}


def train_rows(prompts: Sequence[Any], completions: Sequence[Completion], generations: int,
               seq_len: int) -> dict[str, np.ndarray]:
  """The [N, seq_len] rows of prompt + completion (the module docstring's layout)."""
  n = len(completions)
  rows = {k: np.zeros((n, seq_len), np.float32 if k == 'loss_mask' else np.int32) for k in KEYS}
  for i, c in enumerate(completions):
    prompt = list(prompts[i // generations].ids)
    ids = prompt + list(c.tokens)
    length = len(ids) - 1
    if length > seq_len:
      raise ValueError(f'rollout row {i} has {length} positions > seq_len={seq_len}.')
    rows['tokens'][i, :length], rows['targets'][i, :length] = ids[:-1], ids[1:]
    rows['loss_mask'][i, len(prompt) - 1:length] = 1
    rows['positions'][i, :length], rows['segment_ids'][i, :length] = np.arange(length), 1
  return rows


def reward_metrics(total: np.ndarray, per_fn: Mapping[str, np.ndarray],
                   generations: int) -> dict[str, float]:
  """reward, reward_std (mean within-group std), reward_NAME, frac_reward_zero_std."""
  groups = total.reshape(-1, generations)
  out = {'reward': float(total.mean()),
         'reward_std': float(groups.std(axis=1, ddof=1).mean()) if generations > 1 else 0.0,
         'frac_reward_zero_std': float(np.mean(groups.max(1) == groups.min(1)))}
  out.update({f'reward_{metric_name(k)}': float(v.mean()) for k, v in per_fn.items()})
  return out


def metric_name(reward: str) -> str:
  """A reward's metric suffix: its name, or the function name of a 'module:function'."""
  return reward.rpartition(':')[2]


def policy_logps_fn(objective, graphdef, rest, mesh, rules):
  """`fn(params, frozen, batch) -> [N, T]` numpy log-probs of a (numpy) batch's targets under the
  weights (frozen: a LoRA model's base, else None), computed on `mesh` as the loss computes them:
  the sampling policy's pi_old when num_iterations > 1."""
  from gemma_jax import distributed, sharding  # pylint: disable=g-import-not-at-top

  @jax.jit
  def logps(params, frozen, batch):
    with sharding.tracing_under(mesh, rules):
      model = nnx.merge(graphdef, params, *([] if frozen is None else [frozen]), rest)
      return objective.token_logps(model, batch)

  return lambda params, frozen, batch: np.asarray(jax.device_get(
      logps(params, frozen, distributed.put_batch(batch, mesh, rules))))


class Rollouts:
  """The job's train batches for an RL objective (the module docstring): wraps the prompt
  iterator, whose state, stats and resume it passes through. `fingerprint` is the CRC-32 of the
  last batch's rows; `last` holds the last rollout's (prompts, completions, rewards, advantages).

  policy_logps(batch) -> [N, T] log-probs of the batch's targets under the current weights (as
  the loss computes them), needed when num_iterations > 1.
  """

  def __init__(self, objective, prompts, tokenizer, *, seq_len: int, seed: int,
               policy_logps: Callable[[Mapping[str, np.ndarray]], np.ndarray] | None = None):
    self.objective, self._prompts, self._tokenizer = objective, prompts, tokenizer
    self._seq_len, self._seed, self._policy_logps = seq_len, seed, policy_logps
    self._fns = reward_functions(objective)
    self._weights = objective.reward_weights
    self._cached: tuple[dict[str, np.ndarray], dict[str, float]] | None = None
    self.fingerprint = 0
    self.last: dict[str, Any] = {}

  def check_rewards(self, prompt) -> None:
    """Calls every reward function once on `prompt` with an empty completion: a function that
    fails or returns a non-number is reported (RewardError) before any step runs."""
    empty = Completion(list(prompt.ids), '', [], 'length')
    score_completions(self._fns, self._weights, [prompt], [empty], 1)

  def batch(self, step: int, model) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(train batch, host metrics) of step `step` (1-based), sampling from `model` at the first
    step of each group of num_iterations steps."""
    if (step - 1) % self.objective.batch_reuse and self._cached is not None:
      batch, metrics = self._cached
      return batch, {**metrics, 'rollout_seconds': 0.0}
    jax.block_until_ready(nnx.state(model))  # the previous update is not the rollout's time
    t0 = time.time()
    g = self.objective.num_generations
    prompts = next(self._prompts)
    completions = sample_completions(model, self._tokenizer, prompts, self.objective,
                                     seed=rollout_seed(self._seed, step),
                                     cache_length=self._seq_len + 1)
    total, per_fn = score_completions(self._fns, self._weights, prompts, completions, g)
    advantages = group_advantages(total, g, self.objective.scale_rewards)
    batch = train_rows(prompts, completions, g, self._seq_len)
    batch['advantages'] = advantages[:, None] * batch['loss_mask']
    if self.objective.batch_reuse > 1:
      batch['old_logps'] = np.asarray(self._policy_logps(batch), np.float32) * batch['loss_mask']
    from gemma_jax.data import batch_fingerprint  # pylint: disable=g-import-not-at-top (grain)
    self.fingerprint = batch_fingerprint(batch)
    self.last = {'prompts': prompts, 'completions': completions, 'rewards': total,
                 'advantages': advantages, 'seed': rollout_seed(self._seed, step)}
    metrics = reward_metrics(total, per_fn, g)
    self._cached = (batch, metrics)
    return batch, {**metrics, 'rollout_seconds': time.time() - t0}

  def get_state(self):
    return self._prompts.get_state()

  def set_state(self, state) -> None:
    self._prompts.set_state(state)
    self._cached = None

  @property
  def stats(self) -> dict[str, int]:
    return self._prompts.stats


def held_out_rewards(model, tokenizer, prompt_batches: Iterable[Sequence[Any]], objective, *,
                     cache_length: int, seed: int = 0) -> dict[str, float]:
  """Held-out rewards of the policy as it is trained to act: the mean over G completions per
  prompt sampled with the rollouts' rule (`seed` fixed, so two evaluations differ only by the
  weights) as 'reward' and 'reward_NAME', and of one greedy completion as 'greedy_reward'."""
  fns = reward_functions(objective)
  g = objective.num_generations
  sums: dict[str, list[np.ndarray]] = {}
  size = None
  for i, prompts in enumerate(prompt_batches):
    size, n = size or len(prompts), len(prompts)
    padded = list(prompts) + [prompts[-1]] * (size - n)  # one batch shape, one compile
    batch_seed = int(np.random.SeedSequence([seed, 0, i]).generate_state(1)[0])  # step 0: unused
    for key, generations, sampling in (('', g, None), ('greedy_', 1, GREEDY)):
      completions = sample_completions(model, tokenizer, padded, objective, seed=batch_seed,
                                       cache_length=cache_length, generations=generations,
                                       sampling=sampling)
      total, per_fn = score_completions(fns, objective.reward_weights, prompts,
                                        completions[:n * generations], generations)
      sums.setdefault(f'{key}reward', []).append(total)
      if not key:
        for k, v in per_fn.items():
          sums.setdefault(f'reward_{metric_name(k)}', []).append(v)
  return {k: float(np.concatenate(v).mean()) for k, v in sums.items()}
