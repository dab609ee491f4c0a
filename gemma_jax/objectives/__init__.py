"""Training objectives: what a train step optimises, over which batches (`config.objective`).

The trainer's loop, checkpoints, resume, sharding, gradient accumulation, LoRA and logging are
shared; an objective is one small module here with a frozen dataclass that has:

  name, count_name     its config.objective value; what `count` counts, as logged per step
  needs_reference      whether `loss_sums` gets the reference model (the initial weights)
  eval_before_training whether held-out metrics are also taken at step 0 (before -> after)
  samples              whether its batches are sampled from the current weights (gemma_jax.
                       rollouts: 'grpo') instead of read from the data pipeline
  batch_reuse          optimizer steps that share one batch (GRPO's num_iterations; else 1)
  rows_per_example     batch rows per unit of config.batch_size (a DPO pair: 2; GRPO: G)
  count(batch)         the normaliser over the whole step's batch (target tokens, pairs, ...)
  loss_sums(model, reference, batch) -> (loss summed over the batch, aux: the metrics' sums)
  named(aux) -> {name: sum}   (held-out evaluation adds these over batches)
  metrics(named sums, count) -> {metric: value}, the logged means
  dataset(config, tokenizer, split) -> an iterable whose iterators yield this process's rows of
                       each global batch (for a sampling objective: its prompts) and have
                       get_state/set_state, stats and fingerprint

and `from_config(config)` to build it. The step divides the loss sum by `count` of the whole
batch (not of a micro-batch), so micro-batches and devices add up to the full batch's loss.

To add one: write objectives/NAME.py with those, add it to OBJECTIVES, its config keys to
train_config.defaults() (and their checks to validate_config), and a test against a reference
implementation.
"""

from __future__ import annotations

from gemma_jax.objectives import dpo, grpo, sft

OBJECTIVES = {sft.NAME: sft, dpo.NAME: dpo, grpo.NAME: grpo}


def from_config(config):
  """The job's objective (config.objective and its own config keys)."""
  if config.objective not in OBJECTIVES:
    raise ValueError(f'config.objective={config.objective!r}; expected one of '
                     f'{sorted(OBJECTIVES)}.')
  return OBJECTIVES[config.objective].from_config(config)
