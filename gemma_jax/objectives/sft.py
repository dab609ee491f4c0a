"""Supervised fine-tuning: the mean cross-entropy of the response tokens.

Batches come from gemma_jax.data (packed rows; `loss_mask` is 1 on response tokens). The loss is
summed over every target token of the step's batch and divided by their number (`count`), so
micro-batches and devices add up to exactly the whole batch's mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from gemma_jax.layers import weight
from gemma_jax.loss import head_loss_sums, token_loss_sums

NAME = 'sft'


@dataclasses.dataclass(frozen=True)
class SFT:
  """`loss_chunk` > 0 fuses the output head into the loss, that many tokens at a time
  (gemma_jax.loss.head_loss_sums): the [B, T, V] logits are never made whole."""

  loss_chunk: int = 0

  name = NAME
  count_name = 'target_tokens'  # what `count` counts, as logged
  needs_reference = False  # no reference model
  eval_before_training = False  # held-out metrics at step 0 too
  samples = False  # batches come from the data pipeline, not from the Sampler
  batch_reuse = 1  # optimizer steps per batch
  rows_per_example = 1  # batch rows per unit of batch_size

  def count(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The target tokens of the whole batch (at least 1)."""
    return jnp.maximum(jnp.sum(batch['loss_mask'].astype(jnp.float32)), 1.0)

  def loss_sums(self, model, reference, batch: Mapping[str, jax.Array],
                ) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy summed over the batch's target tokens, top-1 hits among them)."""
    del reference
    out, _ = model(batch['tokens'], positions=batch['positions'],
                   segment_ids=batch['segment_ids'], return_hidden=self.loss_chunk > 0)
    if self.loss_chunk > 0:
      table_VD = weight(model.embedder, 'input_embedding', model.dtype)
      loss_sum, correct_sum = head_loss_sums(out, table_VD, batch['targets'], batch['loss_mask'],
                                             chunk=self.loss_chunk,
                                             cap=model.config.final_logit_soft_cap)
    else:
      loss_sum, correct_sum = token_loss_sums(out, batch['targets'], batch['loss_mask'])
    return loss_sum, correct_sum

  def named(self, correct_sum: jax.Array) -> dict[str, jax.Array]:
    return {'correct_sum': correct_sum}

  def metrics(self, sums: Mapping[str, Any], count: Any) -> dict[str, Any]:
    return {'accuracy': sums['correct_sum'] / count}

  def dataset(self, config, tokenizer, split: str):
    from gemma_jax import data  # pylint: disable=g-import-not-at-top (grain)
    return data.job_dataset(config, tokenizer, split=split)


def from_config(config) -> SFT:
  return SFT(loss_chunk=int(config.loss_chunk))
